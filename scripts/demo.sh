#!/usr/bin/env bash
# The main job on a laptop CPU, from a fresh clone: set up .venv, write the demo corpus (CPython's own
# documentation, offline) and a checked-answer instruction set, train a tokenizer, pretrain the tiny
# model, instruction-tune it (fully, then with LoRA), preference-tune it (DPO on right vs wrong answers),
# improve it by reinforcement learning from an exact-match reward (GRPO), and show held-out loss,
# preference accuracy, rewards and the task metrics of answers before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh requirements.txt requirements-eval.txt
PY=.venv/bin/python
export TF_CPP_MIN_LOG_LEVEL=2
DEMO=${DEMO_DIR:-demo}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-600}
SFT_STEPS=${SFT_STEPS:-1000}
DPO_STEPS=${DPO_STEPS:-300}
GRPO_STEPS=${GRPO_STEPS:-200}
START=$(date +%s)
TOK="$DEMO/tokenizer.model"
score() {  # $1: checkpoint, $2: label
  $PY -m model.evaluate generate-metrics --ckpt "$1" --tokenizer "$TOK" --data "$DEMO/sft_data/eval.jsonl" \
    --chat-template llama2 --max-new-tokens 16 --label "$2" --json-out "$1/task_metrics.json" \
    --output "$1/answers.jsonl"
}

echo "== 1/9 demo corpus and instruction set"
$PY -m data.demo_corpus --out "$DEMO/data" --sft_out "$DEMO/sft_data" --preference_out "$DEMO/dpo_data" \
  --grpo_out "$DEMO/grpo_data"
echo "== 2/9 tokenizer"
$PY -m data.tokenizer --input="$DEMO/data/train.jsonl" --format=jsonl --vocab_size=2048 --out="$TOK"
echo "== 3/9 pretraining (configs/tiny.py, $PRETRAIN_STEPS steps)"
$PY -m train.pretrain --config=configs/tiny.py --workdir="$DEMO/pretrain" \
  --config.train.steps="$PRETRAIN_STEPS" --config.data.train_files="$DEMO/data/train.jsonl" \
  --config.data.eval_files="$DEMO/data/eval.jsonl" --config.data.tokenizer="$TOK"
echo "== 4/9 held-out questions, before instruction tuning"
score "$DEMO/pretrain" "Before instruction tuning: "
echo "== 5/9 instruction tuning (configs/sft_tiny.py, $SFT_STEPS steps)"
$PY -m train.sft --config=configs/sft_tiny.py --workdir="$DEMO/sft" --config.init_from="$DEMO/pretrain" \
  --config.train.steps="$SFT_STEPS" --config.data.train_files="$DEMO/sft_data/train.jsonl" \
  --config.data.eval_files="$DEMO/sft_data/eval.jsonl" --config.data.tokenizer="$TOK" \
  --config.eval.generation.metrics=exact_match,f1,rougeL --config.eval.generation.num_prompts=150 \
  --config.eval.generation.max_new_tokens=16
echo "== 6/9 held-out questions, after instruction tuning"
score "$DEMO/sft" "After instruction tuning: "
$PY -m model.generate --ckpt "$DEMO/sft" --tokenizer "$TOK" --chat-template llama2 --max-new-tokens 8 \
  --prompt "What is the last word of this sentence?
Every program has a beginning and an end" \
  --prompt "How many words are in this sentence?
The answer is written below"
echo "== 7/9 LoRA instruction tuning instead (configs/sft_tiny_lora.py: rank-16 adapters, base frozen)"
$PY -m train.sft --config=configs/sft_tiny_lora.py --workdir="$DEMO/sft_lora" \
  --config.init_from="$DEMO/pretrain" --config.train.steps="$SFT_STEPS" \
  --config.data.train_files="$DEMO/sft_data/train.jsonl" --config.data.eval_files="$DEMO/sft_data/eval.jsonl" \
  --config.data.tokenizer="$TOK"
score "$DEMO/sft_lora" "After LoRA instruction tuning: "
echo "== 8/9 preference tuning of the instruction-tuned model (configs/dpo_tiny.py: DPO, $DPO_STEPS steps)"
$PY -m train.dpo --config=configs/dpo_tiny.py --workdir="$DEMO/dpo" --config.init_from="$DEMO/sft" \
  --config.train.steps="$DPO_STEPS" --config.data.train_files="$DEMO/dpo_data/train.jsonl" \
  --config.data.eval_files="$DEMO/dpo_data/eval.jsonl" --config.data.tokenizer="$TOK"
score "$DEMO/dpo" "After preference tuning: "
echo "== 9/9 reinforcement learning from rewards (configs/grpo_tiny.py: GRPO, exact-match reward, $GRPO_STEPS steps)"
$PY -m train.grpo --config=configs/grpo_tiny.py --workdir="$DEMO/grpo" --config.init_from="$DEMO/sft" \
  --config.train.steps="$GRPO_STEPS" --config.data.train_files="$DEMO/grpo_data/train.jsonl" \
  --config.data.eval_files="$DEMO/grpo_data/eval.jsonl" --config.data.tokenizer="$TOK"

$PY - "$DEMO" "$START" <<'PYEOF'
import json, sys, time
demo, start = sys.argv[1], int(sys.argv[2])
def evals(run):
  return json.load(open(f'{demo}/{run}/eval_results.json'))
pre, sft, lora, dpo = evals('pretrain'), evals('sft'), evals('sft_lora'), evals('dpo')
before, after, after_lora = (json.load(open(f'{demo}/{r}/task_metrics.json'))['metrics']
                             for r in ('pretrain', 'sft', 'sft_lora'))
after_dpo = json.load(open(f'{demo}/dpo/task_metrics.json'))['metrics']
first_dpo = next(e for e in dpo if e['step'] > 0)
print('\n== Summary')
print(f"Pretraining held-out loss: {pre[0]['eval_loss']:.3f} (step {pre[0]['step']}) -> "
      f"{pre[-1]['eval_loss']:.3f} (step {pre[-1]['step']})")
print(f"Instruction tuning held-out answer loss: {sft[0]['eval_loss']:.3f} (step {sft[0]['step']}) -> "
      f"{sft[-1]['eval_loss']:.3f} (step {sft[-1]['step']})")
print(f"LoRA instruction tuning held-out answer loss: {lora[0]['eval_loss']:.3f} -> {lora[-1]['eval_loss']:.3f}")
print(f'Held-out answers ({len(open(f"{demo}/sft/answers.jsonl").readlines())}): before tuning -> after '
      'full instruction tuning | after LoRA instruction tuning')
for name, key in (('exact match', 'exact_match'), ('token F1', 'f1'), ('ROUGE-1', 'rouge1'),
                  ('ROUGE-2', 'rouge2'), ('ROUGE-L', 'rougeL'), ('BLEU', 'bleu'), ('chrF', 'chrf')):
  print(f'  {name:12} {before[key]:5.1f} -> {after[key]:5.1f} | {after_lora[key]:5.1f}')
print(f"Preference tuning held-out preference accuracy: {100 * dpo[0]['eval_rewards/accuracies']:.1f}% "
      f"(step 0) -> {100 * first_dpo['eval_rewards/accuracies']:.1f}% (step {first_dpo['step']}) -> "
      f"{100 * dpo[-1]['eval_rewards/accuracies']:.1f}% (step {dpo[-1]['step']}); exact match "
      f"{after['exact_match']:.1f}% -> {after_dpo['exact_match']:.1f}%")
grpo = evals('grpo')
rollouts = [json.loads(line) for line in open(f'{demo}/grpo/metrics.jsonl')]
rewards = [m['reward'] for m in rollouts if 'reward' in m]
sampling = sum(m['time/sampling_s'] for m in rollouts if 'time/sampling_s' in m)
print(f"Reinforcement learning, held-out exact match ({sum(1 for _ in open(f'{demo}/grpo_data/eval.jsonl'))} "
      "questions): "
      + ' -> '.join(f"{e['eval_exact_match']:.1f}% (step {e['step']})" for e in grpo)
      + f"; training reward {rewards[0]:.3f} -> {rewards[-1]:.3f}; {sampling:.0f} s of its time sampling")
print(f"Demo wall time: {time.time() - start:.0f} s")
PYEOF
