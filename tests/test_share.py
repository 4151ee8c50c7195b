"""Sharing caches: cache-push, cache-pull, and cache-info / cache-verify on URLs, against a real S3 server and a
real GCS emulator (each test that takes `store` runs on both)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cache_builder.cli import info, pull, push, verify
from cache_builder.format import MANIFEST, sha256_file
from cache_builder.manifest import CacheError, load_manifest
from cache_builder.remote import RemoteError, confine, open_location, redact
from cache_builder.share import PROVENANCE, pull_cache, push_cache
from cache_builder.verify import verify_cache
from tests.fake_cache import rewrite_shard, write_fake_cache
from tests.gcs import gcs_bucket, gcs_endpoint, gcsfs_client  # noqa: F401 - fixtures
from tests.s3 import SECRET, bucket, s3_endpoint, s3fs_client  # noqa: F401 - fixtures

QUIET = dict(log=lambda *_: None)


@dataclass(frozen=True)
class Store:
    """A fresh bucket on a local server: `url(key)` for our commands, `fs` and `key` to touch objects directly."""

    scheme: str
    bucket: str
    fs: object

    def url(self, key: str) -> str:
        return f"{self.scheme}://{self.bucket}/{key}"

    def key(self, key: str) -> str:
        return f"{self.bucket}/{key}"


@pytest.fixture(params=["s3", "gs"])
def store(request) -> Store:
    if request.param == "s3":
        return Store("s3", request.getfixturevalue("bucket"), s3fs_client())
    return Store("gs", request.getfixturevalue("gcs_bucket"), gcsfs_client())


def fake_root(root: Path, n_rows: int = 12, rows_per_shard: int = 4) -> Path:
    """A cache root with two source layers over the same records (written by the real writer)."""
    for name in ("srcA", "srcB"):
        write_fake_cache(root / name, n_rows=n_rows, rows_per_shard=rows_per_shard)
    return root


def cache_files(root: Path) -> dict[str, bytes]:
    """Every shard and manifest under a cache root, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and (p.suffix == ".parquet" or p.name == MANIFEST)}


def test_push_then_pull_gives_the_same_bytes_and_verifies(store, tmp_path):
    cache = fake_root(tmp_path / "cache")
    url = store.url("lab-a")
    pushed = push_cache(cache, open_location(url), **QUIET)
    assert pushed.files == 8 + 1  # 2 x (3 shards + manifest), 2 layer cards, the root card
    pulled = pull_cache(open_location(url), tmp_path / "dest", **QUIET)
    assert pulled.files == 6 and pulled.kept == 0
    assert cache_files(tmp_path / "dest") == cache_files(cache)
    assert verify_cache(tmp_path / "dest") == []
    provenance = json.loads((tmp_path / "dest" / PROVENANCE).read_text())
    assert provenance["origin"] == url and set(provenance["layers"]) == {"srcA", "srcB"}
    assert provenance["layers"]["srcA"]["manifest_sha256"] == sha256_file(cache / "srcA" / MANIFEST)
    again = pull_cache(open_location(url), tmp_path / "dest", **QUIET)
    assert again.files == 0 and again.kept == 6
    push_cache(cache, open_location(store.url("lab-b")), **QUIET)
    with pytest.raises(CacheError, match=f"holds a cache pulled from {url} .*; pull {store.url('lab-b')} into another"):
        pull_cache(open_location(store.url("lab-b")), tmp_path / "dest", **QUIET)


def test_repush_uploads_only_the_changed_shard(store, tmp_path):
    cache = fake_root(tmp_path / "cache")
    url = store.url("lab-a")
    push_cache(cache, open_location(url), **QUIET)
    assert push_cache(cache, open_location(url), **QUIET).transferred == []
    changed = rewrite_shard(cache / "srcA", 1)
    again = push_cache(cache, open_location(url), **QUIET)
    assert [p for p in again.transferred if p.endswith(".parquet")] == [f"srcA/{changed.path}"]
    assert [p for p in again.transferred if not p.endswith(".parquet")] == [f"srcA/{MANIFEST}"]
    assert again.bytes < 2 * changed.bytes + 20_000


def test_a_cache_that_fails_verify_is_not_pushed(store, tmp_path):
    cache = fake_root(tmp_path / "cache")
    shard = next((cache / "srcA" / "shards").glob("*.parquet"))
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CacheError, match="does not pass cache-verify"):
        push_cache(cache, open_location(store.url("x")), **QUIET)
    assert store.fs.find(store.bucket) == []


def test_a_tampered_remote_shard_is_refused_by_pull_naming_it(store, tmp_path):
    cache = fake_root(tmp_path / "cache")
    url = store.url("lab-a")
    push_cache(cache, open_location(url), **QUIET)
    relpath = load_manifest(cache / "srcB")["shards"][2]["path"]
    data = bytearray(store.fs.cat_file(store.key(f"lab-a/srcB/{relpath}")))
    data[100] ^= 0xFF
    store.fs.pipe_file(store.key(f"lab-a/srcB/{relpath}"), bytes(data))
    with pytest.raises(CacheError, match=f"{url}/srcB/{relpath}: sha256 or size differs from the manifest"):
        pull_cache(open_location(url), tmp_path / "dest", **QUIET)
    assert not (tmp_path / "dest" / "srcB" / relpath).exists()
    assert not (tmp_path / "dest" / "srcB" / MANIFEST).exists()
    result = CliRunner().invoke(verify, [url, "--cache-dir", str(tmp_path / "store")])
    assert result.exit_code == 1 and f"FAIL {url}/srcB/{relpath}: sha256" in result.output


@pytest.mark.parametrize("path, message", [
    ("shards/../../../escaped.parquet", "outside"),
    ("s3://another-bucket/shards/x.parquet", "absolute"),
    ("/etc/passwd", "absolute"),
])
def test_a_remote_manifest_naming_other_places_is_refused(store, tmp_path, path, message):
    cache = fake_root(tmp_path / "cache")
    url = store.url("lab-a")
    push_cache(cache, open_location(url), **QUIET)
    manifest = load_manifest(cache / "srcA")
    manifest["shards"][0]["path"] = path
    store.fs.pipe_file(store.key(f"lab-a/srcA/{MANIFEST}"), json.dumps(manifest).encode())
    with pytest.raises(CacheError, match=message) as err:
        pull_cache(open_location(url), tmp_path / "dest", **QUIET)
    assert f"{url}/srcA/{MANIFEST}" in str(err.value)
    assert not (tmp_path / "escaped.parquet").exists() and not (tmp_path / "dest").exists()


def test_pull_selects_sources_and_layers(store, world, tmp_path):
    url = store.url("labs")
    push_cache(world["cache"], open_location(url), **QUIET)
    only = pull_cache(open_location(url), tmp_path / "a", sources=("srcq",), layers=("source",), **QUIET)
    assert only.layers == ["srcq"] and not (tmp_path / "a" / "srcg").exists()
    assert not (tmp_path / "a" / "srcq" / "aligned").exists()
    aligned = pull_cache(open_location(url), tmp_path / "b", layers=("aligned/pivot",), **QUIET)
    assert aligned.layers == ["srcg/aligned/pivot", "srcq/aligned/pivot"]
    assert verify_cache(tmp_path / "b") == [] and not (tmp_path / "b" / "srcq" / MANIFEST).exists()
    with pytest.raises(CacheError, match="nothing matches.*srcq:aligned/pivot"):
        pull_cache(open_location(url), tmp_path / "c", layers=("aligned/other",), **QUIET)


def test_pushed_layout_loads_in_datasets_and_duckdb(world, tmp_path):
    datasets = pytest.importorskip("datasets")
    duckdb = pytest.importorskip("duckdb")
    push_cache(world["cache"], open_location((tmp_path / "published").as_uri()), licenses=("mit",), **QUIET)
    card = (tmp_path / "published" / "README.md").read_text()
    assert card.startswith("---\nlicense: mit\n")
    pull_cache(open_location((tmp_path / "published").as_uri()), tmp_path / "pulled", **QUIET)
    assert cache_files(tmp_path / "pulled") == cache_files(world["cache"])
    for config, layer in [("srcq", "srcq"), ("srcq.aligned.pivot", "srcq/aligned/pivot"), ("srcg", "srcg")]:
        rows = datasets.load_dataset(str(tmp_path / "published"), config, split="train",
                                     cache_dir=str(tmp_path / "hf-cache"))
        manifest = load_manifest(world["cache"] / layer)
        assert rows.num_rows == manifest["totals"]["rows"]
        assert sum(rows["num_tokens"]) == manifest["totals"]["tokens"]
        glob = (tmp_path / "published" / layer / "shards" / "*.parquet").as_posix()
        count, tokens = duckdb.sql(f"select count(*), sum(num_tokens) from read_parquet('{glob}')").fetchall()[0]
        assert (count, tokens) == (manifest["totals"]["rows"], manifest["totals"]["tokens"])


def test_a_wrong_bucket_gives_one_line_naming_the_fix(store, tmp_path):
    result = CliRunner().invoke(pull, [f"{store.scheme}://no-such-{store.bucket}/x", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1
    assert "does not exist" in result.output and "check the bucket name" in result.output


def test_missing_credentials_give_one_line_naming_the_fix(bucket, tmp_path, monkeypatch):
    runner = CliRunner()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    result = runner.invoke(push, [str(fake_root(tmp_path / "cache")), f"s3://{bucket}/x"])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "no credentials" in result.output and "AWS_ACCESS_KEY_ID" in result.output


def test_credentials_never_reach_output_cards_or_provenance(bucket, tmp_path, monkeypatch):
    cache = fake_root(tmp_path / "cache")
    url = f"s3://{bucket}/lab-a"
    runner = CliRunner()
    outputs = [runner.invoke(push, [str(cache), url]), runner.invoke(pull, [url, str(tmp_path / "dest")]),
               runner.invoke(info, [url]), runner.invoke(verify, [url, "--cache-dir", str(tmp_path / "store")])]
    assert [r.exit_code for r in outputs] == [0, 0, 0, 0], [r.output for r in outputs]
    written = [p.read_text(errors="replace") for p in (tmp_path / "dest").rglob("*") if p.suffix in (".json", ".md")]
    assert written and all(SECRET not in text and "testing-key-id" not in text for text in written + [r.output for r in outputs])
    with_key = f"s3://testing-key-id:{SECRET}@{bucket}/lab-a"
    refused = runner.invoke(pull, [with_key, str(tmp_path / "d2")])
    assert refused.exit_code == 2 and "credentials in a URL" in refused.output and SECRET not in refused.output


def test_cache_info_reads_only_the_manifests_of_a_url(store, tmp_path):
    cache = fake_root(tmp_path / "cache")
    url = store.url("lab-a")
    push_cache(cache, open_location(url), **QUIET)
    result = CliRunner().invoke(info, [url, "--json"])
    rows = json.loads(result.output)
    assert [r["path"] for r in rows] == [f"{url}/srcA", f"{url}/srcB"]
    assert rows[0]["rows"] == 12


def test_plain_http_is_refused_unless_allowed(tmp_path, monkeypatch):
    with pytest.raises(RemoteError, match="--allow-insecure"):
        open_location("http://example.org/cache")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://storage.example.org:9000")
    with pytest.raises(RemoteError, match="AWS_ENDPOINT_URL .* plain http"):
        open_location("s3://bucket/cache")
    assert open_location("s3://bucket/cache", allow_insecure=True).root == "bucket/cache"


def test_confine_and_redact():
    assert confine("srcq/aligned/pivot", "x") == "srcq/aligned/pivot"
    for bad in ("../x", "a/../../b", "/abs", "s3://b/k", "c:/x", "a\\b", "a//b", "./a", ""):
        with pytest.raises(RemoteError):
            confine(bad, "x")
    text = redact("https://b.s3.amazonaws.com/k?X-Amz-Signature=abc&X-Amz-Credential=AKIAABCDEFGHIJKLMNOP s3://u:p@b "
                  "token hf_abcdefghijklmnopqrstuv")
    assert "abc" not in text and "u:p" not in text and "hf_abcdefghij" not in text and "AKIAABCD" not in text


def test_kill_9_of_a_pull_then_a_rerun_gives_the_same_bytes(bucket, tmp_path):
    cache = tmp_path / "cache"
    write_fake_cache(cache, n_rows=160, rows_per_shard=2)
    url = f"s3://{bucket}/big"
    push_cache(cache, open_location(url), **QUIET)
    dest = tmp_path / "dest"
    command = [sys.executable, "-c", "from cache_builder.cli import pull; pull()", url, str(dest), "--workers", "1"]
    process = subprocess.Popen(command, env=os.environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and len(list((dest / "shards").glob("*.parquet"))) < 20:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the pull finished before it could be killed"
    assert not (dest / MANIFEST).exists()
    expected = {s["path"]: s["sha256"] for s in load_manifest(cache)["shards"]}
    finals = list((dest / "shards").glob("*.parquet"))
    assert 20 <= len(finals) < len(expected)
    assert all(sha256_file(p) == expected[f"shards/{p.name}"] for p in finals)  # no unverified file under a final name
    rerun = pull_cache(open_location(url), dest, **QUIET)
    assert rerun.kept >= 20 and cache_files(dest) == cache_files(cache)
    assert not [p for p in dest.rglob("*") if ".part-" in p.name]
    assert pq.read_table(dest / finals[0].relative_to(dest)).num_rows == 2


@pytest.mark.skipif(not (os.environ.get("LCF_HUB_TEST_REPO") and os.environ.get("HF_TOKEN")),
                    reason="set LCF_HUB_TEST_REPO=ORG/NAME (a dataset repository you may write) and HF_TOKEN")
def test_hub_push_pull_and_load_dataset(world, tmp_path):
    datasets = pytest.importorskip("datasets")
    url = f"hf://datasets/{os.environ['LCF_HUB_TEST_REPO']}"
    push_cache(world["cache"], open_location(url), licenses=("mit",), **QUIET)
    assert push_cache(world["cache"], open_location(url), **QUIET).transferred in ([], ["README.md"])
    location = open_location(url)
    pull_cache(location, tmp_path / "dest", layers=("aligned/pivot",), **QUIET)
    assert verify_cache(tmp_path / "dest") == []
    assert json.loads((tmp_path / "dest" / PROVENANCE).read_text())["revision"] == location.revision
    rows = datasets.load_dataset(os.environ["LCF_HUB_TEST_REPO"], "srcq.aligned.pivot", split="train",
                                 revision=location.revision, cache_dir=str(tmp_path / "hf-cache"))
    assert rows.num_rows == load_manifest(world["cache"] / "srcq" / "aligned" / "pivot")["totals"]["rows"]


def test_cache_align_takes_a_url_and_aligns_a_pulled_source_layer(bucket, world, tmp_path):
    from cache_builder.cli import align

    url = f"s3://{bucket}/lab-a/srcq"
    push_cache(world["cache"] / "srcq", open_location(url), **QUIET)
    result = CliRunner().invoke(align, ["--cache", url, "--pivot", str(world["models"]["pivot"]),
                                        "--cache-dir", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    pulled = next((tmp_path / "store" / "pulled").iterdir())
    assert f"publish it with `cache-push {pulled} {url}`" in result.output
    assert verify_cache(pulled) == [] and json.loads((pulled / PROVENANCE).read_text())["layers"] == {
        ".": {"layer": "source", "manifest_sha256": sha256_file(world["cache"] / "srcq" / MANIFEST), "source": "srcq"}}
    made, original = (load_manifest(p / "aligned" / "pivot")["shards"] for p in (pulled, world["cache"] / "srcq"))
    assert [s["sha256"] for s in made] == [s["sha256"] for s in original]


def test_gs_without_gcsfs_says_how_to_install_it(tmp_path, monkeypatch):
    """No fake GCS server is run here; what is checked is the line a machine without gcsfs prints."""
    from fsspec.registry import _registry

    monkeypatch.delitem(_registry, "gs", raising=False)  # a class imported earlier is forgotten
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # and importing gcsfs fails
    for command, args in ((pull, ["gs://lab-bucket/cache", str(tmp_path / "dest")]), (info, ["gs://lab-bucket/cache"])):
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
        assert "reading gs:// needs the gcsfs package" in result.output and "pip install gcsfs" in result.output
    assert not (tmp_path / "dest").exists()
