#!/usr/bin/env bash
# One short prepared check on a GPU machine (time on one is scarce: run it once):
#   1. which device the sites pick;
#   2. the CUDA tests (pytest -m cuda: the DP step on the GPU is the CPU's step in exact
#      float32, TF32 switched off; DP-LoRA learns there; features match the CPU's);
#   3. one 3-site round of the real simulation (Flower Simulation Engine, DP on; sites
#      join a secure sum of 3 or more);
#   4. a short minilm-lora federation (DP-LoRA on the pretrained encoder, secure
#      aggregation; scenario rt-lora, LORA_ROUNDS rounds): accuracy and time per round;
#   5. examples/s of the sites' own DP training loop (common/training.py train_dp) for
#      the tiny model and minilm-lora, on the GPU against the CPU;
#   6. P1 for minilm-lora on the GPU: DP step / non-private step, book-keeping and
#      Opacus hooks (benchmarks/dp_step.py --model minilm-lora --device cuda).
# Prints the figures; exits non-zero when no CUDA device is visible or a step fails
# (ALLOW_CPU=1 runs it anyway on the CPU, to check the script itself; then set
# LORA_ROUNDS=1 LORA_SITES=6 (3 a round), or the federation takes most of an hour).
#
#   make setup && benchmarks/gpu_check.sh            # a few minutes on a GPU machine
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
LORA_ROUNDS=${LORA_ROUNDS:-5}
LORA_SITES=${LORA_SITES:-10}

echo "== CUDA tests (pytest -m cuda; skipped without a device)"
"$PY" -m pytest -q -p no:cacheprovider -m cuda -rs tests/unit 2>&1 | tail -15

echo "== 3-site simulation, 1 round (fedsilo simulate)"
start=$(date +%s.%N)
"$VENV/bin/fedsilo" simulate --sites 3 --rounds 1 --out "$OUT/sim" --set min-partition-size=20 \
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
sys.exit(0 if r["trained"] == r["sites_asked"] else f"only {r['trained']} sites trained: {r['reason']}")
EOF

echo "== minilm-lora federation: scenario rt-lora, $LORA_SITES sites, $LORA_ROUNDS rounds"
start=$(date +%s.%N)
"$VENV/bin/fedsilo" simulate --scenario rt-lora --rounds "$LORA_ROUNDS" --sites "$LORA_SITES" \
  --out "$OUT/lora" > "$OUT/lora.log" 2>&1 || { tail -40 "$OUT/lora.log"; exit 1; }
end=$(date +%s.%N)
"$PY" - "$OUT/lora/summary.json" "$start" "$end" <<'EOF'
import json
import sys

summary = json.load(open(sys.argv[1]))
def show(x, fmt=".4f"):
    return "n/a" if x is None else format(x, fmt)

for r in summary["rounds"]:
    print(
        f"round {r['round']}: {r['trained']}/{r['sites_asked']} sites, accuracy {show(r['accuracy'])}, "
        f"round {r['seconds']:.1f} s, {r['upload_kib']:.1f} KiB/site, epsilon max "
        f"{show(r['epsilon_max'], '.3f')} {r['reason']}"
    )
print(f"final accuracy {show(summary['final']['accuracy'])}; whole command "
      f"{float(sys.argv[3]) - float(sys.argv[2]):.1f} s")
sys.exit(0 if summary["final"]["rounds_completed"] == len(summary["rounds"]) else "a round failed")
EOF

echo "== DP-SGD examples/s of the sites' train_dp (batch 256, 48 tokens)"
"$PY" - <<'EOF'
import time

import torch

from common.model import ModelSpec, build_model
from common.secure_random import SecureRandom
from common.text import VOCAB_SIZE
from common.training import Batchable, train_dp

n, batch, length = 4096, 256, 48
g = torch.Generator().manual_seed(0)
ids = torch.randint(1000, VOCAB_SIZE, (n, length), generator=g)
data = Batchable(ids, torch.ones_like(ids, dtype=torch.bool), torch.randint(0, 2, (n,), generator=g))
devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
for preset in ("tiny", "minilm-lora"):
    for name in devices:
        device = torch.device(name)
        steps = 10 if name == "cuda" else (3 if preset == "tiny" else 1)
        for sigma in (0.0, 1.0):
            model = build_model(ModelSpec.preset(preset, num_classes=2, max_length=length), seed=0)
            kwargs = dict(sample_rate=batch / n, noise_multiplier=sigma, clip_norm=1.5,
                          learning_rate=1.0, device=device)
            train_dp(model, data, steps=1, rng=SecureRandom(bytes(32)), **kwargs)  # warm-up
            if name == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            train_dp(model, data, steps=steps, rng=SecureRandom(bytes([1]) * 32), **kwargs)
            if name == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / steps
            print(f"{preset:<12} {name:4s} sigma {sigma:.1f}: {dt * 1000:8.1f} ms/step, "
                  f"{batch / dt:8.0f} examples/s")
EOF

if [[ "${ALLOW_CPU:-0}" != 1 ]]; then
  echo "== P1 on the GPU: DP step / non-private step, minilm-lora and tiny"
  "$PY" benchmarks/dp_step.py --model minilm-lora --device cuda --threads default --reps 10
  "$PY" benchmarks/dp_step.py --device cuda --threads default --reps 10 --no-attempts 2>&1 \
    | grep -E "^P1|cores"
fi
echo "outputs in $OUT"
