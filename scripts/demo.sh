#!/usr/bin/env bash
# The main job on the shipped default data (data/), with the three real models:
#   pivot SmolLM2-135M-Instruct, sources Qwen2.5-Coder-0.5B-Instruct and Gemma-3-270M.
# cache-build (both sources) -> cache-verify -> fuse-train (SFT baseline, unified, pairwise+merge)
# -> fuse-eval table of held-out bits per byte per domain, and a plot of the training curves.
# Outputs go to $OUT (default out/demo). Rerunning resumes: finished caches are not rebuilt.
# The fused arms train the recommended recipe (recipes/recommended.yaml), the baseline recipes/sft.yaml.
# CORPUS, STEPS, TRAIN_FLAGS, RECIPE and FUSION_FLAGS (extra flags of the fused arms) can be set
# (examples/reproduce.sh does). Every command takes the GPU when torch sees one (--device auto).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
OUT=${OUT:-out/demo}
CORPUS=${CORPUS:-data/}
CACHE=$OUT/cache
DTYPE=${DTYPE:-bf16}          # trunk dtype of the sources; the output layer is always scored in fp32
STEPS=${STEPS:-12}
TRAIN_FLAGS=${TRAIN_FLAGS:-"--max-steps $STEPS --save-every 0"}
RECIPE=${RECIPE:-recommended}
FUSION_FLAGS=${FUSION_FLAGS:-}
mkdir -p "$OUT"

echo "== 1/5 cache-build: run each source once over $CORPUS and align it to the pivot"
cache-build --model qwen --corpus "$CORPUS" --out "$CACHE" --pivot smollm2 --dtype "$DTYPE"
cache-build --model gemma3 --corpus "$CORPUS" --out "$CACHE" --pivot smollm2 --dtype "$DTYPE"

echo "== 2/5 cache-verify: checksums, schema, values, agreement between the sources"
cache-verify "$CACHE"
cache-info "$CACHE"

echo "== 3/5 fuse-train: SFT-only baseline, unified fusion, pairwise fusion + merge (same records, same steps)"
fuse-train --shards "$CACHE" --recipe sft $TRAIN_FLAGS --out "$OUT/runs/sft" --resume
fuse-train --shards "$CACHE" --mode unified --recipe "$RECIPE" $TRAIN_FLAGS $FUSION_FLAGS --out "$OUT/runs/unified" --resume
fuse-train --shards "$CACHE" --mode pairwise --recipe "$RECIPE" $TRAIN_FLAGS $FUSION_FLAGS --out "$OUT/runs/pairwise" --resume

echo "== 4/5 fuse-eval: held-out bits per byte per domain"
fuse-eval --data "$CORPUS" --split heldout \
  --model pivot=smollm2 --model sft=$OUT/runs/sft/final --model unified=$OUT/runs/unified/final \
  --model pairwise+merge=$OUT/runs/pairwise/merged --model qwen=qwen --model gemma3=gemma3 \
  --json-out "$OUT/results.json" | tee "$OUT/results.txt"

echo "== 5/5 plot: training curves -> $OUT/training_curves.png"
python -m fuse_trainer.plot "$OUT/runs" "$OUT/training_curves.png"
