"""Faults and bad input: kill -9 at random points, disk full, a fuzzed corpus, untrusted caches.

Each test asserts that nothing is lost: the rerun ends with exactly the bytes of an uninterrupted run, and
every bad record or bad cache is reported by name, never silently used.
"""

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from cache_builder.build import BuildError, build_cache
from cache_builder.format import MANIFEST
from cache_builder.manifest import CacheError
from cache_builder.verify import verify_cache
from fuse_trainer.config import dump_yaml
from fuse_trainer.data import discover_sources
from fuse_trainer.train import fuse_train, train_run
from tests.runs import build_command, kill_9_when, run_losses, train_config

KILL_TRIALS = 10


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """The shards of an uninterrupted build (one record per shard, so a kill can land between any two), and the
    seconds that build took."""
    out = tmp_path_factory.mktemp("reference")
    start = time.monotonic()
    subprocess.run(build_command(world, out), check=True, capture_output=True)
    seconds = time.monotonic() - start
    return {p.name: p.read_bytes() for p in (out / "srcq" / "shards").glob("*.parquet")}, seconds


@pytest.mark.parametrize("trial", range(KILL_TRIALS))
def test_kill_9_at_a_random_time_loses_nothing(world, reference, tmp_path, trial):
    shards_before, seconds = reference
    shards = tmp_path / "srcq" / "shards"
    rng = random.Random(trial)
    # The kill lands at a random point of the build, measured in progress rather than seconds so that a loaded
    # machine cannot let the build finish first: during start-up and model loading, or right after a random number
    # of the first half of the shards got their final names (the shards themselves take a small part of the build).
    finished = rng.randrange(0, len(shards_before) // 2)
    proc = subprocess.Popen(build_command(world, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if finished == 0:
        time.sleep(rng.uniform(0.05, 0.3) * seconds)
    else:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(shards.glob("*.parquet"))) < finished:
            time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "srcq" / MANIFEST).exists()  # really interrupted
    rerun = subprocess.run(build_command(world, tmp_path), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert {p.name: p.read_bytes() for p in shards.glob("*.parquet")} == shards_before
    assert not list(shards.glob(".*")) and verify_cache(tmp_path / "srcq") == []


def test_kill_9_of_fuse_train_resumes_to_the_same_losses(world, tmp_path):
    straight = tmp_path / "straight"
    train_run(train_config(world, straight, max_steps=8), discover_sources(world["cache"], "pivot"), straight,
              log=lambda *_: None)
    killed = tmp_path / "killed"
    recipe = tmp_path / "recipe.yaml"  # a recipe is a config file: the straight run's settings, saved every 2 steps
    recipe.write_text(dump_yaml(train_config(world, killed, max_steps=8, save_every=2)))
    command = [sys.executable, "-c", "from fuse_trainer.cli import train; train()", "--recipe", str(recipe)]
    kill_9_when(command, killed / "checkpoint" / "trainer_state.pt")
    assert not (killed / "final").exists()  # killed before the end, after a checkpoint
    resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout + resumed.stderr
    assert [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))
    assert np.allclose(run_losses(killed), run_losses(straight), rtol=1e-5, atol=1e-6)


def test_disk_full_leaves_no_partial_shard_and_the_rerun_completes(world, reference, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import cache_builder.format as fmt

    real_write = pq.write_table
    calls = {"n": 0}

    def full_disk(table, where, **options):
        calls["n"] += 1
        if calls["n"] == 3:
            where.write(b"PAR1 half a shard")  # the writer's temporary file, opened exclusively
            raise OSError(28, "No space left on device")
        return real_write(table, where, **options)

    settings = replace(world["settings"]["srcq"], rows_per_shard=1)
    monkeypatch.setattr(fmt.pq, "write_table", full_disk)
    with pytest.raises(OSError, match="No space left"):
        build_cache(world["corpus"], settings, tmp_path, log=lambda *_: None)
    shards = tmp_path / "srcq" / "shards"
    assert len(list(shards.glob("*.parquet"))) == 2 and not list(shards.glob(".*"))
    assert not (tmp_path / "srcq" / "manifest.json").exists()
    monkeypatch.setattr(fmt.pq, "write_table", real_write)
    assert build_cache(world["corpus"], settings, tmp_path, log=lambda *_: None).complete
    assert {p.name: p.read_bytes() for p in shards.glob("*.parquet")} == reference[0]


def write_fuzzed_corpus(folder, n_good: int = 6) -> tuple[list[str], int]:
    """Good records among every kind of bad input; returns the good texts and the number of bad records."""
    rng = random.Random(0)
    good = [f"good record number {i}: the quick brown fox" for i in range(n_good)]
    lines = [json.dumps({"text": t}).encode() for t in good[:3]]
    bad_lines = [
        bytes(rng.randrange(256) for _ in range(200)).replace(b"\n", b" "),  # random bytes
        b'{"text": "broken json',  # broken JSON
        b'{"text": 42}',  # wrong field type
        b'{"prompt": "p", "response": ["not", "a", "string"]}',
        b'{"text": "nul \\u0000 byte"}',  # NUL byte
        b'{"text": "bad utf-8 \xc3\x28"}',  # invalid UTF-8
        "{\"text\": \"latin-1 caf\xe9\"}".encode("latin-1"),  # mixed encodings
        b"[1, 2, 3]",  # not an object
        b'{"messages": []}',
    ]
    lines += bad_lines + [json.dumps({"text": t}).encode() for t in good[3:5]]
    (folder / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (folder / "empty.jsonl").write_bytes(b"")
    (folder / "huge.jsonl").write_text(json.dumps({"text": "huge " * 3000 + good[5]}) + "\n")
    (folder / "garbage.jsonl.zst").write_bytes(b"not zstd at all")
    return good, len(bad_lines) + 1  # + the corrupt zstd file


def test_fuzzed_corpus_caches_every_good_record_and_reports_every_bad_one(world, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good, n_bad = write_fuzzed_corpus(corpus)
    settings = replace(world["settings"]["srcq"], window_chars=1000)
    summary = build_cache(corpus, settings, tmp_path / "cache", log=lambda *_: None)
    assert summary.complete and summary.skipped_records == n_bad
    manifest = json.loads((tmp_path / "cache" / "srcq" / "manifest.json").read_text())
    origins = [b["origin"] for b in manifest["corpus"]["bad_records"]]
    assert len(origins) == n_bad and all(":" in o for o in origins)
    assert any(o.endswith("mixed.jsonl:4") for o in origins) and any("garbage.jsonl.zst" in o for o in origins)
    from cache_builder.reader import read_rows

    texts = "".join(read_rows(tmp_path / "cache" / "srcq", ["text"])["text"])
    assert all(t in texts for t in good)
    with pytest.raises(BuildError, match="--strict"):
        build_cache(corpus, settings, tmp_path / "strict", strict=True, log=lambda *_: None)


def _tamper(cache, how: str):
    layer = cache / "srcg" / "aligned" / "pivot"
    manifest_path = layer / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = layer / manifest["shards"][0]["path"]
    if how == "bit flip":
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x10
        shard.write_bytes(bytes(data))
    elif how == "path outside":
        manifest["shards"][0]["path"] = "../../../manifest.json"
    elif how == "absolute path":
        manifest["shards"][0]["path"] = "/etc/hostname"
    elif how == "symlink":
        target = cache.parent / "elsewhere.parquet"
        shard.rename(target)
        shard.symlink_to(target)
    elif how == "future version":
        manifest["format_version"] = 2
    elif how == "pivot fingerprint":
        manifest["pivot"]["tokenizer_fingerprint"] = "0" * 64
    elif how == "missing records":
        manifest["shards"] = manifest["shards"][1:]
        manifest["totals"] = {key: sum(s[key] for s in manifest["shards"]) for key in ("rows", "tokens", "bytes")}
    elif how == "source rebuilt":  # the source-native cache changed after its aligned layer was made
        native = cache / "srcg" / "manifest.json"
        native.write_text(native.read_text().replace('"top_k"', '"rebuilt": true, "top_k"', 1))
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "how, message",
    [
        ("bit flip", "sha256 mismatch"),
        ("path outside", "outside"),
        ("absolute path", "absolute"),
        ("symlink", "symlink"),
        ("future version", "newer than this code reads"),
        ("pivot fingerprint", "different pivot tokenizers"),
        ("missing records", "record ids differ"),
        ("source rebuilt", "aligned from an earlier build"),
    ],
)
def test_untrusted_caches_are_refused_before_training(world, tmp_path, how, message):
    cache = tmp_path / "cache"
    shutil.copytree(world["cache"], cache)
    _tamper(cache, how)
    assert any(message in p for p in verify_cache(cache)), verify_cache(cache)
    with pytest.raises(CacheError, match=message):
        fuse_train(train_config(world, tmp_path / "run", shards=str(cache)), log=lambda *_: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
