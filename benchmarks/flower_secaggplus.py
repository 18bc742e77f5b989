"""Anchor measurement: what Flower's OWN SecAgg+ costs over a plain Flower round.

Runs the same federated round twice in Flower 1.42's Simulation Engine (Ray backend,
one CPU per simulated site): once as a plain legacy FedAvg round, once with Flower's
built-in SecAgg+ (``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` on the
sites). The client workload is identical in both modes and is fedsilo's: each site
trains the tiny model for one local epoch of DP-SGD on its iid share of Rotten
Tomatoes, through the same functions fedsilo's site uses (``client.data.load_site_data``,
``common.training.train_dp``, ``common.model.build_model``), with a fixed noise
multiplier instead of a calibrated one and no ledger. The ratio secagg/plain therefore
measures the protocol alone.

Why this is the anchor: SecAgg+ is what Flower offers out of the box, so it is what
fedsilo's own secure aggregation is compared against. Its shape is fixed by Flower:

* only the legacy API runs it (``LegacyContext``, ``DefaultWorkflow``, legacy
  ``FedAvg``, ``NumPyClient`` behind ``ClientApp(client_fn, mods=[secaggplus_mod])``);
* it sums FULL weights scaled by ``num_examples / max_weight`` (not deltas), clipped
  to +-``clipping_range`` (8) and quantized to [0, 2**22];
* each site uploads the masked vector as int64 words: one per parameter plus one for
  the weight factor, i.e. 2x the fp32 dense size, before the other three stages
  (public keys, encrypted key shares, unmask shares);
* the unmasked aggregate comes back as float64 (``dequantize``), so from round 2 on
  the global model each site downloads is also twice its fp32 size.

Measured, per number of simulated sites N and mode:

* round time, server side: from the strategy's ``configure_fit`` of round r to the end
  of its ``aggregate_fit`` of round r (SecAgg+ calls both: the first in its setup
  stage, the second after unmasking). Round 1 also pays for Ray actors warming up
  (model and data caches), so the summary takes the median of the later rounds;
* bytes uploaded per site and round: a mod outside ``secaggplus_mod`` records the
  protobuf size of every reply's content (``recorddict_to_proto(...).ByteSize()``)
  per stage; the sum over the stages of one round, averaged over the sites;
* CPU seconds: each site's process CPU per stage (in the same mod) and the ServerApp
  thread's CPU per round. On a shared 2-core machine the wall times swing with other
  load (the report prints the 1-minute load average); CPU time much less so.

SecAgg+ settings (``secaggplus_settings``): each site shares its keys with a ring
neighbourhood of ``num_shares = min(N, 2*ceil(log2 N) + 1)`` sites (itself included),
the logarithmic degree that makes SecAgg+ scale, odd as Flower wants it, and all of
them for small N; ``reconstruction_threshold = num_shares // 2 + 1`` (a majority of the
neighbourhood, at least 2). ``max_weight`` is the largest partition, so no site's
weight factor exceeds 1 (Flower warns of overflow otherwise).

Usage (each N runs the plain round, then SecAgg+, in this process; Ray is started and
shut down by each ``run_simulation``)::

    .venv/bin/python benchmarks/flower_secaggplus.py --sites 5,20,50 --rounds 2
    .venv/bin/python benchmarks/flower_secaggplus.py --one 5 --mode secagg  # JSON line

Deprecation warnings from Flower's legacy API are expected.
"""

# ruff: noqa: E402  (Flower reads its environment when imported: set it first)
from __future__ import annotations

import os
from pathlib import Path

for _key, _value in {
    "FLWR_HOME": str(Path(__file__).resolve().parents[1] / ".flwr"),
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}.items():
    os.environ.setdefault(_key, _value)

import argparse
import importlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from functools import cache, partial
from typing import Any, cast

import numpy as np
import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)

from flwr.app import ConfigRecord, Context, Message, MetricRecord
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common import (
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    Key,
)
from flwr.common.serde import recorddict_to_proto
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.simulation import run_simulation

from client.data import Holdout, load_site_data
from client.settings import SiteSettings
from common.config import RunConfig
from common.data import load_builtin, partition
from common.model import Classifier, build_model, model_spec
from common.secure_random import SecureRandom
from common.task import run_task
from common.training import (
    Batchable,
    batches_per_epoch,
    default_device,
    sample_rate,
    train_dp,
)

NOISE_MULTIPLIER = 1.0  # fixed: calibration is not what is measured here
BACKEND_CONFIG: dict[str, Any] = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
ROUND_KEY = "server-round"
TRAIN_SECONDS_KEY = "train-seconds"  # a fit metric: the DP-SGD time alone
PLAIN_STAGE = "fit"  # the one reply of a plain round


def run_config() -> RunConfig:
    """fedsilo's defaults with the iid partition (seed 0) the benchmark uses."""
    return RunConfig(partition="iid")


def secaggplus_settings(num_sites: int) -> tuple[int, int]:
    """``(num_shares, reconstruction_threshold)`` for N sites (see the module docstring)."""
    if num_sites < 3:
        raise ValueError(f"SecAgg+ needs at least 3 sites here, got {num_sites}")
    num_shares = min(num_sites, 2 * math.ceil(math.log2(num_sites)) + 1)
    return num_shares, max(2, num_shares // 2 + 1)


def num_trainable(model: Classifier) -> int:
    return sum(int(t.numel()) for t in model.trainable_state().values())


def initial_model() -> Classifier:
    cfg = run_config()
    return build_model(model_spec(run_task(cfg)), seed=cfg.seed)


# ---- the site ---------------------------------------------------------------------


@cache
def _site_data(settings: SiteSettings) -> Batchable:
    """A site's examples, loaded once per Ray actor for every partition it serves
    (a deployed site loads its data once; fedsilo's own cache keeps only 4)."""
    cfg = run_config()
    no_holdout = Holdout(bytes(32), 0.0)  # as fedsilo's sites in a centrally evaluated run
    return load_site_data(settings, cfg, run_task(cfg), no_holdout).train


class DPSite(NumPyClient):
    """One fedsilo site under the legacy API: DP-SGD for one local epoch, full weights back."""

    def __init__(self, settings: SiteSettings) -> None:
        cfg = run_config()
        self.settings = settings
        self.data = _site_data(settings)
        self.model = build_model(model_spec(run_task(cfg)))
        self.names = list(self.model.trainable_state())

    def get_parameters(self, config: dict[str, Scalar]) -> NDArrays:
        return [t.cpu().numpy().astype(np.float32) for t in self.model.trainable_state().values()]

    def fit(
        self, parameters: NDArrays, config: dict[str, Scalar]
    ) -> tuple[NDArrays, int, dict[str, Scalar]]:
        cfg = run_config()
        self.model.load_trainable_state(
            {
                n: torch.from_numpy(np.asarray(a, dtype=np.float32))
                for n, a in zip(self.names, parameters, strict=True)
            }
        )
        n = len(self.data)
        pid = self.settings.partition_id or 0
        seed = 1_000_003 * (cfg.seed + 1) + 1009 * pid + int(config.get(ROUND_KEY, 0))
        rng = SecureRandom(seed.to_bytes(32, "little"))
        start = time.perf_counter()
        train_dp(
            self.model,
            self.data,
            steps=cfg.local_epochs * batches_per_epoch(n, cfg.batch_size),
            sample_rate=sample_rate(n, cfg.batch_size),
            noise_multiplier=NOISE_MULTIPLIER,
            clip_norm=cfg.clip_norm,
            learning_rate=cfg.learning_rate,
            rng=rng,
            device=default_device(),
        )
        return self.get_parameters({}), n, {TRAIN_SECONDS_KEY: time.perf_counter() - start}


def client_fn(context: Context) -> Any:
    torch.set_num_threads(1)  # one CPU per simulated site
    settings = SiteSettings.from_node_config(context.node_config, run_config())
    return DPSite(settings).to_client()


def metering_mod(
    log_path: str, msg: Message, ctxt: Context, call_next: ClientAppCallable
) -> Message:
    """Record, per stage, the serialized size of what a site receives and sends back and
    the site's time handling it (training included), to ``log_path`` (one JSON line per
    reply: Ray actors are separate processes)."""
    stage = PLAIN_STAGE
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and Key.STAGE in configs:
        stage = str(configs[Key.STAGE])  # read before secaggplus_mod pops it
    down = recorddict_to_proto(msg.content).ByteSize()
    start, cpu_start = time.perf_counter(), time.process_time()
    reply = call_next(msg, ctxt)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    records: list[ConfigRecord | MetricRecord] = [
        *reply.content.config_records.values(),
        *reply.content.metric_records.values(),
    ]
    train = [float(cast(float, r[TRAIN_SECONDS_KEY])) for r in records if TRAIN_SECONDS_KEY in r]
    line = {
        "node": int(msg.metadata.dst_node_id),
        "round": str(msg.metadata.group_id),
        "type": str(msg.metadata.message_type),
        "stage": stage,
        "up": recorddict_to_proto(reply.content).ByteSize(),
        "down": down,
        "seconds": seconds,
        "cpu": cpu,
        "train_seconds": sum(train),
    }
    with open(log_path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")
    return reply


def make_client_app(log_path: str, *, secagg: bool) -> ClientApp:
    meter: Mod = partial(metering_mod, log_path)
    mods: list[Mod] = [meter, secaggplus_mod] if secagg else [meter]
    return ClientApp(client_fn=client_fn, mods=mods)


# ---- the server -------------------------------------------------------------------


class TimedFedAvg(FedAvg):
    """Legacy FedAvg timing each fit round from ``configure_fit`` to ``aggregate_fit``
    (both run in the ServerApp's thread, SecAgg+'s setup and unmask stages included)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.started: dict[int, float] = {}
        self.cpu_started: dict[int, float] = {}
        self.server_cpu: dict[int, float] = {}  # CPU of the ServerApp thread in the round
        self.round_seconds: dict[int, float] = {}
        self.aggregates: dict[int, NDArrays] = {}
        self.replies: dict[int, tuple[int, int]] = {}  # round -> (results, failures)

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        self.started[server_round] = time.perf_counter()
        self.cpu_started[server_round] = time.thread_time()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        out = super().aggregate_fit(server_round, results, failures)
        self.round_seconds[server_round] = time.perf_counter() - self.started[server_round]
        self.server_cpu[server_round] = time.thread_time() - self.cpu_started[server_round]
        self.replies[server_round] = (len(results), len(failures))
        if out[0] is not None:
            self.aggregates[server_round] = parameters_to_ndarrays(out[0])
        return out


def make_server_app(
    strategy: TimedFedAvg, rounds: int, workflow: SecAggPlusWorkflow | None
) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy
        )
        DefaultWorkflow(fit_workflow=workflow)(grid, legacy)

    return app


# ---- one measurement ----------------------------------------------------------------


STAGE_FIELDS = ("up", "down", "seconds", "cpu", "train_seconds")


def _per_stage(log_path: Path, rounds: list[str]) -> dict[str, dict[str, float]]:
    """Per stage: mean bytes up/down and site seconds per site and round, over ``rounds``
    (train messages only)."""
    per: dict[tuple[str, int, str], dict[str, float]] = defaultdict(
        lambda: dict.fromkeys(STAGE_FIELDS, 0.0)
    )
    for raw in log_path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(raw)
        if rec["round"] in rounds and rec["type"] == "train":
            cell = per[(rec["round"], rec["node"], rec["stage"])]
            for field in STAGE_FIELDS:
                cell[field] += rec[field]
    stages = sorted({s for _, _, s in per})
    sites = {(r, n) for r, n, _ in per}
    return {
        s: {
            f: sum(v[f] for (_, _, st), v in per.items() if st == s) / max(1, len(sites))
            for f in STAGE_FIELDS
        }
        for s in stages
    }


def _check_complete(strategy: TimedFedAvg, num_sites: int, rounds: int, log_path: Path) -> None:
    """Fail loudly where Flower does not: run_simulation returns normally when sites
    raise, and SecAgg+ skips a round it halts without telling the strategy."""
    bad = {
        r: strategy.replies.get(r, (0, 0))
        for r in range(1, rounds + 1)
        if strategy.replies.get(r, (0, 0)) != (num_sites, 0)
    }
    if bad:
        raise RuntimeError(
            f"incomplete rounds {{round: (results, failures)}} = {bad} of {num_sites} sites "
            f"(a missing round was halted by SecAgg+); see the log above ({log_path.name})"
        )


def measure_flower(
    num_sites: int,
    rounds: int = 2,
    *,
    secagg: bool,
    num_shares: int | None = None,
    reconstruction_threshold: int | None = None,
) -> dict[str, Any]:
    """Run ``rounds`` legacy FedAvg rounds over ``num_sites`` simulated sites.

    Returns a dict:

    * ``round_seconds``: list, one server-side time per round (round 1 first);
    * ``server_cpu_seconds``: list, CPU time of the ServerApp thread in each round;
    * ``bytes_per_site``: int, serialized reply bytes a site uploads per round, summed
      over the protocol's stages (mean over the sites and over the rounds after the
      first, or round 1 alone if it is the only one); None if nothing replied;
    * ``download_bytes_per_site``: the same for what a site receives;
    * ``stages``: ``{stage: {"up", "down", "seconds", "cpu", "train_seconds"}}`` per site
      and round, same rounds (``"fit"`` for a plain round; SecAgg+'s ``setup``, ``share_keys``,
      ``collect_masked_vectors``, ``unmask``): bytes, the site's wall and CPU
      (process) seconds in the stage, and the wall seconds of its DP-SGD part;
    * ``num_parameters``: trainable parameters of the model;
    * ``secagg``: ``{"num_shares", "reconstruction_threshold", "max_weight"}`` or None;
    * ``aggregate_round1``: the global model after round 1 (list of arrays);
    * ``wall_seconds``: the whole run_simulation call; ``loadavg_1min``: [before, after].

    Raises RuntimeError when a site failed or SecAgg+ halted a round (Flower itself only
    logs both).

    Ray actors unpickle the ClientApp: this module must be importable by name there
    (``main()`` makes sure of it when run as a script).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    cfg = run_config()
    model = initial_model()
    init = [t.cpu().numpy().astype(np.float32) for t in model.trainable_state().values()]
    train = load_builtin(cfg.dataset, "train", seed=cfg.seed)
    parts = partition(train, "iid", num_sites, seed=cfg.seed, min_size=cfg.min_partition_size)
    max_weight = float(max(len(p) for p in parts))

    workflow: SecAggPlusWorkflow | None = None
    sa_info: dict[str, float] | None = None
    if secagg:
        shares, threshold = secaggplus_settings(num_sites)
        shares = num_shares if num_shares is not None else shares
        threshold = reconstruction_threshold if reconstruction_threshold is not None else threshold
        workflow = SecAggPlusWorkflow(
            num_shares=shares, reconstruction_threshold=threshold, max_weight=max_weight
        )
        sa_info = {
            "num_shares": shares,
            "reconstruction_threshold": threshold,
            "max_weight": max_weight,
        }

    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=num_sites,
        min_evaluate_clients=0,
        min_available_clients=num_sites,
        initial_parameters=ndarrays_to_parameters(init),
        on_fit_config_fn=lambda r: {ROUND_KEY: r},
    )
    with tempfile.TemporaryDirectory(prefix="flower-secaggplus-") as tmp:
        log_path = Path(tmp) / "bytes.jsonl"
        log_path.touch()
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        run_simulation(
            server_app=make_server_app(strategy, rounds, workflow),
            client_app=make_client_app(str(log_path), secagg=secagg),
            num_supernodes=num_sites,
            backend_config=BACKEND_CONFIG,
        )
        wall = time.perf_counter() - start
        done = sorted(strategy.round_seconds)
        _check_complete(strategy, num_sites, rounds, log_path)
        stages = _per_stage(log_path, [str(r) for r in done[1:] or done])
    up = sum(v["up"] for v in stages.values()) if stages else None
    down = sum(v["down"] for v in stages.values()) if stages else None
    return {
        "round_seconds": [strategy.round_seconds[r] for r in done],
        "server_cpu_seconds": [strategy.server_cpu[r] for r in done],
        "bytes_per_site": round(up) if up is not None else None,
        "download_bytes_per_site": round(down) if down is not None else None,
        "stages": stages,
        "num_parameters": sum(int(a.size) for a in init),
        "num_sites": num_sites,
        "secagg": sa_info,
        "aggregate_round1": strategy.aggregates.get(1),
        "wall_seconds": wall,
        "loadavg_1min": [load_before, os.getloadavg()[0]],
    }


# ---- the report ---------------------------------------------------------------------


def masked_vector_bytes(num_parameters: int) -> int:
    """What secaggplus_mod's masked-input stage carries: int64 words, one per parameter
    plus one for the weight factor (without the .npy headers and protobuf framing)."""
    return 8 * (num_parameters + 1)


def steady_round_seconds(round_seconds: list[float]) -> float:
    """Median over the rounds after the first (the first one if there is no other)."""
    later = round_seconds[1:] or round_seconds
    return statistics.median(later) if later else math.nan


def site_cpu_per_round(result: dict[str, Any]) -> float:
    """CPU seconds all sites together spend on one round (mean over the rounds after the
    first, as ``stages`` is)."""
    sites = int(result["num_sites"])
    return sites * sum(float(v["cpu"]) for v in result["stages"].values())


def _measure_in_subprocess(num_sites: int, rounds: int, secagg: bool) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--one",
        str(num_sites),
        "--rounds",
        str(rounds),
        "--mode",
        "secagg" if secagg else "plain",
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _jsonable(result: dict[str, Any]) -> dict[str, Any]:
    agg = result.get("aggregate_round1")
    digest = None if agg is None else [float(np.sum(np.abs(a))) for a in agg]
    return {**result, "aggregate_round1": None, "aggregate_round1_abs_sums": digest}


def _report(num_sites: int, plain: dict[str, Any], sa: dict[str, Any]) -> None:
    params = int(plain["num_parameters"])
    fp32 = 4 * params
    t_plain = steady_round_seconds(plain["round_seconds"])
    t_sa = steady_round_seconds(sa["round_seconds"])
    print(f"\n== N = {num_sites} sites ({params:,} trainable parameters) ==")
    print(f"SecAgg+ settings: {sa['secagg']}")
    print(f"round seconds plain : {[round(x, 2) for x in plain['round_seconds']]}")
    print(f"round seconds secagg: {[round(x, 2) for x in sa['round_seconds']]}")
    print(f"plain  round {t_plain:8.2f} s  (median of the rounds after the first)")
    print(f"secagg round {t_sa:8.2f} s")
    print(f"ratio secagg/plain: {t_sa / t_plain:.2f}x")
    for name, res in (("plain ", plain), ("secagg", sa)):
        up = int(res["bytes_per_site"])
        print(f"{name} upload per site and round: {up:,} B = {up / fp32:.3f}x fp32 dense")
        for stage, v in res["stages"].items():
            print(
                f"    {stage:<24} up {v['up']:>11,.0f} B  down {v['down']:>11,.0f} B  "
                f"site {v['seconds']:5.2f} s, cpu {v['cpu']:5.2f} s "
                f"(training {v['train_seconds']:5.2f} s)"
            )
    cpu_plain, cpu_sa = site_cpu_per_round(plain), site_cpu_per_round(sa)
    srv_plain = steady_round_seconds(plain["server_cpu_seconds"])
    srv_sa = steady_round_seconds(sa["server_cpu_seconds"])
    print(
        f"CPU per round (less sensitive to other load): sites {cpu_plain:.2f} -> {cpu_sa:.2f} s, "
        f"server thread {srv_plain:.3f} -> {srv_sa:.3f} s; "
        f"ratio {(cpu_sa + srv_sa) / (cpu_plain + srv_plain):.3f}x"
    )
    masked = masked_vector_bytes(params)
    print(f"fp32 dense {fp32:,} B; SecAgg+ int64 masked vector {masked:,} B = {masked / fp32:.3f}x")
    a, b = plain.get("aggregate_round1"), sa.get("aggregate_round1")
    if a is not None and b is not None:
        diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))
        print(f"round-1 global model, max |secagg - plain| = {diff:.2e} (quantization)")
    print(
        f"wall: plain {plain['wall_seconds']:.1f} s, secagg {sa['wall_seconds']:.1f} s; "
        f"1-min load average before/after: plain {plain['loadavg_1min']}, "
        f"secagg {sa['loadavg_1min']} (2 cores: above 2 means other work competed)"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sites", default="5,20,50", help="comma-separated numbers of sites")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--one", type=int, help="measure one N in one mode, print one JSON line")
    ap.add_argument("--mode", choices=["plain", "secagg"], default="secagg")
    ap.add_argument(
        "--subprocess", action="store_true", help="run every measurement in its own process"
    )
    args = ap.parse_args(argv)
    if args.one is not None:
        result = measure_flower(args.one, args.rounds, secagg=args.mode == "secagg")
        print(json.dumps(_jsonable(result)))
        return
    model = initial_model()
    print(f"tiny model: {num_trainable(model):,} trainable parameters; noise {NOISE_MULTIPLIER}")
    t0 = time.perf_counter()
    for n in (int(s) for s in args.sites.split(",") if s.strip()):
        if args.subprocess:
            plain = _measure_in_subprocess(n, args.rounds, False)
            sa = _measure_in_subprocess(n, args.rounds, True)
        else:
            plain = measure_flower(n, args.rounds, secagg=False)
            sa = measure_flower(n, args.rounds, secagg=True)
        _report(n, plain, sa)
    print(f"\ntotal wall {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    # Ray pickles what __main__ defines by value, so a per-actor cache defined here would
    # not survive the trip: run main() from this file imported by its module name
    # (its folder is sys.path[0], which Flower hands to the actors' PYTHONPATH).
    importlib.import_module(Path(__file__).stem).main()
