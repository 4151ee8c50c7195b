"""Plot the training curves of every run under a folder: `python -m fuse_trainer.plot RUNS_DIR OUT.png`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_runs(runs_dir: str | Path, out_png: str | Path) -> Path:
    """One panel for the SFT term, one for the fusion term, a line per metrics.jsonl found under runs_dir; a third
    panel for the validation bits per byte (pooled) of the runs that logged it (fuse-train --eval-every)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(Path(runs_dir).rglob("metrics.jsonl"))
    if not runs:
        raise FileNotFoundError(f"no metrics.jsonl under {runs_dir}")
    logs = {path: [json.loads(line) for line in path.read_text().splitlines() if line.strip()] for path in runs}
    validated = any("val_bpb" in r for rows in logs.values() for r in rows)
    fig, axes = plt.subplots(1, 3 if validated else 2, figsize=(16.5 if validated else 11, 4))
    ax_sft, ax_fusion = axes[:2]
    for path, rows in logs.items():
        label = str(path.parent.relative_to(runs_dir))
        steps = [r["step"] for r in rows]
        ax_sft.plot(steps, [r["sft"] for r in rows], label=label)
        if any(r["fusion"] for r in rows):
            ax_fusion.plot(steps, [r["fusion"] for r in rows], label=label)
        scored = [r for r in rows if "val_bpb" in r]
        if scored:
            axes[2].plot([r["step"] for r in scored], [r["val_bpb"]["all"] for r in scored], marker=".", label=label)
    ax_sft.set(title="SFT cross-entropy (nats per response token)", xlabel="optimizer step")
    ax_fusion.set(title="fusion term (per response token)", xlabel="optimizer step")
    if validated:
        axes[2].set(title="validation bits per byte, all domains (--eval-every)", xlabel="optimizer step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    return Path(out_png)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m fuse_trainer.plot RUNS_DIR OUT.png")
    print(plot_runs(sys.argv[1], sys.argv[2]))
