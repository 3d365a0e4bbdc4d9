#!/usr/bin/env bash
# The recipe of the demo model (segbatch/assets/demo.pt, `--model demo`).
#
#   bench/train_demo.sh WORK_DIR [segbatch train options...]
#
# Draws the training scenes (seed 1), a validation set that picks the best
# epoch (seed 3) and a held-out set never used in training (seed 2026, the
# seed `segbatch demo` uses), trains the demo architecture on them and
# prints the held-out mask AP. WORK_DIR/demo.best.pt is the model to ship.
# The shipped model was made on one H100 with: bench/train_demo.sh /tmp/demo --gpu
# (BENCHMARKS.md has the figures); on a CPU expect hours, not minutes.
set -euo pipefail
work=${1:?usage: bench/train_demo.sh WORK_DIR [segbatch train options...]}
shift
segbatch() { python -m segbatch.cli "$@"; }
device=cpu
for arg in "$@"; do [ "$arg" = --gpu ] && device=cuda; done
python -m segbatch.train.synth "$work/train" --count "${TRAIN_SCENES:-3000}" --seed 1
python -m segbatch.train.synth "$work/val" --count 100 --seed 3
python -m segbatch.train.synth "$work/heldout" --count "${HELDOUT_SCENES:-200}" --seed 2026
time segbatch train "$work/train/ground_truth.json" --out "$work/demo.pt" --arch demo \
  --epochs "${EPOCHS:-14}" --batch-size 8 --lr 1e-3 --min-size 256 --max-size 320 \
  --eval-data "$work/val/ground_truth.json" --half --loader-workers "${LOADER_WORKERS:-8}" "$@"
python - "$work" "$device" <<'PY'
import json, sys
from segbatch.train import evaluate_checkpoint
work, device = sys.argv[1:]
stats = evaluate_checkpoint(f"{work}/demo.best.pt", f"{work}/heldout/ground_truth.json", device=device)
print("held-out scenes (seed 2026):", json.dumps({k: round(v, 4) for k, v in stats.items()}))
PY
