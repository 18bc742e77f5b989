#!/usr/bin/env bash
# One short check on a GPU machine: which device the sites pick, one 2-site round of
# the real simulation (Flower Simulation Engine, DP on), and the DP-SGD step time of
# the sites' own training loop (common/training.py) on the GPU against the CPU.
# Prints the figures; exits non-zero when no CUDA device is visible (ALLOW_CPU=1 runs
# it anyway, to check the script itself).
#
#   make setup && benchmarks/gpu_check.sh            # about 1-2 minutes on a GPU machine
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
OUT=$(mktemp -d "${TMPDIR:-/tmp}/fedsilo-gpu-check.XXXXXX")
export FLWR_HOME="$OUT/flwr" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 \
       FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 HF_HUB_OFFLINE=1 \
       RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 PYTHONPATH="$PWD"

echo "== device"
status=0
"$PY" - <<'EOF' || status=$?
import sys

import torch

from common.training import default_device

print(f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuda available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"  cuda:{i} {p.name}, {p.total_memory / 2**30:.0f} GiB")
print(f"sites train on: {default_device()}")
sys.exit(0 if torch.cuda.is_available() else 3)
EOF
if [[ $status -ne 0 && "${ALLOW_CPU:-0}" != 1 ]]; then
  echo "no CUDA device visible; set ALLOW_CPU=1 to run the check on the CPU" >&2
  exit 1
fi

echo "== 2-site simulation, 1 round (fedsilo simulate)"
start=$(date +%s.%N)
"$VENV/bin/fedsilo" simulate --sites 2 --rounds 1 --out "$OUT/sim" --set min-partition-size=20 \
  > "$OUT/simulate.log" 2>&1 || { tail -40 "$OUT/simulate.log"; exit 1; }
end=$(date +%s.%N)
"$PY" - "$OUT/sim/summary.json" "$start" "$end" <<'EOF'
import json
import sys

summary = json.load(open(sys.argv[1]))
r = summary["rounds"][0]
print(
    f"round 1: {r['trained']}/{r['sites_asked']} sites trained, accuracy {r['accuracy']:.4f}, "
    f"loss {r['loss']:.4f}, round {r['seconds']:.1f} s, whole command "
    f"{float(sys.argv[3]) - float(sys.argv[2]):.1f} s, max site epsilon {summary['final']['epsilon_max']}"
)
EOF

echo "== DP-SGD step time (the sites' train_dp, default model, batch 256)"
"$PY" - <<'EOF'
import time

import torch

from common.config import RunConfig
from common.model import build_model
from common.text import VOCAB_SIZE
from common.training import Batchable, train_dp

cfg = RunConfig()
spec = cfg.model_spec(2)
n = 4096
g = torch.Generator().manual_seed(0)
ids = torch.randint(1000, VOCAB_SIZE, (n, cfg.max_length), generator=g)
data = Batchable(ids, torch.ones_like(ids, dtype=torch.bool), torch.randint(0, 2, (n,), generator=g))
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
for name in devices:
    device = torch.device(name)
    steps = 20 if name == "cuda" else 5
    for sigma in (0.0, 1.0):
        model = build_model(spec, seed=0)
        gen = torch.Generator(device=device).manual_seed(1)
        kwargs = dict(sample_rate=cfg.batch_size / n, noise_multiplier=sigma, clip_norm=cfg.clip_norm,
                      learning_rate=cfg.learning_rate, generator=gen, device=device)
        train_dp(model, data, steps=2, **kwargs)  # warm-up (kernels, allocator)
        if name == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        train_dp(model, data, steps=steps, **kwargs)
        if name == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / steps
        print(f"{name:4s} sigma {sigma:.1f}: {dt * 1000:7.1f} ms/step, "
              f"{cfg.batch_size / dt:8.0f} examples/s")
EOF
echo "outputs in $OUT"
