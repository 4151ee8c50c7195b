"""What each rank holds with and without --fsdp, and the step time against data-parallel training (DDP).

    python -m benchmarks.train_fsdp --shards out/fsdp/cache --pivot smollm2 [--steps 6] [--world 2]

Runs fuse-train under torchrun (gloo on CPU, nccl on GPUs) twice with the same settings and the same global batch:
data-parallel, then --fsdp. Each rank counts, after every optimizer step, the bytes it holds in parameters,
gradients and AdamW state (the local shards under --fsdp), the peak resident memory since its optimizer was built
(VmHWM, reset then: model loading excluded) and, on a GPU, the peak allocated CUDA memory; the step time is the
time between two optimizer steps. Prints a table per rank and one JSON line.

Without --shards, a cache is built first: smollm2 as its own source over the first --records records of data/
(the records of its train split are trained on).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

REPO = Path(__file__).resolve().parents[1]

# Runs in each rank: count what the rank holds at every AdamW step, then fuse-train as the command line says.
CHILD = """
import json, os, sys, time
from pathlib import Path
import torch

report, records = Path(os.environ["FSDP_BENCH_OUT"]), []

def local_bytes(tensors):
    return sum((t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size() for t in tensors)

def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

def peak_mib():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

build, step = torch.optim.AdamW.__init__, torch.optim.AdamW.step

def counted_init(self, *args, **kwargs):
    build(self, *args, **kwargs)
    reset_peak()

def counted_step(self, *args, **kwargs):
    params = [p for group in self.param_groups for p in group["params"]]
    result = step(self, *args, **kwargs)
    moments = [v for state in self.state.values() for v in state.values() if torch.is_tensor(v) and v.dim() > 0]
    records.append({"time": time.time(), "params": local_bytes(params),
                    "grads": local_bytes([p.grad for p in params if p.grad is not None]),
                    "optimizer": local_bytes(moments), "peak_rss_mib": peak_mib(),
                    "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None})
    return result

torch.optim.AdamW.__init__, torch.optim.AdamW.step = counted_init, counted_step
from fuse_trainer.cli import train
sys.argv[0] = "fuse-train"
try:
    train()
finally:
    (report / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(records))
"""


def run_world(flags: list[str], world: int, out: Path, port: int) -> list[dict]:
    """fuse-train with `flags` under torchrun with `world` processes; one summary per rank."""
    out.mkdir(parents=True)
    env = {**os.environ, "FSDP_BENCH_OUT": str(out), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world)),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world), "--master-port", str(port),
               "--no-python", sys.executable, "-c", CHILD, *flags, "--out", str(out / "run")]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode:
        raise click.ClickException(f"fuse-train failed:\n{result.stderr[-3000:]}")
    summaries = []
    for rank in range(world):
        records = json.loads((out / f"rank{rank}.json").read_text())
        times = [b["time"] - a["time"] for a, b in zip(records, records[1:])]
        last = records[-1]
        summaries.append({"rank": rank, "params_mib": last["params"] / 2**20, "grads_mib": last["grads"] / 2**20,
                          "optimizer_mib": last["optimizer"] / 2**20, "peak_rss_mib": last["peak_rss_mib"],
                          "peak_cuda_mib": last["peak_cuda_mib"], "step_s": statistics.median(times)})
    return summaries


def build_cache(records: int, root: Path) -> Path:
    """smollm2 as its own source over the first `records` records of data/, aligned to itself."""
    subprocess.run([sys.executable, "-c", "from cache_builder.cli import build; build()", "--model", "smollm2",
                    "--corpus", str(REPO / "data"), "--limit", str(records), "--out", str(root / "cache"), "--pivot",
                    "smollm2", "--device", "cpu"], check=True, capture_output=True, cwd=REPO)
    return root / "cache"


@click.command(help=__doc__)
@click.option("--shards", default=None, type=click.Path(exists=True, file_okay=False), help="Cache root aligned to --pivot.")
@click.option("--pivot", default="smollm2", show_default=True)
@click.option("--records", default=24, show_default=True, help="Records of data/ for the cache built without --shards.")
@click.option("--steps", default=6, show_default=True, help="Optimizer steps per configuration.")
@click.option("--world", default=2, show_default=True, help="Processes (torchrun --nproc-per-node).")
@click.option("--batch-tokens", default=1024, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="fp32", show_default=True)
def main(shards, pivot, records, steps, world, batch_tokens, device, dtype):
    with tempfile.TemporaryDirectory() as tmp:
        shards = shards or str(build_cache(records, Path(tmp)))
        flags = ["--shards", shards, "--pivot", pivot, "--mode", "sft", "--max-steps", str(steps), "--batch-tokens",
                 str(batch_tokens), "--grad-accum", str(world), "--save-every", "0", "--device", device, "--dtype", dtype,
                 "--lr", "1e-5"]
        runs = {"ddp": run_world(flags, world, Path(tmp) / "ddp", 29531),
                "fsdp": run_world(flags + ["--fsdp"], world, Path(tmp) / "fsdp", 29532)}
    print(f"{'run':5s} {'rank':>4s} {'params MiB':>10s} {'grads MiB':>9s} {'AdamW MiB':>9s} {'peak RSS MiB':>12s} "
          f"{'peak CUDA MiB':>13s} {'step s':>7s}")
    for name, ranks in runs.items():
        for r in ranks:
            cuda = f"{r['peak_cuda_mib']:13.0f}" if r["peak_cuda_mib"] is not None else f"{'-':>13s}"
            print(f"{name:5s} {r['rank']:4d} {r['params_mib']:10.1f} {r['grads_mib']:9.1f} {r['optimizer_mib']:9.1f} "
                  f"{r['peak_rss_mib']:12.0f} {cuda} {r['step_s']:7.2f}")
    ratio = {k: statistics.mean(f[k] / d[k] for f, d in zip(runs["fsdp"], runs["ddp"]))
             for k in ("params_mib", "grads_mib", "optimizer_mib", "peak_rss_mib", "step_s")}
    print("fsdp / ddp, mean over ranks: " + ", ".join(f"{k} {v:.2f}" for k, v in ratio.items()))
    print(json.dumps({"pivot": pivot, "world": world, "steps": steps, "batch_tokens": batch_tokens, "dtype": dtype,
                      "runs": runs, "fsdp_over_ddp": ratio}))


if __name__ == "__main__":
    main()
