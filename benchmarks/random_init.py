"""A model folder with a real model's architecture and tokenizer but random weights.

    python -m benchmarks.random_init SPEC_DIR OUT_DIR [--device cuda] [--seed 0]

SPEC_DIR holds a real model's `config.json`, `tokenizer_config.json` and `tokenizer.json` (or `tokenizer.json.xz`),
e.g. copied from the converted folders under ~/.cache/logit-cache-fusion/models/*/hf. OUT_DIR becomes a Hugging Face
folder that `cache-build --model OUT_DIR` accepts. For speed and memory measurements on machines the real weights
cannot reach (a GPU box that receives only a few MiB): the cost of a forward pass, of the output layer and of top-k
depends on the shapes, not on the values. Logit values (and so cache contents) are meaningless.
"""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import click
import torch
from transformers import AutoConfig, AutoModelForCausalLM


def random_model_folder(spec: Path, out: Path, device: str = "cpu", seed: int = 0) -> Path:
    """Write OUT: the spec's config and tokenizer files, plus bf16 random weights from the config's initializer."""
    out.mkdir(parents=True, exist_ok=True)
    for path in spec.iterdir():
        if path.name.endswith(".xz"):
            with lzma.open(path) as packed:
                (out / path.name[: -len(".xz")]).write_bytes(packed.read())
        elif path.name != "config.json":
            shutil.copy(path, out / path.name)
    config = AutoConfig.from_pretrained(spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    return out


@click.command()
@click.argument("spec", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--device", default="cpu")
@click.option("--seed", default=0)
def main(spec, out, device, seed):
    folder = random_model_folder(spec, out, device, seed)
    click.echo(f"{folder}: random {AutoConfig.from_pretrained(folder).model_type} weights, real tokenizer")


if __name__ == "__main__":
    main()
