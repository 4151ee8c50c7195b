"""Does InfiGFusion's graph-on-logits term help the recommended recipe? Validation bits per byte, same records and steps.

    python -m experiments.graph_term --cache out/graph/cache --out out/graph/runs --weights 1,10 [--steps 12]
        [--eval-every 4] [--threads 1] [--seed 0]

Trains, with `fuse-train --mode unified --recipe recommended` and the flags below, one run without the term (`rec`)
and one per weight (`rec-g<w>`, `--graph-weight w`), plus the SFT baseline (`sft`, `--recipe sft`); every run scores
the validation split every `--eval-every` steps (`--eval-split validation`). A run whose final/ exists is not
trained again. Prints, per run and scored step, the validation bits per byte per domain and pooled, and the mean
graph and fusion terms the run logged; then one JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click

TRAIN = [sys.executable, "-c", "from fuse_trainer.cli import train; train()"]


def arms(weights: list[float]) -> dict[str, list[str]]:
    """Run name -> its fuse-train flags besides the common ones."""
    fused = ["--mode", "unified", "--recipe", "recommended"]
    return {"rec": fused, **{f"rec-g{w:g}": [*fused, "--graph-weight", f"{w:g}"] for w in weights},
            "sft": ["--recipe", "sft"]}


def scored_steps(run: Path) -> list[dict]:
    """The logged steps of a run that carry validation figures, with the run's mean graph and fusion terms."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    mean = {term: sum(r.get(term, 0.0) for r in rows) / len(rows) for term in ("graph", "fusion")}
    return [{"step": r["step"], **r["val_bpb"], **{f"mean {t}": v for t, v in mean.items()}}
            for r in rows if "val_bpb" in r]


@click.command(help=__doc__)
@click.option("--cache", required=True, type=click.Path(exists=True, file_okay=False), help="Aligned cache root.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder of the runs.")
@click.option("--weights", default="1,10", show_default=True, help="Comma-separated --graph-weight values.")
@click.option("--steps", default=12, show_default=True, help="Optimizer steps of every run.")
@click.option("--eval-every", default=4, show_default=True, help="Steps between validation scorings.")
@click.option("--threads", default=1, show_default=True, help="torch CPU threads per run.")
@click.option("--seed", default=0, show_default=True)
def main(cache: str, out: str, weights: str, steps: int, eval_every: int, threads: int, seed: int) -> None:
    common = ["--shards", cache, "--max-steps", str(steps), "--save-every", "0", "--eval-split", "validation",
              "--eval-every", str(eval_every), "--threads", str(threads), "--seed", str(seed)]
    results = {}
    for name, flags in arms([float(w) for w in weights.split(",") if w]).items():
        run = Path(out) / name
        if not (run / "final" / "fusion_config.yaml").exists():
            run.mkdir(parents=True, exist_ok=True)
            with open(run.with_name(f"{name}.log"), "w") as log:
                subprocess.run([*TRAIN, *common, *flags, "--out", str(run)], stdout=log, stderr=subprocess.STDOUT,
                               check=True)
        results[name] = scored_steps(run)
    domains = [k for k in results["rec"][0] if k not in ("step", "all", "mean graph", "mean fusion")]
    columns = [*domains, "all", "mean graph", "mean fusion"]
    print(f"{'run':10s} {'step':>4s}" + "".join(f"{c:>12s}" for c in columns))
    for name, rows in results.items():
        for row in rows:
            print(f"{name:10s} {row['step']:4d}" + "".join(f"{row[c]:12.4f}" for c in columns))
    print(json.dumps({"steps": steps, "seed": seed, "validation_bpb": results}))


if __name__ == "__main__":
    main()
