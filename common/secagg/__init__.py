"""SecAgg+ (Bell et al. 2020; Bonawitz et al. 2017) as pure code: no flwr, no torch.

Rooms: ``crypto`` (X25519, HKDF, ChaCha20-Poly1305, Ed25519 verification, the mask
PRG), ``shamir``, ``params`` (public parameters, signed adverts, the graph, dealing
entries, the survivor set, what both sides derive), ``roster`` (the federation's
identity keys, out of band), ``site`` and ``coordinator`` (the two state machines),
``encoding`` (the round's update encoding), ``errors``.

One round, for the sites sampled by the coordinator (protocol indices 1..n), secure
against an active coordinator (Bonawitz et al.'s active variant, on Bell et al.'s
sparse graph):

1. advertise: each site makes two fresh X25519 key pairs, ``c`` (to encrypt shares)
   and ``s`` (to agree pairwise masks), and signs both public keys, with its index and
   the round's parameters, with its Ed25519 identity key.
2. share keys: the coordinator forwards every advert to every site. A site checks
   each against its roster (keys obtained out of band), refuses duplicates and fewer
   sites than its own minimum, and derives the neighbour graph from a hash of the
   adverts. It draws a self-mask seed ``b``, Shamir-shares ``b`` and its ``s`` private
   key among its holders (its neighbours and itself, threshold ``t``), seals each
   neighbour's pair of shares with ChaCha20-Poly1305 under a key agreed from the ``c``
   keys, and signs, per holder, the hashes of that holder's two shares (the dealing
   entry).
3. open shares: the coordinator routes the sealed shares with their entries; a site
   opens each and names the dealers whose shares fail its checks. The coordinator
   leaves every such dealer out: the rest are the round's sites.
4. masked input: a site checks the round's sites (``admit``), and only then trains
   (steps 1-3 touch no data). It adds to its encoded update (a vector in Z_(2^k)) the
   expansion of ``b`` and, for every neighbour ``v`` among the round's sites,
   ``+PRG(s_uv)`` if ``u < v`` else ``-PRG(s_uv)``.
5. consistency: the coordinator names one survivor set: which of the round's sites'
   masked inputs it holds (alive) and which it does not (dropped). Each survivor
   checks it (itself alive, at least ``t`` and its own minimum alive, the alive graph
   in one piece) and signs it.
6. unmask: with every survivor's signature forwarded, a site that finds ``t`` of its
   holders' signatures on the set it signed reveals, for each neighbour, the share of
   ``b`` if alive or of the ``s`` private key if dropped, never both, and signs the
   reply. The coordinator checks each share against its dealer's entry (a liar is
   named and its shares discarded), rebuilds the dropped sites' pairwise masks and the
   alive sites' self masks and removes them from the sum.

The neighbour graph is a Harary graph on a permutation drawn from the adverts' hash:
each site is joined to ``degree / 2`` sites on either side, the complete graph when
``degree >= n - 1``. A site's secrets are recoverable from any ``t`` of its
``degree + 1`` holders; ``t`` is more than 2/3 of them (and at least 2), so the round
tolerates ``min(2t - h - 1, t - 2)`` colluding holders of any site against an active
coordinator (``tolerated_colluders``).

Every message is checked on arrival: wrong stage, unknown or unexpected sender, wrong
length, failed authentication tag or signature, a message of another round. Anything
wrong raises ``SecAggError`` naming it; the coordinator treats the sender as dropped,
and aborts the round with ``SecAggAbort`` when some site's secrets could no longer be
recovered.
"""
