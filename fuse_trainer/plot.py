"""Plot the training curves of every run under a folder: `python -m fuse_trainer.plot RUNS_DIR OUT.png`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_runs(runs_dir: str | Path, out_png: str | Path) -> Path:
    """One panel for the SFT term, one for the fusion term, a line per metrics.jsonl found under runs_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(Path(runs_dir).rglob("metrics.jsonl"))
    if not runs:
        raise FileNotFoundError(f"no metrics.jsonl under {runs_dir}")
    fig, (ax_sft, ax_fusion) = plt.subplots(1, 2, figsize=(11, 4))
    for path in runs:
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        label = str(path.parent.relative_to(runs_dir))
        steps = [r["step"] for r in rows]
        ax_sft.plot(steps, [r["sft"] for r in rows], label=label)
        if any(r["fusion"] for r in rows):
            ax_fusion.plot(steps, [r["fusion"] for r in rows], label=label)
    ax_sft.set(title="SFT cross-entropy (nats per response token)", xlabel="optimizer step")
    ax_fusion.set(title="fusion term (per response token)", xlabel="optimizer step")
    for ax in (ax_sft, ax_fusion):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    return Path(out_png)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m fuse_trainer.plot RUNS_DIR OUT.png")
    print(plot_runs(sys.argv[1], sys.argv[2]))
