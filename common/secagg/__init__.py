"""SecAgg+ (Bell et al. 2020; Bonawitz et al. 2017) as pure code: no flwr, no torch.

Rooms: ``crypto`` (X25519, HKDF, ChaCha20-Poly1305, the mask PRG), ``shamir``,
``params`` (public parameters, keys, graph, what both sides derive), ``site`` and
``coordinator`` (the two state machines), ``encoding`` (the round's update encoding),
``errors``.

One round, for the sites sampled by the coordinator (protocol indices 1..n):

1. advertise: each site makes two fresh X25519 key pairs, ``c`` (to encrypt shares)
   and ``s`` (to agree pairwise masks), and sends both public keys.
2. share keys: the coordinator forwards to each site its neighbours' public keys. A
   site draws a self-mask seed ``b``, Shamir-shares ``b`` and its ``s`` private key
   among its holders (its neighbours and itself, threshold ``t``), and sends each
   neighbour's pair of shares sealed with ChaCha20-Poly1305 under a key agreed from
   the ``c`` keys, bound to the round, sender and receiver.
3. masked input: the coordinator routes the sealed shares. A site adds to its
   encoded update (a vector in Z_(2^k)) the expansion of ``b`` and, for every
   neighbour ``v`` whose shares it received, ``+PRG(s_uv)`` if ``u < v`` else
   ``-PRG(s_uv)``; pairwise masks cancel in the sum.
4. unmask: the coordinator names which sites' masked inputs it holds (alive) and which
   shared but sent none (dropped). Each survivor reveals, for each neighbour, the
   share of ``b`` if alive or of the ``s`` private key if dropped, never both: a site
   answers one unmask request per round. The coordinator rebuilds the dropped sites'
   pairwise masks and the alive sites' self masks and removes them from the sum.

The neighbour graph is a Harary graph on a public random permutation of the
participants: each site is joined to ``degree / 2`` sites on either side, the complete
graph when ``degree >= n - 1``. A site's secrets are recoverable from any ``t`` of its
``degree + 1`` holders, and ``t`` must be a strict majority of them (so answers to an
honest unmask request never give both secrets of one site) and at least 2.

Every message is checked on arrival: wrong stage, unknown or unexpected sender, wrong
length, failed authentication tag, a message of another round. Anything wrong raises
``SecAggError`` naming it; the coordinator treats the sender as dropped, and aborts the
round with ``SecAggAbort`` when some site's secrets could no longer be recovered.
"""
