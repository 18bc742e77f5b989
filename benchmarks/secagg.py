"""P2 / P3 / P8: what secure aggregation costs, and what fedsilo's coordinator costs over
Flower's, side by side in one run.

For each number of simulated sites N (Flower's Simulation Engine, Ray, one CPU per
site, iid split of Rotten Tomatoes, DP on, the tiny model):

* fedsilo secure round / fedsilo plain round: the median over rounds 2.. of the time
  from sampling to the mean update (site training, all protocol stages, unmasking and
  decoding; the central evaluation and checkpoint are left out, they are the same in
  both modes). Round 1 is left out: it pays for Ray actors starting and for each
  site's one-off noise calibration;
* the protocol's own share of the secure round: the wall time of every exchange but
  the training one (advertise, share keys, open shares before it; consistency and
  unmask after it) and of unmasking, from the round's ``stage_seconds`` (less
  sensitive to other load on the machine than the ratio of two runs made minutes
  apart); the masking itself rides the training exchange;
* the same ratio for Flower's own SecAgg+ on the same site workload
  (benchmarks/flower_secaggplus.py: the anchor);
* P8: fedsilo's plain round / Flower's plain round on the same site workload (what
  fedsilo's coordinator and site add to a round beyond the DP-SGD itself);
* bytes uploaded per site per round (every stage's serialized message content) / the
  fp32 dense size of the trainable parameters, for both.

Each measurement runs in its own process, one after the other. On a shared machine
wall times move with other load: the 1-minute load average is printed with them.

    .venv/bin/python benchmarks/secagg.py --sites 5,20,50 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common.config import RunConfig  # noqa: E402
from common.secagg.encoding import encoding_spec  # noqa: E402


def _fedsilo(num_sites: int, rounds: int, secure: bool, out: Path, bits: int) -> dict[str, Any]:
    from simulations.runner import simulate

    summary = simulate(
        {
            "num-sites": num_sites,
            "num-server-rounds": rounds,
            "partition": "iid",
            "min-partition-size": 20,
            "secure-aggregation": secure,
            "secagg-bits": bits,
            "out-dir": str(out),
        }
    )
    rows = summary.rounds
    if any(r.status != "ok" or r.trained != num_sites for r in rows):
        raise RuntimeError(f"not every site trained in every round: {rows}")
    later = rows[1:] or rows
    uploads = [b for r in later for b in r.upload_bytes.values()]
    protocol = [sum(v for k, v in r.stage_seconds.items() if k != "train") for r in later]
    return {
        "round_seconds": statistics.median(r.aggregate_seconds for r in later),
        "bytes_per_site": statistics.mean(uploads),
        # Wall time of the exchanges other than training (advertise, share keys, open
        # shares, consistency, unmask)
        # and of unmasking: what the protocol adds to a round, robust to a busy machine.
        "protocol_seconds": statistics.median(protocol),
    }


def _one(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if args.system == "fedsilo":
            result = _fedsilo(
                args.one, args.rounds, args.mode == "secure", Path(tmp) / "run", args.bits_one
            )
        else:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            import flower_secaggplus as anchor

            raw = anchor.measure_flower(args.one, args.rounds, secagg=args.mode == "secure")
            result = {
                "round_seconds": anchor.steady_round_seconds(raw["round_seconds"]),
                "bytes_per_site": raw["bytes_per_site"],
            }
    print("RESULT " + json.dumps(result), flush=True)


def _measure(system: str, num_sites: int, rounds: int, mode: str, bits: int = 8) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", str(num_sites), "--rounds", str(rounds)]
    cmd += ["--system", system, "--mode", mode, "--bits-one", str(bits)]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stdout + done.stderr)[-3000:]
        raise RuntimeError(f"{system} {mode} at {num_sites} sites failed:\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    result["wall"] = time.monotonic() - started
    result["load"] = os.getloadavg()[0]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", default="5,20,50")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--system", choices=("fedsilo", "flower"), default="fedsilo")
    parser.add_argument("--mode", choices=("plain", "secure"), default="secure")
    parser.add_argument("--skip-flower", action="store_true", help="fedsilo only")
    parser.add_argument("--bits", default="16,8,4", help="P3: bit widths measured at 10 sites")
    parser.add_argument("--bits-one", type=int, default=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        _one(args)
        return
    cfg = RunConfig()
    from common.model import build_model, model_spec
    from common.task import run_task

    dim = sum(v.numel() for v in build_model(model_spec(run_task(cfg))).trainable_state().values())
    fp32 = 4 * dim
    print(f"cores: {os.cpu_count()}; trainable parameters {dim:,}; fp32 dense {fp32:,} bytes")
    print(
        "masked vector alone (analytic, 10 sites): "
        + ", ".join(
            f"b={b}: {encoding_spec(cfg.with_overrides({'secagg-bits': b}), num_sites=10, seed=0, dim=dim).encoded_bytes / fp32:.3f}x"
            for b in (16, 8, 4)
        )
    )
    header = (
        f"P2 {'N':>3} | {'fedsilo plain':>13} {'secure':>8} {'ratio':>6} {'protocol':>8} "
        f"{'bytes/fp32':>10} | "
        f"{'flower plain':>12} {'SecAgg+':>8} {'ratio':>6} {'bytes/fp32':>10} | load"
    )
    print(header)
    p8: list[str] = []
    for n in (int(x) for x in args.sites.split(",") if x.strip()):
        plain = _measure("fedsilo", n, args.rounds, "plain")
        secure = _measure("fedsilo", n, args.rounds, "secure")
        line = (
            f"P2 {n:>3} | {plain['round_seconds']:12.2f}s {secure['round_seconds']:7.2f}s "
            f"{secure['round_seconds'] / plain['round_seconds']:5.2f}x "
            f"{secure['protocol_seconds']:7.2f}s "
            f"{secure['bytes_per_site'] / fp32:10.3f} | "
        )
        loads = [plain["load"], secure["load"]]
        if args.skip_flower:
            line += f"{'-':>12} {'-':>8} {'-':>6} {'-':>10} | "
        else:
            f_plain = _measure("flower", n, max(2, args.rounds - 1), "plain")
            f_secure = _measure("flower", n, max(2, args.rounds - 1), "secure")
            loads += [f_plain["load"], f_secure["load"]]
            line += (
                f"{f_plain['round_seconds']:11.2f}s {f_secure['round_seconds']:7.2f}s "
                f"{f_secure['round_seconds'] / f_plain['round_seconds']:5.2f}x "
                f"{f_secure['bytes_per_site'] / fp32:10.3f} | "
            )
            p8.append(
                f"{n} sites {plain['round_seconds']:.2f} s / {f_plain['round_seconds']:.2f} s = "
                f"{plain['round_seconds'] / f_plain['round_seconds']:.2f}x"
            )
        print(line + " ".join(f"{x:.1f}" for x in loads), flush=True)
    if p8:
        print(
            "P8 fedsilo plain round / Flower's plain round, same site workload, same run "
            "(goal <= 1.00x): " + "; ".join(p8)
        )
    if args.bits:
        # P3 measured: everything a site uploads in a secure round, at each bit width.
        p3 = []
        for b in (int(x) for x in args.bits.split(",")):
            result = _measure("fedsilo", 10, 2, "secure", bits=b)
            p3.append(f"b={b}: {result['bytes_per_site'] / fp32:.3f}x")
        print("P3 bytes uploaded per site per round / fp32 dense, 10 sites: " + ", ".join(p3))


if __name__ == "__main__":
    main()
