#!/usr/bin/env bash
# The main job on a laptop CPU, from a fresh clone: set up .venv, write the demo corpus (CPython's own
# documentation, offline), train a tokenizer, pretrain the tiny model, report held-out loss.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=.venv/bin/python
export TF_CPP_MIN_LOG_LEVEL=2
DEMO=${DEMO_DIR:-demo}
STEPS=${DEMO_STEPS:-600}
START=$(date +%s)

echo "== 1/3 demo corpus"
$PY -m data.demo_corpus --out "$DEMO/data"
echo "== 2/3 tokenizer"
$PY -m data.tokenizer --input="$DEMO/data/train.jsonl" --format=jsonl --vocab_size=2048 \
  --out="$DEMO/tokenizer.model"
echo "== 3/3 pretraining (configs/tiny.py, $STEPS steps)"
$PY -m train.pretrain --config=configs/tiny.py --workdir="$DEMO/pretrain" \
  --config.train.steps="$STEPS" --config.data.train_files="$DEMO/data/train.jsonl" \
  --config.data.eval_files="$DEMO/data/eval.jsonl" --config.data.tokenizer="$DEMO/tokenizer.model"

$PY - "$DEMO" "$START" <<'PYEOF'
import json, sys, time
demo, start = sys.argv[1], int(sys.argv[2])
evals = [json.loads(l) for l in open(f'{demo}/pretrain/metrics.jsonl') if 'eval_loss' in l]
first, last = evals[0], evals[-1]
print(f"\nHeld-out loss: {first['eval_loss']:.3f} at step {first['step']} -> "
      f"{last['eval_loss']:.3f} at step {last['step']} "
      f"(perplexity {first['eval_perplexity']:.0f} -> {last['eval_perplexity']:.1f})")
print(f"Demo wall time: {time.time() - start:.0f} s")
PYEOF
