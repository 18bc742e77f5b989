"""Fast search for a DP training recipe, without Flower.

Runs the same round as the ClientApp/ServerApp (common/ training and accounting,
server/ optimizers) in one process, site after site, so a recipe can be tried in a
few minutes before it becomes a default. Prints the test accuracy of the global model
and of its moving average (EMA) after every round. The figures in docs/model.md came
from this script, e.g.:

    PYTHONPATH=. python benchmarks/dp_recipe.py --rounds 25 --lr 2 --clip 1.5 \\
        --server-optimizer fedavgm --d-model 128 --layers 1 --d-ff 256 --frozen-projection
"""

from __future__ import annotations

import argparse
import time

import torch

from common.data import load_builtin, partition
from common.model import ModelSpec, build_model
from common.privacy.accounting import calibrate_noise_multiplier
from common.secure_random import SecureRandom
from common.text import encode
from common.training import (
    Batchable,
    batches_per_epoch,
    evaluate,
    sample_rate,
    train_dp,
)
from server.optimizers import ServerOptimizer, weighted_mean


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=25)
    ap.add_argument("--sites", type=int, default=10)
    ap.add_argument("--partition", default="natural", choices=["natural", "iid", "dirichlet"])
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=2.0)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--clip", type=float, default=1.5)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--no-dp", action="store_true", help="same clipping, no noise")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--d-ff", type=int, default=256)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--frozen-projection", action="store_true")
    ap.add_argument(
        "--server-optimizer", default="fedavgm", choices=["fedavg", "fedavgm", "fedadam"]
    )
    ap.add_argument("--server-lr", type=float, default=1.0)
    ap.add_argument("--server-momentum", type=float, default=0.9)
    ap.add_argument("--ema", type=float, default=0.8)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    t0 = time.time()
    train, test = load_builtin("rotten-tomatoes", "train"), load_builtin("rotten-tomatoes", "test")
    parts = partition(train, a.partition, a.sites, seed=0, alpha=a.alpha, min_size=50)
    spec = ModelSpec(
        num_classes=2,
        max_length=a.max_length,
        d_model=a.d_model,
        num_layers=a.layers,
        num_heads=4,
        d_ff=a.d_ff,
        projection="frozen" if a.frozen_projection else "trainable",
    )
    model = build_model(spec, seed=0)
    weights = {k: v.clone() for k, v in model.trainable_state().items()}
    enc = encode(train.texts, a.max_length)
    test_data = Batchable.from_encoded(encode(test.texts, a.max_length), test.labels)
    sites = [
        Batchable(
            torch.from_numpy(enc.ids[p]),
            torch.from_numpy(enc.mask[p]),
            torch.tensor(train.labels[p]),
        )
        for p in parts
    ]
    plans = []
    for s in sites:
        q = sample_rate(len(s), a.batch_size)
        steps = a.epochs * batches_per_epoch(len(s), a.batch_size)
        sigma = (
            None
            if a.no_dp
            else calibrate_noise_multiplier(
                target_epsilon=a.epsilon, delta=a.delta, sample_rate=q, steps=steps * a.rounds
            )
        )
        plans.append((q, steps, sigma))
    print(
        f"trainable {sum(v.numel() for v in weights.values()):,}; sites {[len(s) for s in sites]}"
    )
    print(
        f"sigma {[round(p[2], 3) if p[2] else None for p in plans]}; setup {time.time() - t0:.1f}s"
    )

    g = SecureRandom(bytes(31) + b"\x01")
    cpu = torch.device("cpu")
    opt = ServerOptimizer(a.server_optimizer, learning_rate=a.server_lr, momentum=a.server_momentum)
    ema: dict[str, torch.Tensor] | None = None
    for rnd in range(1, a.rounds + 1):
        started = time.time()
        deltas, counts = [], []
        for s, (q, steps, sigma) in zip(sites, plans, strict=True):
            m = build_model(spec)
            m.load_trainable_state(weights)
            train_dp(
                m,
                s,
                steps=steps,
                sample_rate=q,
                noise_multiplier=sigma or 0.0,
                clip_norm=a.clip,
                learning_rate=a.lr,
                rng=g,
                device=cpu,
            )
            new = m.trainable_state()
            deltas.append({k: new[k] - weights[k] for k in weights})
            counts.append(float(len(s)))
        weights = opt.step(weights, weighted_mean(deltas, counts))
        ema = (
            {k: v.clone() for k, v in weights.items()}
            if ema is None
            else {k: a.ema * ema[k] + (1 - a.ema) * weights[k] for k in weights}
        )
        model.load_trainable_state(weights)
        raw = evaluate(model, test_data, device=cpu)
        model.load_trainable_state(ema)
        avg = evaluate(model, test_data, device=cpu)
        print(
            f"r{rnd} acc {raw.accuracy:.4f} loss {raw.loss:.4f} ema {avg.accuracy:.4f} "
            f"{avg.loss:.4f} t {time.time() - started:.1f}s",
            flush=True,
        )
    print(f"total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
