"""fuse-train on shared caches: URLs (a real S3 server and a GCS emulator on localhost), a bounded local store,
pivot layers aligned on the fly, and caches of different corpora joined on their shared records."""

import json
import shutil

import pytest
from click.testing import CliRunner

from cache_builder.align import align_cache
from cache_builder.build import build_cache
from cache_builder.format import MANIFEST
from cache_builder.manifest import CacheError, load_manifest
from cache_builder.remote import open_location
from cache_builder.share import push_cache
from fuse_trainer.cli import train
from fuse_trainer.data import FusionData, check_sources, discover_sources
from fuse_trainer.train import fuse_train
from tests.runs import run_losses, train_config
from tests.gcs import gcs_bucket, gcs_endpoint  # noqa: F401 - fixtures
from tests.s3 import bucket, s3_endpoint, s3fs_client  # noqa: F401 - fixtures
from tests.test_untrusted import tamper_rows

QUIET = dict(log=lambda *_: None)


def without_aligned(cache, dest):
    """A copy of a cache root with its source layers only (what cache-build without --pivot leaves)."""
    shutil.copytree(cache, dest, ignore=shutil.ignore_patterns("aligned"))
    return dest


def test_training_from_s3_gives_the_losses_of_the_local_folder(world, bucket, tmp_path):
    url = f"s3://{bucket}/labs"
    push_cache(world["cache"], open_location(url), **QUIET)
    fuse_train(train_config(world, tmp_path / "local", max_steps=3), **QUIET)
    fuse_train(train_config(world, tmp_path / "remote", max_steps=3, shards=url, cache_dir=str(tmp_path / "store")),
               **QUIET)
    assert run_losses(tmp_path / "remote") == run_losses(tmp_path / "local")
    provenance = json.loads((tmp_path / "remote" / "final" / "fusion_provenance.json").read_text())
    assert provenance["srcq"]["origin"] == f"{url}/srcq/aligned/pivot"


def test_a_bounded_store_evicts_and_fetches_again_with_the_same_losses(world, bucket, tmp_path):
    url = f"s3://{bucket}/labs"
    push_cache(world["cache"], open_location(url), **QUIET)
    shards = load_manifest(world["cache"] / "srcq" / "aligned" / "pivot")["shards"]
    bound = 2.5 * max(s["bytes"] for s in shards)  # fewer than the 2 x 5 shards the run reads
    fuse_train(train_config(world, tmp_path / "local", max_steps=3), **QUIET)
    fuse_train(train_config(world, tmp_path / "bounded", max_steps=3, shards=url, cache_dir=str(tmp_path / "store"),
                            max_local_gb=bound / 1e9), **QUIET)
    assert run_losses(tmp_path / "bounded") == run_losses(tmp_path / "local")
    kept = [p for p in (tmp_path / "store" / "shards").iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in kept) <= bound and 0 < len(kept) < 2 * len(shards)


def test_a_tampered_remote_shard_is_refused_by_fuse_train_naming_it(world, bucket, tmp_path):
    url = f"s3://{bucket}/labs"
    push_cache(world["cache"], open_location(url), **QUIET)
    relpath = load_manifest(world["cache"] / "srcg" / "aligned" / "pivot")["shards"][3]["path"]
    key = f"{bucket}/labs/srcg/aligned/pivot/{relpath}"
    data = bytearray(s3fs_client().cat_file(key))
    data[-20] ^= 0x01
    s3fs_client().pipe_file(key, bytes(data))
    config = train_config(world, tmp_path / "run")
    result = CliRunner().invoke(train, ["--shards", url, "--pivot", config.pivot, "--out", str(tmp_path / "run"),
                                        "--max-steps", "2", "--cache-dir", str(tmp_path / "store")])
    assert result.exit_code == 2
    assert f"{url}/srcg/aligned/pivot/{relpath}: sha256 or size differs from the manifest" in result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_pivot_layers_are_aligned_for_a_local_and_a_pulled_cache(world, bucket, tmp_path):
    local = without_aligned(world["cache"], tmp_path / "cache")
    messages = []
    fuse_train(train_config(world, tmp_path / "run", shards=str(local), mode="pairwise", max_steps=2),
               log=messages.append)
    assert sum("aligning it now (no source model is loaded)" in str(m) for m in messages) == 2
    for source in ("srcq", "srcg"):
        made, original = (load_manifest(c / source / "aligned" / "pivot")["shards"] for c in (local, world["cache"]))
        assert [s["sha256"] for s in made] == [s["sha256"] for s in original]
    assert (tmp_path / "run" / "merged").is_dir()
    url = f"s3://{bucket}/sources-only"
    push_cache(without_aligned(world["cache"], tmp_path / "to-push"), open_location(url), **QUIET)
    messages = []
    fuse_train(train_config(world, tmp_path / "pulled-run", shards=url, max_steps=2, cache_dir=str(tmp_path / "store")),
               log=messages.append)
    fuse_train(train_config(world, tmp_path / "local-run", max_steps=2), **QUIET)
    assert sum("pulling its source layer and aligning it" in str(m) for m in messages) == 2
    assert run_losses(tmp_path / "pulled-run") == run_losses(tmp_path / "local-run")


def test_caches_of_two_places_train_together(world, bucket, tmp_path):
    url = f"s3://{bucket}/lab-q/srcq"
    push_cache(world["cache"] / "srcq", open_location(url), **QUIET)
    lab_g = tmp_path / "lab-g"
    shutil.copytree(world["cache"] / "srcg", lab_g / "srcg")
    fuse_train(train_config(world, tmp_path / "two-places", max_steps=3, shards=f"{lab_g},{url}",
                            cache_dir=str(tmp_path / "store")), **QUIET)
    fuse_train(train_config(world, tmp_path / "one-place", max_steps=3), **QUIET)
    assert run_losses(tmp_path / "two-places") == run_losses(tmp_path / "one-place")


def test_caches_in_two_stores_train_together(world, bucket, gcs_bucket, tmp_path):
    """One lab's cache in an S3 bucket, another's in a GCS bucket: the same losses as both in one folder."""
    urls = f"s3://{bucket}/lab-q/srcq", f"gs://{gcs_bucket}/lab-g/srcg"
    for url, source in zip(urls, ("srcq", "srcg")):
        push_cache(world["cache"] / source, open_location(url), **QUIET)
    fuse_train(train_config(world, tmp_path / "two-stores", max_steps=3, shards=",".join(urls),
                            cache_dir=str(tmp_path / "store")), **QUIET)
    fuse_train(train_config(world, tmp_path / "one-place", max_steps=3), **QUIET)
    assert run_losses(tmp_path / "two-stores") == run_losses(tmp_path / "one-place")


def other_corpus(world, path):
    """The world's corpus with its first four records dropped and two new ones."""
    lines = (world["corpus"] / "corpus.jsonl").read_text().splitlines()[4:]
    lines += [json.dumps({"text": f"A record only lab B has, number {i}.", "split": "train"}) for i in range(2)]
    path.mkdir(parents=True)
    (path / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_caches_of_different_corpora_join_on_their_shared_records(world, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(world["cache"] / "srcq", cache / "srcq")
    build_cache(other_corpus(world, tmp_path / "corpus-b"), world["settings"]["srcg"], cache, **QUIET)
    align_cache(cache / "srcg", str(world["models"]["pivot"]), **QUIET)
    layers = discover_sources(cache, "pivot", **QUIET)
    with pytest.raises(CacheError, match=r"corpus fingerprint differs(.|\n)*20 records are shared by all sources "
                                         r"\(records: srcg 22, srcq 24\); --join intersect"):
        check_sources(layers)
    check_sources(layers, "intersect")
    data = FusionData(layers, ("train",), join="intersect")
    shared_train = [r for r in range(4, 24) if r % 6 != 5]
    assert len(data) == len(shared_train)
    for i in range(len(data.index)):
        group = data.shard(i)
        for source in ("srcq", "srcg"):  # every source's rows line up with the group's records
            assert len(group.sources[source]["aligned_pos"]) == len(group.record_ids)
    fuse_train(train_config(world, tmp_path / "run", shards=str(cache), join="intersect", max_steps=2), **QUIET)
    assert len(run_losses(tmp_path / "run")) == 2


def test_implausible_values_in_a_re_signed_remote_shard_are_refused_naming_it(world, bucket, tmp_path):
    url = f"s3://{bucket}/labs"
    push_cache(world["cache"], open_location(url), **QUIET)
    layer = shutil.copytree(world["cache"] / "srcq" / "aligned" / "pivot", tmp_path / "tampered")
    tamper_rows(layer, "kept_mass", lambda v: [50.0] * len(v))  # sha256 and sizes re-signed: only the values tell
    relpath = load_manifest(layer)["shards"][0]["path"]
    for name in (relpath, MANIFEST):
        s3fs_client().put_file(str(layer / name), f"{bucket}/labs/srcq/aligned/pivot/{name}")
    config = train_config(world, tmp_path / "run")
    result = CliRunner().invoke(train, ["--shards", url, "--pivot", config.pivot, "--out", str(tmp_path / "run"),
                                        "--max-steps", "2", "--cache-dir", str(tmp_path / "store")])
    assert result.exit_code == 2
    assert f"{url}/srcq/aligned/pivot/{relpath}: kept_mass outside [0, 1]" in result.output, result.output
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
