"""Test support: command lines and configurations for runs over the `world` fixture (tests/conftest.py)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from fuse_trainer.config import TrainConfig


def build_command(world, out: Path) -> list[str]:
    s = world["settings"]["srcq"]
    return [sys.executable, "-c", "from cache_builder.cli import build; build()", "--model", s.model, "--corpus",
            str(world["corpus"]), "--out", str(out), "--top-k", "4", "--rows-per-shard", "1", "--batch-tokens", "256",
            "--position-chunk", "16"]


def train_config(world, out: Path, **overrides) -> TrainConfig:
    base = dict(shards=str(world["cache"]), pivot=str(world["models"]["pivot"]), lr=3e-3, batch_tokens=256,
                max_steps=6, out=str(out), save_every=0, lam=0.5, loss="topk-kl", uld_top_k=4)
    return TrainConfig(**{**base, **overrides}).validate()


def train_args(world, mode: str, *flags: str, shards: str | None = None) -> list[str]:
    """fuse-train's command-line arguments for a short run of `mode` over the world's caches (or `shards`), plus
    `flags`."""
    return ["--shards", shards or str(world["cache"]), "--pivot", str(world["models"]["pivot"]), "--mode", mode,
            "--batch-tokens", "256", *flags]


def run_losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def kill_9_when(command: list[str], path: Path, timeout: float = 120) -> None:
    """Run `command` and kill -9 it as soon as `path` exists (or after `timeout` seconds)."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and not path.exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
