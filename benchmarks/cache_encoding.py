"""Bytes per token of a cache's top-k columns under other encodings (cache size at large k).

    python -m benchmarks.cache_encoding out/k64/qwen

Reads a source-native cache and re-encodes only its top-k ids and logits, each layout as flat Parquet columns
(zstd level 3, no dictionary, one row group, the same settings for all):
  rank order      ids and fp16 logits as the cache stores them (descending logit), plain or byte-stream-split
  id order        ids sorted ascending and delta-coded within each position (first id, then gaps), the logits
                  permuted with them: lossless, but the rank order must be recovered by sorting the logits
  fp16 ordinals   logits in rank order as order-preserving integers of their fp16 bits: the first, then the
                  (non-negative) gaps; lossless
  uint8 lossy     log-probs relative to the top-1 rounded to a fixed step (1/16 or 1/8 nat), with the KL
                  divergence of the renormalised top-k distribution from the fp16 one (mean and max per position)
Also prints the rest of the shard (text, offsets, statistics) as stored, so each layout's total is comparable with
cache_size.py. Prints a table and one JSON line.
"""

from __future__ import annotations

import io
from pathlib import Path

import click
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from benchmarks.report import json_line
from cache_builder.manifest import load_manifest

FLAT = dict(compression="zstd", compression_level=3, write_statistics=False, row_group_size=10**9, use_dictionary=False)


def encoded_bytes(columns: list[np.ndarray], byte_stream_split: bool = False) -> int:
    """Parquet bytes of these flat columns, each written on its own."""
    total = 0
    for values in columns:
        table = pa.table({"x": pa.array(values.ravel())})
        buffer = io.BytesIO()
        pq.write_table(table, buffer, use_byte_stream_split=["x"] if byte_stream_split else False, **FLAT)
        total += buffer.tell()
    return total


def fp16_ordinals(logits: np.ndarray) -> np.ndarray:
    """(P, K) float16 -> (P, K) int32 that orders like the floats (negative values bit-flipped)."""
    bits = logits.view(np.uint16).astype(np.int32)
    return np.where(bits & 0x8000, 0xFFFF - bits, bits | 0x8000)


def topk_kl(logits: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """(P, K), (P, K) -> (P,) KL(p || q) of the two top-k distributions, each renormalised over its K slots."""
    def logp(z):
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    lp, lq = logp(logits.astype(np.float64)), logp(approx.astype(np.float64))
    return (np.exp(lp) * (lp - lq)).sum(axis=1)


def topk_column_bytes(meta: pq.FileMetaData) -> int:
    """Compressed bytes of the topk_ids and topk_logits leaf columns over every row group of one shard."""
    leaves = [i for i in range(meta.num_columns) if meta.schema.column(i).path.split(".")[0] in ("topk_ids", "topk_logits")]
    return sum(meta.row_group(g).column(i).total_compressed_size for g in range(meta.num_row_groups) for i in leaves)


def measure(folder: Path) -> dict:
    manifest = load_manifest(folder)
    k, tokens = manifest["top_k"], manifest["totals"]["tokens"]
    table = pa.concat_tables(pq.read_table(folder / s["path"]) for s in manifest["shards"])
    ids = pc.list_flatten(pc.list_flatten(table["topk_ids"])).to_numpy().reshape(-1, k).astype(np.int32)  # (P, K)
    logits = pc.list_flatten(pc.list_flatten(table["topk_logits"])).to_numpy(zero_copy_only=False)
    logits = logits.astype(np.float16).reshape(-1, k)  # (P, K), descending along K
    stored_topk = sum(topk_column_bytes(pq.ParquetFile(folder / s["path"]).metadata) for s in manifest["shards"])
    rest = manifest["totals"]["bytes"] - stored_topk  # text, offsets, statistics, footers: unchanged by any layout
    order = np.argsort(ids, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, axis=1)
    id_gaps = [sorted_ids[:, :1], np.diff(sorted_ids, axis=1)]
    ordinals = fp16_ordinals(logits)
    layouts = {
        "as stored (rank order, zstd)": (stored_topk, 0.0),
        "rank order, byte-stream-split": (encoded_bytes([ids], True) + encoded_bytes([logits], True), 0.0),
        "rank order, fp16 ordinals": (encoded_bytes([ids], True)
                                      + encoded_bytes([ordinals[:, :1], -np.diff(ordinals, axis=1)], True), 0.0),
        "id order, delta ids": (encoded_bytes(id_gaps, True)
                                + encoded_bytes([np.take_along_axis(logits, order, axis=1)], True), 0.0),
    }
    relative = logits.astype(np.float32) - logits[:, :1].astype(np.float32)  # (P, K) <= 0
    for step in (1 / 16, 1 / 8):
        codes = np.clip(np.round(-relative / step), 0, 255).astype(np.uint8)
        kl = topk_kl(logits, -codes.astype(np.float32) * step)
        layouts[f"id order, delta ids, uint8 log-probs (step 1/{round(1 / step)} nat)"] = (
            encoded_bytes(id_gaps, True) + encoded_bytes([np.take_along_axis(codes, order, axis=1)]),
            {"mean": float(kl.mean()), "max": float(kl.max())})
    return {"cache": str(folder), "k": k, "tokens": tokens, "rest_bytes_per_token": rest / tokens,
            "layouts": {name: {"topk_bytes_per_token": b / tokens, "total_bytes_per_token": (b + rest) / tokens,
                               "kl_nats": kl} for name, (b, kl) in layouts.items()}}


@click.command(help=__doc__)
@click.argument("folders", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
def main(folders: tuple[str, ...]) -> None:
    results = [measure(Path(f)) for f in folders]
    for r in results:
        print(f"{r['cache']}: k={r['k']}, {r['tokens']} tokens; other fields {r['rest_bytes_per_token']:.1f} B/token")
        print(f"  {'layout':62} {'top-k B/tok':>11} {'total B/tok':>11}  KL (nats)")
        for name, v in r["layouts"].items():
            kl = f"mean {v['kl_nats']['mean']:.1e}, max {v['kl_nats']['max']:.1e}" if v["kl_nats"] else "0 (lossless)"
            print(f"  {name:62} {v['topk_bytes_per_token']:>11.1f} {v['total_bytes_per_token']:>11.1f}  {kl}")
    print(json_line("cache_encoding", results=results))


if __name__ == "__main__":
    main()
