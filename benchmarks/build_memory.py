"""Peak resident memory of cache-build's scoring above the loaded model, per source vocabulary size.

    python -m benchmarks.build_memory smollm2 qwen gemma3 [--records 16] [--dtype bf16]

For each model, one fresh child process loads the model, reads its steady resident size (VmRSS), resets the
kernel's peak counter (/proc/self/clear_refs, so the loading transient is not counted), scores the first
--records records of data/ with cache-build's defaults (4,096-token batches, position chunk 256) and reads the
peak (VmHWM). Peak minus steady is what scoring adds: the float32 copy of the output layer (CPU, half-precision
models), two (chunk, vocabulary) float32 buffers and the trunk's activations, never batch x sequence x vocabulary.
Prints a table and one JSON line.
"""

from __future__ import annotations

import subprocess
import sys

import click

from benchmarks.report import json_line

CHILD = """
import sys
from pathlib import Path
from alignment import token_surface
from cache_builder.build import DTYPES, BuildSettings, tokenize
from cache_builder.corpus import load_corpus
from cache_builder.models import load_model, load_tokenizer, resolve_model
from cache_builder.scoring import length_buckets, score_batch

def status_mib(key):
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(key + ":"))
    return int(line.split()[1]) // 1024

name, dtype, records = sys.argv[1], sys.argv[2], int(sys.argv[3])
source = resolve_model(name)
model = load_model(source, DTYPES[dtype])
tokenizer = load_tokenizer(source)
surface = token_surface(tokenizer)
defaults = BuildSettings(model=name)
seqs = [tokenize(r.text, tokenizer, surface, source.add_bos, 2048)[0] for r in load_corpus("data").records[:records]]
steady = status_mib("VmRSS")
Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
for bucket in length_buckets([len(s) for s in seqs], defaults.batch_tokens):
    score_batch(model, [seqs[i] for i in bucket], defaults.top_k, defaults.position_chunk)
print(model.get_output_embeddings().weight.shape[0], steady, status_mib("VmHWM"))
"""


def measure(name: str, dtype: str, records: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, name, dtype, str(records)], check=True,
                         capture_output=True, text=True).stdout.split()
    vocab, steady, peak = map(int, out[-3:])
    return {"model": name, "vocab": vocab, "loaded_mib": steady, "peak_mib": peak, "extra_mib": peak - steady}


@click.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--records", default=16)
@click.option("--dtype", default="bf16", type=click.Choice(["fp32", "bf16"]))
def main(models, records, dtype):
    rows = [measure(name, dtype, records) for name in models]
    print(f"{'model':10} {'vocab':>8} {'loaded MiB':>11} {'peak MiB':>9} {'extra MiB':>10}")
    for r in rows:
        print(f"{r['model']:10} {r['vocab']:>8} {r['loaded_mib']:>11} {r['peak_mib']:>9} {r['extra_mib']:>10}")
    print(json_line("build_memory", dtype=dtype, records=records, results=rows))


if __name__ == "__main__":
    main()
