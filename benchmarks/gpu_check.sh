#!/usr/bin/env bash
# The CUDA path end to end, in one short run: GPU-vs-CPU parity tests, cache-build scoring against the bare trunk
# and the logit forward (bf16, chunked top-k, with and without --fused-epilogue, Triton on CUDA) for the three real
# architectures, the cache-build and fuse-train commands on cuda, the cache checked by CPU rescoring, the fusion/SFT
# and online/cached step ratios, torch.profiler tables, and cache-build with a device map against the plain build,
# and fuse-train --fsdp on every visible GPU (bf16 FSDP2, sharded checkpoint, kill and resume) against data-parallel
# training.
# Every figure lands in $OUT/gpu_check.log.
#
#   bash benchmarks/gpu_check.sh                      # the real models (smollm2, qwen, gemma3)
#   RANDOM_FROM=.gpu bash benchmarks/gpu_check.sh     # random weights from .gpu/<name>/ (config + tokenizer)
#
# RANDOM_FROM is for a GPU machine that the real weights cannot reach: see benchmarks/random_init.py. Made here with
#   for n in smollm2 qwen gemma3; do d=.gpu/$n; mkdir -p $d; m=$(ls -d ~/.cache/logit-cache-fusion/models/$n-*/hf)
#     cp $m/config.json $m/tokenizer_config.json $d/; xz -c $m/tokenizer.json > $d/tokenizer.json.xz; done
# Knobs: DEVICE (cuda), COPIES (10: the corpus is scored this many times), REPEATS (5), RECORDS (1000: at most
# this many records of data/, spread over it), CHUNK (2048: --position-chunk of the scoring), STEPS (30),
# PY (python3), OUT, WORK, NGPU (every visible GPU: ranks of the --fsdp check).
set -euo pipefail
DEVICE=${DEVICE:-cuda}
COPIES=${COPIES:-10}
STEPS=${STEPS:-30}
REPEATS=${REPEATS:-5}
RECORDS=${RECORDS:-1000}
CHUNK=${CHUNK:-2048}
PY=${PY:-python3}
OUT=${OUT:-out/gpu_check}
WORK=${WORK:-/tmp/lcf-gpu-check}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

cli() {  # cli NAME ARGS...: a console script of pyproject.toml, run from this checkout (no install needed)
  "$PY" -c "import importlib, sys, tomllib
name = sys.argv.pop(1)
module, function = tomllib.load(open('pyproject.toml', 'rb'))['project']['scripts'][name].split(':')
sys.argv[0] = name
getattr(importlib.import_module(module), function)()" "$@"
}
mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/gpu_check.log") 2>&1

echo "== machine"
date -u
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

if [ -n "${RANDOM_FROM:-}" ]; then
  echo "== random weights, real architectures and tokenizers (from $RANDOM_FROM)"
  for name in smollm2 qwen gemma3; do
    "$PY" -m benchmarks.random_init "$RANDOM_FROM/$name" "$WORK/models/$name" --device "$DEVICE"
  done
  PIVOT=$WORK/models/smollm2 QWEN=$WORK/models/qwen GEMMA=$WORK/models/gemma3
else
  PIVOT=smollm2 QWEN=qwen GEMMA=gemma3
fi

echo "== 1/8 parity on the GPU: a fusion micro-batch equals the CPU; the bf16 head equals its float32 copy"
"$PY" -m pytest -q -p no:cacheprovider tests/test_pipeline.py tests/test_scoring.py -k "gpu or cuda"

echo "== 2/8 scoring vs the bare trunk, bf16, $COPIES copies of data/"
for model in "$PIVOT" "$QWEN" "$GEMMA"; do
  "$PY" benchmarks/build_throughput.py --model "$model" --device "$DEVICE" --dtype bf16 --copies "$COPIES" \
    --records "$RECORDS" --batch-tokens 16384 --ways floor,logits,ours,fused --repeats "$REPEATS" --position-chunk "$CHUNK"
done

echo "== 3/8 cache-build on $DEVICE over $COPIES copies of data/, then cache-verify (with CPU rescoring for real weights)"
"$PY" - "$WORK/corpus.jsonl" "$COPIES" "$RECORDS" <<'PYEOF'
import json, sys
out, copies, most = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open("data/corpus.jsonl") as src, open(out, "w") as dst:
    records = [json.loads(line) for line in src]
    records = records[:: max(1, len(records) // most)]  # every split and domain keeps records
    for i in range(copies):  # distinct text per copy: record ids are content hashes
        for r in records:
            key = "text" if "text" in r else "response"
            dst.write(json.dumps({**r, key: r[key] + f"\n\n[copy {i}]"}) + "\n")
PYEOF
rm -rf "$WORK/cache"
for model in "$QWEN" "$GEMMA"; do
  start=$(date +%s%N)
  cli cache-build --model "$model" --corpus "$WORK/corpus.jsonl" --out "$WORK/cache" --pivot "$PIVOT" \
    --dtype bf16 --device "$DEVICE" --batch-tokens 16384 --position-chunk "$CHUNK"
  echo "cache-build $(basename "$model"): $(( ($(date +%s%N) - start) / 1000000 )) ms wall, model load included"
done
cli cache-info "$WORK/cache"
if [ -n "${RANDOM_FROM:-}" ]; then  # random weights tie their top logits: a fresh scoring may order them otherwise
  cli cache-verify "$WORK/cache" || echo "cache-verify FAILED (exit $?)"
else
  cli cache-verify "$WORK/cache" --rescore 8 --device cpu || echo "cache-verify FAILED (exit $?)"
fi

echo "== 4/8 fusion step / SFT step, and online distillation / fusion step, on $DEVICE (2 sources)"
for loss in topk-kl infifusion; do
  "$PY" -m benchmarks.train_step --cache "$WORK/cache" --pivot "$PIVOT" --device "$DEVICE" --loss "$loss" \
    --batch-tokens 8192 --repeats "$REPEATS" --online --sources "qwen=$QWEN,gemma3=$GEMMA"
done

echo "== 5/8 fuse-train unified ($STEPS steps) and fuse-eval on $DEVICE"
cli fuse-train --shards "$WORK/cache" --pivot "$PIVOT" --mode unified --recipe uld-raw \
  --max-steps "$STEPS" --batch-tokens 8192 --dtype bf16 --device "$DEVICE" --save-every 0 --out "$WORK/runs/unified"
tail -n 1 "$WORK/runs/unified/metrics.jsonl"
cli fuse-eval --model "pivot=$PIVOT" --model "fused=$WORK/runs/unified/final" --data "$WORK/corpus.jsonl" \
  --split heldout --dtype bf16 --device "$DEVICE"
echo "== 6/8 torch.profiler: cache-build scoring (qwen) and fuse-train micro-batches on $DEVICE"
"$PY" -m benchmarks.profile_steps build --model "$QWEN" --device "$DEVICE" --batch-tokens 16384
"$PY" -m benchmarks.profile_steps train --cache "$WORK/cache" --pivot "$PIVOT" --device "$DEVICE" --batch-tokens 8192
NGPU=${NGPU:-$("$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))")}
echo "== 7/8 cache-build --device-map auto: $(basename "$QWEN") with 700 MiB of GPU memory for weights, the rest in CPU memory"
cli cache-build --model "$QWEN" --corpus "$WORK/corpus.jsonl" --out "$WORK/cache-spread" --dtype bf16 --device "$DEVICE" \
  --batch-tokens 16384 --position-chunk "$CHUNK" --device-map auto --max-memory gpu=700MiB
for shard in "$WORK/cache/$(basename "$QWEN")"/shards/*.parquet; do
  cmp "$shard" "$WORK/cache-spread/$(basename "$QWEN")/shards/$(basename "$shard")" || echo "DIFFERS from the plain build: $shard"
done
echo "== 8/8 fuse-train --fsdp on $NGPU GPU(s): bf16 FSDP2, a sharded checkpoint, a resume, the gathered model; memory and step time against DDP"
torchrun_train() {  # torchrun_train OUT FLAGS...: fuse-train on NGPU ranks of this machine
  local out=$1; shift
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NGPU" --no-python "$PY" -c "import sys
from fuse_trainer.cli import train
sys.argv[0] = 'fuse-train'
train()" --shards "$WORK/cache" --pivot "$PIVOT" --mode unified --recipe uld-raw --fsdp \
    --dtype bf16 --activation-checkpointing --batch-tokens 8192 --grad-accum "$NGPU" --device "$DEVICE" --out "$out" "$@"
}
rm -rf "$WORK/runs/fsdp"
torchrun_train "$WORK/runs/fsdp" --max-steps 12 --save-every 2 & launcher=$!
until [ -e "$WORK/runs/fsdp/checkpoint/trainer_state.pt" ] || ! kill -0 "$launcher" 2>/dev/null; do sleep 0.2; done
"$PY" -c "import psutil, sys
launcher = psutil.Process(int(sys.argv[1]))
for p in [launcher, *launcher.children(recursive=True)]: p.kill()" "$launcher" || true  # kill -9, every rank
wait "$launcher" || true
echo "killed after $(wc -l < "$WORK/runs/fsdp/metrics.jsonl") steps; resuming"
torchrun_train "$WORK/runs/fsdp" --max-steps 12 --save-every 2 --resume
cut -c 1-120 "$WORK/runs/fsdp/metrics.jsonl"
"$PY" -c "import sys; from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); print('gathered model loads:', sum(p.numel() for p in m.parameters()), 'parameters')" "$WORK/runs/fsdp/final"
"$PY" -m benchmarks.train_fsdp --shards "$WORK/cache" --pivot "$PIVOT" --world "$NGPU" --device "$DEVICE" --dtype bf16 \
  --batch-tokens 8192 --steps 6
echo "== done"
