"""Test support: a source-native cache with random (but valid) signals, written through the real writer.

No model is involved, so format, verify and reader tests run in milliseconds.
"""

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from cache_builder.corpus import Record, sha256_hex
from cache_builder.format import STAT_COLUMNS, SourceRow, new_manifest, source_table, write_manifest, write_shard

VOCAB = 100


def fake_rows(n_rows: int, k: int = 4, seed: int = 0, vocab: int = VOCAB) -> list[SourceRow]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        text = f"record {i} " + "x" * int(rng.integers(3, 30))
        n = len(text.encode())
        ends = np.unique(np.concatenate([rng.integers(1, n, size=min(5, n - 1)), [n]])).astype(np.int32)
        t = len(ends)
        logits = -np.sort(-rng.normal(size=(t - 1, k)).astype(np.float32), axis=1)
        scored = SimpleNamespace(
            topk_ids=np.argsort(rng.random((t - 1, vocab)), axis=1)[:, :k].astype(np.int32),  # k distinct ids
            topk_logits=logits,
            **{name: rng.normal(size=t - 1).astype(np.float32) for name in STAT_COLUMNS},
        )
        # plausible statistics: a logsumexp above every top-k logit, a positive std, log-probabilities <= 0
        scored.logsumexp = logits[:, 0] + 2 + np.abs(scored.logsumexp)
        scored.logit_std = 1 + np.abs(scored.logit_std)
        scored.gold_logprob = -np.abs(scored.gold_logprob)
        record = Record(sha256_hex(text), sha256_hex(text), 0, "prose" if i % 2 else "code", "train", text,
                        ((0, n),), f"fake:{i + 1}")
        rows.append(SourceRow(record, rng.integers(0, vocab, size=t).astype(np.int32), ends, scored, 1.5))
    return rows


def write_fake_cache(folder: Path, n_rows: int = 10, rows_per_shard: int = 4, k: int = 4,
                     logit_dtype: str = "float32", seed: int = 0) -> dict:
    rows = fake_rows(n_rows, k, seed)
    shards = [
        write_shard(source_table(rows[i : i + rows_per_shard], k, logit_dtype), folder,
                    f"shards/part-r00000-{i // rows_per_shard:05d}.parquet")
        for i in range(0, n_rows, rows_per_shard)
    ]
    manifest = new_manifest(
        "source", top_k=k, logit_dtype=logit_dtype,
        source={"name": "fake", "vocab_size": VOCAB, "tokenizer_fingerprint": "f" * 64},
        corpus={"fingerprint": "c" * 64}, build={}, shards=shards,
    )
    write_manifest(folder, manifest)
    return manifest


def resign(folder: Path, manifest: dict | None = None) -> dict:
    """What an attacker does after tampering: re-sign every listed shard (size, sha256, counts) and the
    totals, and write the manifest (the given one, else the folder's own)."""
    import json

    from cache_builder.format import MANIFEST, shard_info

    manifest = manifest if manifest is not None else json.loads((folder / MANIFEST).read_text())
    for entry in manifest["shards"]:
        if (folder / entry["path"]).is_file() and not (folder / entry["path"]).is_symlink():
            info = shard_info(folder, entry["path"])
            entry.update(rows=info.rows, tokens=info.tokens, bytes=info.bytes, sha256=info.sha256)
    manifest["totals"] = {key: sum(s[key] for s in manifest["shards"]) for key in ("rows", "tokens", "bytes")}
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return manifest
