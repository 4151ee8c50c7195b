"""Peak resident memory and speed of fuse-train, with and without activation checkpointing.

    python -m benchmarks.train_memory --shards out/repro/cache [--steps 8] [--batch-tokens 1536] [--threads 2]

Each configuration runs in a fresh child process: `train_run` for --steps optimizer steps from the untrained pivot
(bf16 autocast, the reproduction's batch size), then the child reads its peak resident size (VmHWM, model loading
included) and the median tokens/s of the steps after the first. Configurations: recipes/sft.yaml, and unified with
recipes/recommended.yaml; each without and with `--activation-checkpointing`. Both members of a pair train on
the same micro-batches, so their ratio is a like-for-like comparison. Prints a table and one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from benchmarks.report import json_line

CHILD = """
import json, statistics, sys
from pathlib import Path
from fuse_trainer.config import resolve_config
from fuse_trainer.data import discover_sources
from fuse_trainer.train import train_run

cfg = resolve_config(json.loads(sys.argv[1]), sys.argv[2])
train_run(cfg, discover_sources(cfg.shards, "smollm2"), Path(cfg.out), log=lambda *_: None)
speeds = [json.loads(line)["tokens_per_s"] for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
peak = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
print(int(peak.split()[1]) // 1024, statistics.median(speeds[1:]))
"""

RECIPES = {"sft": "sft", "unified": "recommended"}  # label -> recipe (recipes/*.yaml)


def measure(settings: dict, recipe: str) -> tuple[int, float]:
    """(peak MiB, median tokens/s) of one fuse-train run of `recipe` with `settings` in a fresh process."""
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(settings), recipe], check=True, capture_output=True,
                         text=True).stdout.split()
    return int(out[-2]), float(out[-1])


@click.command(help=__doc__)
@click.option("--shards", required=True, type=click.Path(exists=True, file_okay=False), help="Cache root (aligned to smollm2).")
@click.option("--steps", default=8, show_default=True, help="Optimizer steps per configuration.")
@click.option("--batch-tokens", default=1536, show_default=True)
@click.option("--threads", default=2, show_default=True)
def main(shards: str, steps: int, batch_tokens: int, threads: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe, name in RECIPES.items():
            for recompute in (False, True):
                settings = {"shards": shards, "max_steps": steps, "batch_tokens": batch_tokens, "threads": threads,
                            "save_every": 0, "activation_checkpointing": recompute,
                            "out": str(Path(tmp) / f"{recipe}-{recompute}")}
                peak, speed = measure(settings, name)
                rows.append({"recipe": recipe, "activation_checkpointing": recompute, "peak_mib": peak,
                             "tokens_per_s": round(speed, 1)})
                click.echo(f"{recipe:8s} checkpointing={recompute!s:5s} peak {peak:6d} MiB  {speed:7.1f} tokens/s",
                           err=True)
    print(f"{'recipe':8s} {'peak MiB':>9s} {'with ckpt':>9s} {'ratio':>6s} {'tok/s':>7s} {'with ckpt':>9s} {'ratio':>6s}")
    for plain, recomputed in zip(rows[::2], rows[1::2]):
        print(f"{plain['recipe']:8s} {plain['peak_mib']:9d} {recomputed['peak_mib']:9d} "
              f"{recomputed['peak_mib'] / plain['peak_mib']:6.2f} {plain['tokens_per_s']:7.1f} "
              f"{recomputed['tokens_per_s']:9.1f} {recomputed['tokens_per_s'] / plain['tokens_per_s']:6.2f}")
    print(json_line("train_memory", steps=steps, batch_tokens=batch_tokens, threads=threads, runs=rows))


if __name__ == "__main__":
    main()
