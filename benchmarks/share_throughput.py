"""Sharing costs against a real S3-compatible server on localhost (moto's server mode), ratios in one run.

    python -m benchmarks.share_throughput [--shards 16] [--rows-per-shard 64] [--repeats 9] [--train-steps 20]
        [--train-model smollm2] [--train-repeats 2] [--server process|thread] [--link-mbps 1000]

1. pull: `cache-pull` (every file hashed as it arrives, renamed only when its sha256 matches the manifest) against a
   plain fsspec copy of the same files (`fs.get`, s3fs's concurrent download, handed the file list), same server,
   in rotating order, median of `--repeats`; target: throughput ratio >= 0.9. Also against a recursive copy of the
   prefix (`fs.get(..., recursive=True)`), which, like a pull, must list the files first.
2. re-push after one shard changed: bytes uploaded against that shard's size (target: that shard only, plus the
   manifest and the card).
3. fuse-train from `s3://` against the local folder (`--train-steps` steps per run): median step tokens/s ratio,
   target >= 0.95, with an unbounded store (every shard fetched and verified when the caches are opened) and with a
   store bounded below the caches' size (shards evicted and fetched again during training). A warm-up run comes
   first, then `--train-repeats` rounds of the three runs in alternating order. The tiny test models' steps take
   milliseconds; `--train-model smollm2` trains a real pivot (seconds a step on a CPU) on a cache cache-build makes
   of the shipped data/ with the same model as its source.

`--link-mbps N` puts a link of N megabits per second each way between the client and the server (a relay in its
own process that passes every 64 KiB only when the link has carried the bytes before it, over all connections):
a store that is not on the client's own cores, where the download waits on the network rather than on the CPU.

The pulled cache is synthetic (random but valid signals, written by the real writer; tests/fake_cache.py). Prints
one line per measurement and a JSON line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import click

from cache_builder.manifest import load_manifest
from cache_builder.remote import open_location
from cache_builder.share import layer_files, pull_cache, push_cache
from tests.fake_cache import rewrite_shard, write_fake_cache
from tests.s3 import free_port

QUIET = dict(log=lambda *_: None)
REPO = Path(__file__).resolve().parent.parent


def wait_listening(port: int) -> None:
    """Return once something accepts connections on 127.0.0.1:`port`."""
    import socket

    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)


def start_server(in_process: bool) -> tuple[Callable[[], None], str]:
    """moto's S3 server on a free localhost port, with fake credentials in the standard environment: in its own
    process (like a real store: its work is not the client's), or as a thread of this one (it then shares the GIL
    with the client, as the earlier figures were measured)."""
    import subprocess
    import sys

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = free_port()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    if in_process:
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        return server.stop, f"http://127.0.0.1:{port}"
    process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port)
    return process.terminate, f"http://127.0.0.1:{port}"


class LinkDirection:
    """One direction of a link carrying `bytes_per_s`: a chunk is passed on once the link has carried it and
    every chunk before it, whichever connection sent them."""

    def __init__(self, bytes_per_s: float):
        self.bytes_per_s, self.free_at = bytes_per_s, 0.0

    async def carry(self, n: int) -> None:
        now = time.monotonic()
        self.free_at = max(self.free_at, now) + n / self.bytes_per_s
        await asyncio.sleep(self.free_at - now)


async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: LinkDirection) -> None:
    """Copy one direction of a connection through `link` until its sender closes it."""
    try:
        while data := await reader.read(1 << 16):
            await link.carry(len(data))
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


def serve_link(listen_port: int, server_port: int, mbps: float) -> None:
    """Relay 127.0.0.1:listen_port to 127.0.0.1:server_port over a link of `mbps` megabits per second each way."""
    async def serve() -> None:
        up, down = LinkDirection(mbps * 1e6 / 8), LinkDirection(mbps * 1e6 / 8)

        async def connection(client_reader, client_writer) -> None:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", server_port)
            await asyncio.gather(relay(client_reader, server_writer, up), relay(server_reader, client_writer, down),
                                 return_exceptions=True)

        listener = await asyncio.start_server(connection, "127.0.0.1", listen_port)
        await listener.serve_forever()

    asyncio.run(serve())


def start_link(endpoint: str, mbps: float) -> tuple[Callable[[], None], str]:
    """A `mbps` link in its own process in front of the server at `endpoint`; the environment now points at it."""
    port = free_port()
    process = multiprocessing.get_context("spawn").Process(
        target=serve_link, args=(port, int(endpoint.rsplit(":", 1)[1]), mbps), daemon=True)
    process.start()
    wait_listening(port)
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    return process.terminate, f"http://127.0.0.1:{port}"


def time_pull(url: str, cache: Path, work: Path, repeats: int) -> dict:
    """Median seconds of `repeats` cache-pulls and as many plain fsspec copies, in rotating order: one handed the
    list of files (`fs.get` of the shards and the manifest), one that finds them itself (`fs.get(recursive=True)`
    of the prefix, which lists it as a pull must)."""
    loc = open_location(url)
    files = [e.relpath for e in layer_files("", load_manifest(cache))] + ["manifest.json"]
    total = sum((cache / f).stat().st_size for f in files)

    def plain(dest: Path) -> None:
        (dest / "shards").mkdir(parents=True)
        loc.fs.get([loc.path(f) for f in files], [str(dest / f) for f in files])

    kinds = {"plain": plain, "recursive": lambda dest: loc.fs.get(loc.root, str(dest), recursive=True),
             "pull": lambda dest: pull_cache(loc, dest, **QUIET)}
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for i in range(repeats):
        for kind in list(kinds)[i % 3:] + list(kinds)[:i % 3]:
            dest = work / f"pull-{kind}-{i}"
            start = time.perf_counter()
            kinds[kind](dest)
            times[kind].append(time.perf_counter() - start)
            shutil.rmtree(dest)
    median = {kind: statistics.median(t) for kind, t in times.items()}
    return {"bytes": total, "repeats": repeats, "plain_s": median["plain"], "recursive_s": median["recursive"],
            "pull_s": median["pull"], "plain_MBps": total / median["plain"] / 1e6,
            "pull_MBps": total / median["pull"] / 1e6, "ratio": median["plain"] / median["pull"],
            "ratio_recursive": median["recursive"] / median["pull"]}


def repush_one_changed_shard(url: str, cache: Path) -> dict:
    """Rewrite one shard (the same records, other values) and its manifest entry, push again: what is uploaded."""
    changed = rewrite_shard(cache, len(load_manifest(cache)["shards"]) // 2)
    summary = push_cache(cache, open_location(url), **QUIET)
    shards_sent = [p for p in summary.transferred if p.endswith(".parquet")]
    return {"changed_shard_bytes": changed.bytes, "uploaded_bytes": summary.bytes, "uploaded_files": summary.transferred,
            "shards_uploaded": shards_sent, "only_that_shard": shards_sent == [changed.path],
            "cache_bytes": load_manifest(cache)["totals"]["bytes"]}


def tiny_caches(work: Path) -> tuple[Path, dict]:
    """Two sources of the tiny test models aligned to a tiny pivot (steps of milliseconds), and the run's settings."""
    from cache_builder.align import align_cache
    from cache_builder.build import BuildSettings, build_cache
    from tests.conftest import write_corpus
    from tests.tiny import make_tiny_model

    models = {"pivot": make_tiny_model(work / "models" / "pivot", arch="llama", seed=0),
              "srcq": make_tiny_model(work / "models" / "srcq", arch="qwen2", vocab=300, seed=1),
              "srcg": make_tiny_model(work / "models" / "srcg", arch="gemma3", seed=2)}
    corpus = write_corpus(work / "corpus")
    for name in ("srcq", "srcg"):
        build_cache(corpus, BuildSettings(model=str(models[name]), top_k=4, rows_per_shard=5, batch_tokens=256,
                                          position_chunk=16), work / "tcache", **QUIET)
        align_cache(work / "tcache" / name, str(models["pivot"]), **QUIET)
    return work / "tcache", dict(pivot=str(models["pivot"]), lr=3e-3, batch_tokens=256, lam=0.5, uld_top_k=4)


def real_cache(work: Path, model: str, rows_per_shard: int) -> tuple[Path, dict]:
    """`model` as its own source over the shipped data/ (cache-build), aligned to itself as the pivot, and the run's
    settings: a real pivot's step takes seconds on a CPU."""
    from cache_builder.align import align_cache
    from cache_builder.build import BuildSettings, build_cache

    build_cache(REPO / "data", BuildSettings(model=model, rows_per_shard=rows_per_shard), work / "tcache", **QUIET)
    align_cache(work / "tcache" / model, model, **QUIET)
    return work / "tcache", dict(pivot=model, lr=1e-5, batch_tokens=512)


def train_tokens_per_s(work: Path, steps: int, bound_mb: float | None, model: str | None, repeats: int) -> dict:
    """fuse-train's median step tokens/s from the local folder and from s3:// (the same caches, pushed), with an
    unbounded store and with one bounded at `bound_mb` (default: half the aligned shards' bytes), `repeats` rounds
    in alternating order after a warm-up run; each run's first step is left out."""
    from cache_builder.manifest import find_layers
    from fuse_trainer.config import TrainConfig
    from fuse_trainer.train import fuse_train

    cache, settings = real_cache(work, model, rows_per_shard=8) if model else tiny_caches(work)
    push_cache(cache, open_location("s3://bench/train"), **QUIET)
    aligned = sum(load_manifest(layer)["totals"]["bytes"] for layer in find_layers(cache) if layer.parent.name == "aligned")
    bound_mb = bound_mb if bound_mb is not None else aligned / 2 / 1e6
    bounds = {"local": None, "s3": None, "s3-bounded": bound_mb}
    rates: dict[str, list[float]] = {kind: [] for kind in bounds}

    def run(out: Path, **remote) -> Path:
        config = {"shards": str(cache), **settings, **remote}
        fuse_train(TrainConfig(max_steps=steps, out=str(out), save_every=0, **config).validate(), **QUIET)
        return out

    run(work / "warm-up")
    for repeat in range(repeats):
        for kind, bound in (bounds.items() if repeat % 2 == 0 else reversed(bounds.items())):
            remote = dict(shards="s3://bench/train", cache_dir=str(work / f"store-{kind}-{repeat}"),
                          max_local_gb=bound / 1e3 if bound else None) if kind != "local" else {}
            out = run(work / f"run-{kind}-{repeat}", **remote)
            lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            rates[kind] += [line["tokens_per_s"] for line in lines[1:]]  # the first step warms up
    median = {kind: statistics.median(r) for kind, r in rates.items()}
    return {"model": model or "tiny test models", "tokens_per_s": median, "ratio_s3": median["s3"] / median["local"],
            "ratio_s3_bounded": median["s3-bounded"] / median["local"], "steps": steps, "repeats": repeats,
            "aligned_bytes": aligned, "bound_mb": bound_mb}


@click.command()
@click.option("--shards", default=16, help="Shards in the synthetic cache.")
@click.option("--rows-per-shard", default=64)
@click.option("--repeats", default=9, help="Pulls of each kind, interleaved; the median is kept.")
@click.option("--train-steps", default=20, help="fuse-train steps per run (0: skip the training comparison).")
@click.option("--bound-mb", default=None, type=float, help="--max-local-gb of the bounded s3:// training run, in MB "
              "(default: half the aligned shards' bytes), so shards are evicted and fetched again while training.")
@click.option("--train-model", default=None, help="A real model (e.g. smollm2) as its own source and pivot, over data/ "
              "(default: the tiny test models).")
@click.option("--train-repeats", default=2, help="Rounds of the three training runs, in alternating order.")
@click.option("--server", type=click.Choice(["process", "thread"]), default="process", show_default=True,
              help="Run the S3 server in its own process, or as a thread of the benchmark's.")
@click.option("--link-mbps", default=None, type=float,
              help="Reach the server through a link of this many megabits per second each way (default: directly).")
def main(shards, rows_per_shard, repeats, train_steps, bound_mb, train_model, train_repeats, server, link_mbps):
    os.environ["TQDM_DISABLE"] = "1"  # the progress bars of cache-build and fuse-train
    stop_server, endpoint = start_server(in_process=server == "thread")
    stop_link, endpoint = start_link(endpoint, link_mbps) if link_mbps else (None, endpoint)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            cache = work / "cache"
            write_fake_cache(cache, n_rows=shards * rows_per_shard, rows_per_shard=rows_per_shard, k=16,
                             chars=(1500, 3000), max_tokens=600)  # shards of a few MB
            loc = open_location("s3://bench/cache")
            loc.fs.mkdir("bench")
            push_cache(cache, loc, **QUIET)
            pull = time_pull("s3://bench/cache", cache, work, repeats)
            print(f"pull: {pull['bytes'] / 1e6:.1f} MB, cache-pull {pull['pull_MBps']:.1f} MB/s vs plain fsspec copy "
                  f"{pull['plain_MBps']:.1f} MB/s: ratio {pull['ratio']:.2f} (target >= 0.9); vs a recursive copy "
                  f"of the prefix: {pull['ratio_recursive']:.2f}")
            repush = repush_one_changed_shard("s3://bench/cache", cache)
            print(f"re-push after one shard changed: {repush['uploaded_bytes']} bytes uploaded for a "
                  f"{repush['changed_shard_bytes']}-byte shard of a {repush['cache_bytes']}-byte cache; shards sent: "
                  f"{repush['shards_uploaded']}")
            train = train_tokens_per_s(work, train_steps, bound_mb, train_model, train_repeats) if train_steps else None
            if train:
                rate = train["tokens_per_s"]
                print(f"fuse-train tokens/s ({train['model']}): local folder {rate['local']:.0f}, s3:// {rate['s3']:.0f} "
                      f"(ratio {train['ratio_s3']:.2f}), s3:// through a store bounded at {train['bound_mb']:.2f} MB "
                      f"{rate['s3-bounded']:.0f} (ratio {train['ratio_s3_bounded']:.2f}); target >= 0.95")
            print(json.dumps({"benchmark": "share_throughput", "endpoint": endpoint, "server": server,
                              "link_mbps": link_mbps, "shards": shards, "rows_per_shard": rows_per_shard, "pull": pull,
                              "repush": repush, "train": train}))
    finally:
        if stop_link:
            stop_link()
        stop_server()


if __name__ == "__main__":
    main()
