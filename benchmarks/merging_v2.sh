#!/usr/bin/env bash
# Model merging on the v2 world (docs/results.md, "Model merging"): per seed, fine-tune one run per downstream task
# (vanilla, the demo's recipe), merge the three with each rule, evaluate the merged models like the demo's runs.
# Usage: bash benchmarks/merging_v2.sh [OUT=runs/v2-merge] [SEEDS="0 1 2"]
set -euo pipefail
OUT=${1:-runs/v2-merge}
SEEDS=${2:-"0 1 2"}
MMTUNE=${MMTUNE:-.venv/bin/mmtune}
BASE=$(pwd)/assets/tiny-llava-base
WORLD=$OUT/synthetic
DOWN="synthetic:detailed_caption synthetic:count_mc synthetic:attribute_mc"
HELD="synthetic:brief_caption synthetic:color_vqa synthetic:position_vqa synthetic:exists_vqa synthetic:count_vqa synthetic:background_mc"
declare -A SIZE=([detailed_caption]=2000 [count_mc]=1000 [attribute_mc]=1000)
# The merge rules and their settings, fixed before any merge ran (docs/results.md).
declare -A RULE=(
  [task_arithmetic]="--rule task_arithmetic --lam 0.4"
  [ties]="--rule ties --density 0.2 --lam 1.0"
  [breadcrumbs]="--rule breadcrumbs --beta 0.01 --gamma 0.85 --lam 0.4"
  [dare_task_arithmetic]="--rule task_arithmetic --lam 0.4 --dare-p 0.9"
)
mkdir -p "$OUT"
for seed in $SEEDS; do
  for task in detailed_caption count_mc attribute_mc; do
    run=$OUT/$task-seed$seed
    [ -f "$run/final/config.json" ] && continue
    "$MMTUNE" train --config configs/demo.yaml model.path="$BASE" "data.tasks=[{path: 'synthetic:$task', n: ${SIZE[$task]}}]" \
      train.seed="$seed" train.output_dir="$run" train.overwrite=true data.synthetic.dir="$WORLD" \
      "eval.downstream=[]" "eval.heldout=[]" train.progress=false
  done
  base_scores=${BASE_SCORES:-$OUT/base-eval/scores.json}  # BASE_SCORES: reuse the demo runs' base evaluation
  if [ ! -f "$base_scores" ]; then
    "$MMTUNE" eval --model "$BASE" --tasks $DOWN --heldout $HELD --world "$WORLD" --limit 200 --max-new-tokens 40 \
      --batch-size 50 --label base --out "$OUT/base-eval"
  fi
  for rule in "${!RULE[@]}"; do
    merged=$OUT/$rule-seed$seed
    [ -f "$merged-eval/scores.json" ] && continue
    "$MMTUNE" merge "$OUT/detailed_caption-seed$seed" "$OUT/count_mc-seed$seed" "$OUT/attribute_mc-seed$seed" \
      ${RULE[$rule]} --seed "$seed" --out "$merged" --overwrite
    "$MMTUNE" eval --model "$merged" --tasks $DOWN --heldout $HELD --world "$WORLD" --limit 200 --max-new-tokens 40 \
      --batch-size 50 --label "merge: $rule" --base-scores "$base_scores" --out "$merged-eval" --overwrite
  done
done
echo "done: $OUT"
