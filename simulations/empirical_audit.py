"""``fedsilo audit empirical``: a lower bound on epsilon from one run of the real code.

Every epsilon fedsilo prints is an accountant's upper bound, as good as the code it
describes. This audit measures instead (issue 16): ``m`` canaries are each put in a
site's data by a secret fair coin, the site trains its whole schedule once, and an
auditor who sees what the mode names guesses the coins from per-canary scores; the
correct guesses become lower bounds on epsilon at 95% confidence
(common/privacy/empirical.py: the Steinke-Nasr-Jagielski bound and the tighter f-DP
one). A bound above the claim means the code leaks more than the accountant says.

Modes (what the auditor sees, and the canaries):
- ``whitebox``: every model the site's DP-SGD steps through. Canaries are Dirac
  gradients (``CANARY_SCALE`` times the clip norm on one trainable coordinate each,
  distinct coordinates of Linear weights, independent of the coins): extra examples at
  random places among the data in the site's own Poisson draw (``train_dp``), sized,
  clipped and summed by the engine with the real examples, then noised. Score: the coordinate's total
  movement over the site's steps (divided by its step size).
- ``pipeline``: the coordinator's true view, the same canaries scored from the decoded
  secure sum of each round: the site's delta clipped, rotated and quantized by the
  real encoder (``common.quantize.encode``), summed in the ring with the encodings of
  two roster members colluding with the coordinator (zero updates: the strongest
  position the threat model allows) through a real SecAgg+ round (``secure_sum``: the
  common/secagg state machines), and decoded by the coordinator's ``decode_sum``.
- ``blackbox``: only the final model. Canaries are crafted texts of public, rare
  wordpieces with random labels, added to the site's rows; score: minus the final
  model's loss on them. Expect weak bounds (a near 0 bound says the attack is weak,
  not that the model is private).

What the canaries test. With the book-keeping engine each is recorded as an example of
the Linear layer its coordinate belongs to (``common.dp_engine`` ``_record_rows``), so
the layer rule that sizes real examples sizes it, and the clip factors, the sum, the
noise and the step follow; with ``dp-engine = "opacus"`` their rows join Opacus's
per-sample gradients before its clip. They do not share the forward and backward
passes that produce real examples' layer records (checked against per-example autograd
and Opacus in tests/unit/common/test_dp_engine.py).

The site is simulated site ``site`` of the configuration (bundled or own data), with
its public size, sample rate, steps and the noise its plan calibrates. Across rounds it
continues from its own model (white-box) or the decoded sums (pipeline): the
coordinator may send any global model, and DP holds for every choice.

White-box and pipeline need a coordinate of a trainable Linear weight per canary (the
book-keeping engine records each canary as an example of that layer); a preset with
fewer (``minilm-probe``: 768 on two classes) is audited with ``tiny`` (131,328), whose
DP mechanism (sample rate, steps, noise, clip) is the same: the result says so.

``Breaks`` exist only here, never as run-config keys: ``noise=F`` trains with F times
the calibrated noise, ``sample-rate=F`` samples at F times the rate the accountant is
told; the claim stays the unbroken one, so a working audit certifies above it.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from common.config import ConfigError, RunConfig
from common.dp_engine import SparseRows
from common.model import Classifier, build_model, model_spec
from common.privacy.accounting import calibrate_noise_multiplier, compute_epsilon
from common.privacy.budget import check_delta
from common.privacy.empirical import bonferroni_lower_bound, guess_counts
from common.privacy.errors import PrivacyError
from common.privacy.events import SubsampledGaussianEvent
from common.secure_random import SecureRandom
from common.task import Task, run_task
from common.training import (
    Batchable,
    batches_per_epoch,
    default_device,
    sample_rate,
    step_sizes,
    train_dp,
)

Mode = Literal["whitebox", "pipeline", "blackbox"]
MODES: tuple[Mode, ...] = ("whitebox", "pipeline", "blackbox")
# A Dirac canary's gradient, in clip norms: well above 1, so a clip that does not bite
# lets ten times the signal through.
CANARY_SCALE = 10.0
# The guesses, declared before any score is seen: (k+, k-) = (f m / 2, f m / 2) for each
# fraction f, the best bound of the grid at level beta / len(grid) (Bonferroni).
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5)
DEFAULT_CANARIES = 1000
SYBILS = 2  # the coordinator's own sites in the pipeline's secure sum
BLACKBOX_TOKENS = 8  # wordpieces per crafted text
FALLBACK_PRESET = "tiny"


@dataclass(frozen=True)
class Breaks:
    """A deliberately broken mechanism (local audit only): noise scaled by ``noise``,
    sampling at ``sample_rate`` times the accountant's rate."""

    noise: float = 1.0
    sample_rate: float = 1.0

    @classmethod
    def parse(cls, items: Sequence[str]) -> Breaks:
        values: dict[str, float] = {}
        for item in items:
            key, sep, raw = item.partition("=")
            key = key.strip()
            if not sep or key not in ("noise", "sample-rate"):
                raise ConfigError(
                    f"--break expects noise=FACTOR or sample-rate=FACTOR, got {item!r}"
                )
            try:
                factor = float(raw)
            except ValueError:
                raise ConfigError(f"--break {key}: {raw!r} is not a number") from None
            if not (math.isfinite(factor) and factor > 0):
                raise ConfigError(f"--break {key}: the factor must be positive, got {raw}")
            if key in values:
                raise ConfigError(f"--break {key} given twice")
            values[key.replace("-", "_")] = factor
        return cls(**values)

    @property
    def broken(self) -> bool:
        return self.noise != 1.0 or self.sample_rate != 1.0

    def label(self) -> str:
        parts = [f"noise={self.noise:g}"] if self.noise != 1.0 else []
        parts += [f"sample-rate={self.sample_rate:g}"] if self.sample_rate != 1.0 else []
        return ", ".join(parts) or "none"


@dataclass(frozen=True)
class Mechanism:
    """The audited site's DP-SGD as its plan fixes it, and what actually runs."""

    examples: int
    sample_rate: float
    steps_per_round: int
    rounds: int
    noise_multiplier: float
    clip_norm: float
    delta: float
    epsilon_claim: float  # PRV, for the plan (the unbroken mechanism)
    used_sample_rate: float
    used_noise_multiplier: float

    @property
    def steps(self) -> int:
        return self.steps_per_round * self.rounds


def mechanism(cfg: RunConfig, examples: int, breaks: Breaks) -> Mechanism:
    """What a fresh simulated site of ``examples`` training rows runs (client/round.py:
    its public size gives the rate and steps; the run's target calibrates the noise)."""
    q = sample_rate(examples, cfg.batch_size)
    per_round = cfg.local_epochs * batches_per_epoch(examples, cfg.batch_size)
    steps = per_round * cfg.num_server_rounds
    sigma = calibrate_noise_multiplier(
        target_epsilon=cfg.epsilon, delta=cfg.delta, sample_rate=q, steps=steps
    )
    claim = compute_epsilon([SubsampledGaussianEvent(sigma, q, steps)], cfg.delta)
    return Mechanism(
        examples=examples,
        sample_rate=q,
        steps_per_round=per_round,
        rounds=cfg.num_server_rounds,
        noise_multiplier=sigma,
        clip_norm=cfg.clip_norm,
        delta=cfg.delta,
        epsilon_claim=claim,
        used_sample_rate=min(1.0, q * breaks.sample_rate),
        used_noise_multiplier=sigma * breaks.noise,
    )


@dataclass(frozen=True)
class Bound:
    epsilon: float
    guesses: tuple[int, int]  # the (k+, k-) of the grid that gave it
    correct: int


@dataclass(frozen=True)
class AuditResult:
    mode: Mode
    preset: str
    preset_note: str
    canaries: int
    included: int
    beta: float
    epsilon_target: float
    mechanism: Mechanism
    steinke: Bound
    fdp: Bound
    breaks: Breaks
    seed: int
    site: int
    seconds: float
    grid: list[tuple[int, int]] = field(default_factory=list)
    # Per canary, its coin and its score: anyone can recompute the bounds from these
    # (common/privacy/empirical.py, or any implementation of the two papers).
    included_coins: list[bool] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    @property
    def epsilon_claim(self) -> float:
        return self.mechanism.epsilon_claim

    @property
    def above_claim(self) -> bool:
        """The verdict: the Steinke bound, valid for every (epsilon, delta)-DP
        mechanism, above the claim (a 5% false alarm at beta = 0.05)."""
        return self.steinke.epsilon > self.epsilon_claim

    @property
    def fdp_above_claim(self) -> bool:
        """The f-DP bound above the claim: the Gaussian-curve claim is rejected. DP-SGD's
        curve is close to Gaussian, so this is a strong hint, but not the verdict."""
        return self.fdp.epsilon > self.epsilon_claim

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["breaks"] = {"noise": self.breaks.noise, "sample-rate": self.breaks.sample_rate}
        out["epsilon_claim"] = self.epsilon_claim
        out["above_claim"] = self.above_claim
        out["fdp_above_claim"] = self.fdp_above_claim
        out["confidence"] = 1 - self.beta
        return out


def guess_grid(m: int) -> list[tuple[int, int]]:
    """The declared (k+, k-) pairs for m canaries."""
    grid = []
    for f in GUESS_FRACTIONS:
        k = max(1, round(f * m / 2))
        if (k, k) not in grid and 2 * k <= m:
            grid.append((k, k))
    return grid


def coin_rng(seed: int) -> np.random.Generator:
    """The secret coins; independent of every other stream of the audit."""
    return np.random.default_rng(np.random.SeedSequence([seed, 16]))


def design_rng(seed: int) -> np.random.Generator:
    """The canaries themselves (coordinates, crafted texts and labels), fixed before
    and independently of the coins."""
    return np.random.default_rng(np.random.SeedSequence([seed, 17]))


def encoder_rng(seed: int) -> np.random.Generator:
    """The pipeline's rotation seeds and stochastic rounding (OS entropy at a real
    site; here from the seed, so that an audit can be run again exactly)."""
    return np.random.default_rng(np.random.SeedSequence([seed, 18]))


def site_rng(seed: int) -> SecureRandom:
    """The site's sampling and noise (reproducible from the audit's seed)."""
    return SecureRandom(hashlib.sha256(f"fedsilo empirical audit {seed}".encode()).digest())


def audited_task(cfg: RunConfig, mode: Mode, canaries: int) -> tuple[Task, str]:
    """The task to audit and a note when its preset was replaced: white-box canaries
    need one trainable coordinate each."""
    task = run_task(cfg)
    if mode == "blackbox":
        return task, ""
    have = trainable_coordinates(task)
    if have >= canaries:
        return task, ""
    fallback = task.with_overrides(max_length=task.max_length, model_preset=FALLBACK_PRESET)
    if task.model_preset == FALLBACK_PRESET or trainable_coordinates(fallback) < canaries:
        raise ConfigError(
            f"{canaries:,} canaries need {canaries:,} trainable Linear weight coordinates; the "
            "model has "
            f"{have:,}: use fewer canaries"
        )
    return fallback, (
        f"the run's preset {task.model_preset} has {have:,} trainable weight coordinates, fewer than "
        f"{canaries:,} canaries: audited with {FALLBACK_PRESET} "
        f"({trainable_coordinates(fallback):,}), the same DP mechanism"
    )


def trainable_coordinates(task: Task) -> int:
    """The coordinates that can host a canary: the trainable Linear weights."""
    spec = model_spec(task)
    if spec.kind == "minilm-probe":  # a linear head on the 384-wide embedding
        return spec.d_model * spec.num_classes
    return int(sum(canary_hosts(build_model(spec, seed=0)).values()))


def canary_hosts(model: Classifier) -> dict[int, int]:
    """Trainable parameter index (the model's order) -> size, for the trainable Linear
    weights: where the book-keeping engine records a given row as an example."""
    linear = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {i: p.numel() for i, p in enumerate(trainable) if id(p) in linear}


def site_data(cfg: RunConfig, task: Task, site: int, num_sites: int) -> Batchable:
    """The training rows of simulated site ``site``, as the site itself loads them."""
    from client.data import Holdout, load_site_data
    from client.settings import SiteSettings
    from common.evaluation import evaluation_modes

    if not 0 <= site < num_sites:
        raise ConfigError(f"--site {site} is outside 0..{num_sites - 1}")
    _, federated = evaluation_modes(cfg, task)
    settings = SiteSettings(
        site_id=f"audited-site-{site}",
        data_path=None,
        partition_id=site,
        num_partitions=num_sites,
        epsilon=cfg.epsilon,
        delta=cfg.delta,
        state_dir=None,
        allow_no_dp=False,
        text_column=task.text_column,
        label_column=task.label_column,
    )
    holdout = Holdout(b"fedsilo empirical audit", cfg.eval_fraction if federated else 0.0)
    return load_site_data(settings, cfg, task, holdout).train


# ---- canaries -----------------------------------------------------------------------------


def dirac_canaries(
    model: Classifier, m: int, clip_norm: float, rng: np.random.Generator
) -> tuple[SparseRows, np.ndarray]:
    """``m`` Dirac gradient canaries on distinct coordinates of the trainable Linear
    weights, chosen uniformly (from ``design_rng``, independent of the coins), and each
    canary's parameter and flat index as an (m, 2) array."""
    hosts = canary_hosts(model)
    sizes = np.array(list(hosts.values()))
    if sizes.sum() < m:
        raise ConfigError(
            f"{m} canaries need {m} trainable Linear weight coordinates, the model has "
            f"{sizes.sum()}"
        )
    flat = rng.choice(int(sizes.sum()), size=m, replace=False)
    ends = np.cumsum(sizes)
    host = np.searchsorted(ends, flat, side="right")
    param = np.array(list(hosts))[host]
    coord = flat - (ends - sizes)[host]
    rows = SparseRows(
        torch.from_numpy(param), torch.from_numpy(coord), torch.full((m,), CANARY_SCALE * clip_norm)
    )
    return rows, np.stack([param, coord], axis=1)


def canary_values(model: Classifier, where: np.ndarray) -> np.ndarray:
    """The values of the trainable parameters at ``where`` ((m, 2): parameter index in
    the model's order, flat index)."""
    params = [p.detach().cpu().reshape(-1) for p in model.parameters() if p.requires_grad]
    return np.array([float(params[i][j]) for i, j in where], dtype=np.float64)


def crafted_texts(m: int, rng: np.random.Generator) -> list[str]:
    """Texts of ``BLACKBOX_TOKENS`` rare public wordpieces each (the tokenizer's
    vocabulary, whole words from its rarer half), so each canary is its own pattern."""
    from common.text import _tokenizer

    vocab = _tokenizer(64).get_vocab()
    words = sorted(w for w, i in vocab.items() if i > len(vocab) // 2 and w.isalpha())
    picks = rng.choice(len(words), size=(m, BLACKBOX_TOKENS))
    return [" ".join(words[i] for i in row) for row in picks]


# ---- the audit ---------------------------------------------------------------------------


def run_audit(
    cfg: RunConfig,
    *,
    mode: Mode = "whitebox",
    canaries: int = DEFAULT_CANARIES,
    breaks: Breaks | None = None,
    seed: int | None = None,
    site: int = 0,
    num_sites: int = 10,
    beta: float = 0.05,
    say: Callable[[str], None] = print,
) -> AuditResult:
    """One audit of site ``site``'s whole schedule; see the module docstring."""
    breaks = breaks or Breaks()
    if mode not in MODES:
        raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not cfg.dp:
        raise ConfigError("the audit measures DP-SGD: the configuration has dp = false")
    if canaries < 10:
        raise ConfigError(f"--canaries must be at least 10, got {canaries}")
    seed = secrets.randbits(62) if seed is None else seed
    started = time.perf_counter()
    task, note = audited_task(cfg, mode, canaries)
    if note:
        say(note)
    data = site_data(cfg, task, site, num_sites)
    try:
        check_delta(cfg.delta, len(data))  # what client/round.py checks first
    except PrivacyError as err:
        raise ConfigError(f"delta: {err}") from None
    mech = mechanism(cfg, len(data), breaks)
    included = coin_rng(seed).random(canaries) < 0.5
    model = build_model(model_spec(task), seed=cfg.seed)
    device = default_device()
    if mode == "blackbox":
        scores = _blackbox_scores(cfg, task, model, data, mech, included, seed, device)
    else:
        scores = _dirac_scores(cfg, mode, model, data, mech, included, seed, device)
    grid = guess_grid(canaries)
    bounds = {}
    for method in ("steinke", "fdp"):
        eps, k = bonferroni_lower_bound(
            scores.tolist(), included.tolist(), grid, delta=cfg.delta, beta=beta, method=method
        )
        _, right = guess_counts(scores.tolist(), included.tolist(), *k)
        bounds[method] = Bound(eps, k, right)
    return AuditResult(
        mode=mode,
        preset=task.model_preset,
        preset_note=note,
        canaries=canaries,
        included=int(included.sum()),
        beta=beta,
        epsilon_target=cfg.epsilon,
        mechanism=mech,
        steinke=bounds["steinke"],
        fdp=bounds["fdp"],
        breaks=breaks,
        seed=seed,
        site=site,
        seconds=time.perf_counter() - started,
        grid=grid,
        included_coins=included.tolist(),
        scores=scores.tolist(),
    )


def _train(
    cfg: RunConfig,
    model: Classifier,
    data: Batchable,
    mech: Mechanism,
    rng: SecureRandom,
    device: torch.device,
    rows: SparseRows | None = None,
) -> None:
    """One round of the site's DP-SGD, as client/round.py runs it (the broken sample
    rate and noise, if any, in place of the plan's)."""
    train_dp(
        model,
        data,
        steps=mech.steps_per_round,
        sample_rate=mech.used_sample_rate,
        expected_batch=max(1, round(mech.sample_rate * mech.examples)),
        noise_multiplier=mech.used_noise_multiplier,
        clip_norm=mech.clip_norm,
        learning_rate=cfg.learning_rate,
        rng=rng,
        engine=cfg.dp_engine,
        device=device,
        canaries=rows,
    )


def _dirac_scores(
    cfg: RunConfig,
    mode: Mode,
    model: Classifier,
    data: Batchable,
    mech: Mechanism,
    included: np.ndarray,
    seed: int,
    device: torch.device,
) -> np.ndarray:
    rows, where = dirac_canaries(model, len(included), mech.clip_norm, design_rng(seed))
    rows = rows.take(torch.from_numpy(included))
    rates: np.ndarray = np.array(step_sizes(model, cfg.learning_rate))[where[:, 0]]
    rng = site_rng(seed)
    if mode == "whitebox":
        start = canary_values(model, where)
        for _ in range(mech.rounds):
            _train(cfg, model, data, mech, rng, device, rows)
        descent: np.ndarray = (start - canary_values(model, where)) / rates
        return descent  # the total descent of each canary's coordinate
    seen: np.ndarray = (
        _pipeline_scores(cfg, model, data, mech, rows, where, rng, device, encoder_rng(seed))
        / rates
    )
    return seen


def _pipeline_scores(
    cfg: RunConfig,
    model: Classifier,
    data: Batchable,
    mech: Mechanism,
    rows: SparseRows,
    where: np.ndarray,
    rng: SecureRandom,
    device: torch.device,
    rounding: np.random.Generator,
) -> np.ndarray:
    """Per canary, minus the sum over rounds of its coordinate in the sum the
    coordinator decodes (the site's encoding and ``SYBILS`` zero updates of its own)."""
    from common.arrays import flatten, unflatten
    from common.quantize import decode_sum, encode
    from common.secagg.encoding import encoding_spec, site_weight
    from common.training import trainable_delta

    state = model.trainable_state()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if sorted(names) != sorted(state):
        raise RuntimeError("the model's trainable state is not its trainable parameters")
    offsets, start = {}, 0
    for name in sorted(state):  # common/arrays.py's flat layout: sorted names
        offsets[name] = start
        start += state[name].numel()
    flat_at = np.array([offsets[names[i]] + j for i, j in where])
    weight = site_weight(cfg, mech.examples)
    total_view = np.zeros(len(where))
    for _ in range(mech.rounds):
        before = {k: v.clone() for k, v in model.trainable_state().items()}
        _train(cfg, model, data, mech, rng, device, rows)
        vector = flatten(trainable_delta(before, model.trainable_state()))
        rotation = int(rounding.integers(0, 2**62))  # the coordinator's pick
        spec = encoding_spec(cfg, num_sites=1 + SYBILS, seed=rotation, dim=vector.size)
        inputs = [encode(vector, spec, rounding, weight=weight).values]
        inputs += [encode(np.zeros_like(vector), spec, rounding).values for _ in range(SYBILS)]
        total = secure_sum(inputs, spec.ring_bits, min_sites=1 + SYBILS)
        mean, total_weight = decode_sum(total, spec, 1 + SYBILS)
        decoded = mean * (total_weight / spec.weight_bound)  # the weighted sum
        total_view -= decoded[flat_at]
        # the next global model: the decoded update applied (any choice is allowed)
        model.load_trainable_state(
            {k: before[k] + v.to(before[k].device) for k, v in unflatten(decoded, before).items()}
        )
    return total_view


def secure_sum(inputs: Sequence[np.ndarray], ring_bits: int, *, min_sites: int) -> np.ndarray:
    """One honest SecAgg+ round through the real state machines (common/secagg: fresh
    identity keys, signed adverts checked against a roster, dealt and opened shares,
    masked inputs, the consistency round, unmasking): what the coordinator recovers."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from common.secagg.coordinator import CoordinatorSession
    from common.secagg.params import SecAggParams, pack_masked
    from common.secagg.roster import Roster
    from common.secagg.site import SiteSession

    sites = range(1, len(inputs) + 1)
    params = SecAggParams.create(
        sites,
        ring_bits=ring_bits,
        vector_length=int(inputs[0].shape[0]),
        session=secrets.token_hex(8),
    )
    keys = {u: Ed25519PrivateKey.generate() for u in sites}
    ids = {u: k.public_key().public_bytes_raw() for u, k in keys.items()}
    roster = Roster({f"site-{u}": ids[u] for u in sites})
    sessions, adverts = {}, {}
    for u in sites:
        sessions[u], adverts[u] = SiteSession.start(params, u, ids[u], keys[u].sign)
    co = CoordinatorSession(params)
    accepted = co.receive_adverts(adverts)
    for u in sites:
        sessions[u].check_adverts(dict(accepted), roster, min_sites=min_sites)
    routed = co.receive_shares({u: sessions[u].share_keys(keys[u].sign) for u in sites})
    members = co.receive_opened({u: sessions[u].open_shares(*routed[u]) for u in routed})
    masked = {}
    for u in members:
        sessions[u].admit(members)
        y = sessions[u].masked_input(inputs[u - 1])
        masked[u] = (pack_masked(y, sessions[u].params), sessions[u].commitment)
    survivors = co.receive_masked(masked)
    signatures = co.receive_signatures(
        {u: sessions[u].consistency(survivors, keys[u].sign) for u in survivors.alive}
    )
    total, alive = co.receive_unmask(
        {u: sessions[u].unmask(survivors, dict(signatures), keys[u].sign) for u in signatures}
    )
    if tuple(alive) != tuple(sites):
        raise RuntimeError(f"the audit's secure sum lost sites: {sorted(set(sites) - set(alive))}")
    return total


def _blackbox_scores(
    cfg: RunConfig,
    task: Task,
    model: Classifier,
    data: Batchable,
    mech: Mechanism,
    included: np.ndarray,
    seed: int,
    device: torch.device,
) -> np.ndarray:
    """Minus each crafted canary's loss under the final model; the included ones train
    as rows of the site (after its data, under the same sampler)."""
    from common.features import batchable

    m, design = len(included), design_rng(seed)
    texts = crafted_texts(m, design)
    labels = design.integers(0, len(task.labels), size=m)
    crafted = batchable(
        texts, labels, max_length=task.max_length, preset=task.model_preset, cache=None
    )
    keep = torch.from_numpy(included)
    train = Batchable(
        torch.cat([data.ids, crafted.ids[keep]]),
        torch.cat([data.mask, crafted.mask[keep]]),
        torch.cat([data.labels, crafted.labels[keep]]),
    )
    rng = site_rng(seed)
    for _ in range(mech.rounds):
        _train(cfg, model, train, mech, rng, device)
    model.eval()
    with torch.no_grad():
        c = crafted.to(device)
        losses = F.cross_entropy(model(c.ids, c.mask), c.labels, reduction="none")
    return -losses.double().cpu().numpy()


# ---- a sweep, and its outputs -------------------------------------------------------------


def run_audits(
    cfg: RunConfig,
    epsilons: Sequence[float],
    *,
    out_dir: Path,
    say: Callable[[str], None] = print,
    **options: Any,
) -> list[AuditResult]:
    """One audit per epsilon (the run's own when ``epsilons`` is empty), each with its
    own coins and noise; writes ``audit.json`` and ``audit.png`` in ``out_dir``."""
    results = []
    seed = options.pop("seed", None)
    for i, epsilon in enumerate(epsilons or [cfg.epsilon]):
        run_cfg = cfg.with_overrides({"epsilon": epsilon})
        audit_seed = None if seed is None else seed + i
        result = run_audit(run_cfg, seed=audit_seed, say=say, **options)
        say(result_line(result))
        results.append(result)
    write_outputs(results, cfg, out_dir)
    return results


def result_line(r: AuditResult) -> str:
    if r.above_claim:
        verdict = "ABOVE THE CLAIM"
    elif r.fdp_above_claim:
        verdict = "f-DP above the claim (its Gaussian curve rejected; Steinke within)"
    else:
        verdict = "within the claim"
    return (
        f"epsilon claimed {r.epsilon_claim:.3f}: Steinke >= {r.steinke.epsilon:.3f}, "
        f"f-DP >= {r.fdp.epsilon:.3f} ({1 - r.beta:.0%}; {r.fdp.correct} of "
        f"{sum(r.fdp.guesses)} guesses right), {verdict} [{r.mode}, {r.preset}, "
        f"breaks: {r.breaks.label()}, {r.seconds:.0f} s]"
    )


def write_outputs(results: Sequence[AuditResult], cfg: RunConfig, out_dir: Path) -> None:
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "what": "one-run empirical privacy audit (fedsilo audit empirical): lower bounds "
        "on epsilon at the stated confidence, beside the accountant's claim",
        "config": cfg.model_dump(by_alias=True),
        "audits": [r.to_json() for r in results],
    }
    (out_dir / "audit.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot_audits(results, out_dir / "audit.png")


def plot_audits(results: Sequence[AuditResult], path: Path) -> None:
    """The claim against both lower bounds, per audited epsilon."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    claims = [r.epsilon_claim for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    top = max([*claims, *(r.fdp.epsilon for r in results), *(r.steinke.epsilon for r in results)])
    ax.plot([0, top * 1.05], [0, top * 1.05], color="grey", ls="--", lw=1, label="claim (y = x)")
    ax.plot(claims, [r.fdp.epsilon for r in results], marker="o", label="f-DP lower bound")
    ax.plot(claims, [r.steinke.epsilon for r in results], marker="s", label="Steinke lower bound")
    ax.set_xlabel("epsilon claimed by the accountant (PRV)")
    ax.set_ylabel(f"epsilon certified ({1 - results[0].beta:.0%} confidence)")
    first = results[0]
    broken = f", broken: {first.breaks.label()}" if first.breaks.broken else ""
    ax.set_title(
        f"{first.mode} audit, {first.canaries} canaries, {first.preset}{broken}", fontsize=9
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
