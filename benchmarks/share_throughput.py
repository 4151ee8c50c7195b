"""Sharing costs against a real S3-compatible server on localhost (moto's server mode), ratios in one run.

    python benchmarks/share_throughput.py [--shards 24] [--rows-per-shard 64] [--repeats 3] [--train-steps 6]

1. pull: `cache-pull` (every file hashed as it arrives, renamed only when its sha256 matches the manifest) against a
   plain fsspec copy of the same files (`fs.get`, s3fs's concurrent download), same server, alternating, best of
   `--repeats`; target: throughput ratio >= 0.9.
2. re-push after one shard changed: bytes uploaded against that shard's size (target: that shard only, plus the
   manifest and the card).
3. fuse-train from `s3://` against the local folder (`--train-steps` steps of the tiny test models, when
   `--train-steps` > 0): tokens/s ratio, target >= 0.95.

The cache is synthetic (random but valid signals, written by the real writer; tests/fake_cache.py). Prints one
line per measurement and a JSON line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import click

from cache_builder.format import new_manifest, source_table, write_manifest, write_shard
from cache_builder.manifest import load_manifest
from cache_builder.remote import open_location
from cache_builder.share import layer_files, pull_cache, push_cache
from tests.fake_cache import fake_rows, write_fake_cache

QUIET = dict(log=lambda *_: None)


def start_server() -> tuple[object, str]:
    """moto's S3 server on a free localhost port, with fake credentials in the standard environment."""
    import socket

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    return server, f"http://127.0.0.1:{port}"


def time_pull(url: str, cache: Path, work: Path, repeats: int) -> dict:
    """Best-of-`repeats` seconds of cache-pull and of a plain fsspec copy of the same files, interleaved."""
    loc = open_location(url)
    files = [e.relpath for e in layer_files("", load_manifest(cache))] + ["manifest.json"]
    total = sum((cache / f).stat().st_size for f in files)
    plain, ours = [], []
    for i in range(repeats):
        for kind in (("plain", "ours") if i % 2 == 0 else ("ours", "plain")):
            dest = work / f"pull-{kind}-{i}"
            start = time.perf_counter()
            if kind == "plain":
                (dest / "shards").mkdir(parents=True)
                loc.fs.get([loc.path(f) for f in files], [str(dest / f) for f in files])
                plain.append(time.perf_counter() - start)
            else:
                pull_cache(loc, dest, **QUIET)
                ours.append(time.perf_counter() - start)
            shutil.rmtree(dest)
    return {"bytes": total, "plain_s": min(plain), "pull_s": min(ours),
            "plain_MBps": total / min(plain) / 1e6, "pull_MBps": total / min(ours) / 1e6,
            "ratio": min(plain) / min(ours)}


def repush_one_changed_shard(url: str, cache: Path) -> dict:
    """Rewrite one shard (other rows), update the manifest, push again: what is uploaded."""
    manifest = load_manifest(cache)
    target = manifest["shards"][len(manifest["shards"]) // 2]
    rows = fake_rows(target["rows"], k=manifest["top_k"], seed=12345)
    changed = write_shard(source_table(rows, manifest["top_k"], manifest["logit_dtype"]), cache, target["path"])
    shards = [changed if s["path"] == changed.path else type(changed)(**s) for s in manifest["shards"]]
    write_manifest(cache, new_manifest("source", top_k=manifest["top_k"], logit_dtype=manifest["logit_dtype"],
                                       source=manifest["source"], corpus=manifest["corpus"], build={}, shards=shards))
    summary = push_cache(cache, open_location(url), **QUIET)
    shards_sent = [p for p in summary.transferred if p.endswith(".parquet")]
    return {"changed_shard_bytes": changed.bytes, "uploaded_bytes": summary.bytes, "uploaded_files": summary.transferred,
            "shards_uploaded": shards_sent, "only_that_shard": shards_sent == [changed.path],
            "cache_bytes": sum(s.bytes for s in shards)}


@click.command()
@click.option("--shards", default=24, help="Shards in the synthetic cache.")
@click.option("--rows-per-shard", default=64)
@click.option("--repeats", default=3, help="Pulls of each kind; the best is kept.")
def main(shards, rows_per_shard, repeats):
    server, endpoint = start_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            cache = work / "cache"
            write_fake_cache(cache, n_rows=shards * rows_per_shard, rows_per_shard=rows_per_shard)
            loc = open_location("s3://bench/cache")
            loc.fs.mkdir("bench")
            push_cache(cache, loc, **QUIET)
            pull = time_pull("s3://bench/cache", cache, work, repeats)
            print(f"pull: {pull['bytes'] / 1e6:.1f} MB, cache-pull {pull['pull_MBps']:.1f} MB/s vs plain fsspec copy "
                  f"{pull['plain_MBps']:.1f} MB/s: ratio {pull['ratio']:.2f} (target >= 0.9)")
            repush = repush_one_changed_shard("s3://bench/cache", cache)
            print(f"re-push after one shard changed: {repush['uploaded_bytes']} bytes uploaded for a "
                  f"{repush['changed_shard_bytes']}-byte shard of a {repush['cache_bytes']}-byte cache; shards sent: "
                  f"{repush['shards_uploaded']}")
            print(json.dumps({"benchmark": "share_throughput", "endpoint": endpoint, "shards": shards,
                              "rows_per_shard": rows_per_shard, "pull": pull, "repush": repush}))
    finally:
        server.stop()


if __name__ == "__main__":
    main()
