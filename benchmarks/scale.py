"""P5: peak memory of a simulation with 1,000 sites / with 10 sites.

Both runs sample the same number of sites per round (10), so they do the same work;
only the population grows. Simulated sites exist only while they handle a message
(Ray runs them on one actor per core), so memory should not grow with the number of
sites. Each run is ``fedsilo simulate`` in a child process; the peak is the largest
sum of resident memory (RSS, from /proc) over that process and all its descendants
(the Ray head, raylet and actors), sampled every 0.2 s. Shared pages count once per
process, the same way in both runs.

    .venv/bin/python benchmarks/scale.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(parent, []).append(int(entry))
    return tree


def tree_rss(root: int) -> int:
    """Bytes resident in ``root`` and all its descendants."""
    tree, total, todo = _children(), 0, [root]
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def peak_memory(num_sites: int, per_round: int, rounds: int) -> tuple[int, float]:
    """Peak tree RSS (bytes) and wall seconds of one simulation."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            str(ROOT / ".venv" / "bin" / "fedsilo"),
            "simulate",
            "--sites",
            str(num_sites),
            "--rounds",
            str(rounds),
            "--partition",
            "iid",
            "--out",
            str(Path(tmp) / "run"),
            "--set",
            "min-partition-size=5",
            "--set",
            f"fraction-train={per_round / num_sites}",
        ]
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(proc.pid))
            time.sleep(0.2)
        if proc.returncode != 0:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise RuntimeError(f"simulation with {num_sites} sites failed:\n{err}")
        return peak, time.monotonic() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--sites", default="10,1000")
    args = parser.parse_args(argv)
    print(
        f"cores: {os.cpu_count()}; {args.per_round} sites sampled per round, {args.rounds} rounds"
    )
    peaks = {}
    for n in (int(x) for x in args.sites.split(",")):
        peak, wall = peak_memory(n, args.per_round, args.rounds)
        peaks[n] = peak
        print(f"{n:>5} sites: peak {peak / 2**20:8.0f} MiB, {wall:6.1f} s", flush=True)
    small, large = min(peaks), max(peaks)
    print(f"P5 peak memory {large} sites / {small} sites: {peaks[large] / peaks[small]:.2f}x")


if __name__ == "__main__":
    main()
