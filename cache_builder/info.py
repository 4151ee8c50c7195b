"""cache-info: one line per cache layer (source or aligned) with the figures a user asks first."""

from __future__ import annotations

from pathlib import Path

from cache_builder.format import missing_statistics
from cache_builder.manifest import find_layers, load_manifest
from cache_builder.untrusted import refuse_unsafe_tree, shown


def cache_summary(path: str | Path) -> list[dict]:
    """Figures of every cache layer under `path`, from the manifests only (no shard is read)."""
    refuse_unsafe_tree(Path(path))
    return [layer_summary(str(layer), load_manifest(layer)) for layer in find_layers(path)]


def layer_summary(path: str, m: dict) -> dict:
    """The figures of one layer, from its manifest; `path` names it (a folder or a URL)."""
    totals = m["totals"]
    pivot = m.get("pivot") or {}
    alignment = pivot.get("alignment", {})
    return {
        "path": path,
        "layer": m["layer"],
        "source": m["source"].get("name"),
        "pivot": pivot.get("name"),
        "tokenizer": m["source"].get("tokenizer_fingerprint", "")[:12],
        "vocab": m["source"].get("vocab_size"),
        "k": m["top_k"],
        "logits": m["logit_dtype"],
        "rows": totals["rows"],
        "tokens": totals["tokens"],
        "bytes": totals["bytes"],
        "bytes_per_token": round(totals["bytes"] / max(totals["tokens"], 1), 2),
        "coverage": round(alignment["coverage"], 4) if "coverage" in alignment else None,
        "kept_mass": round(alignment["mean_kept_mass"], 4) if alignment.get("mean_kept_mass") is not None else None,
        "bad_records": m["corpus"].get("summary", {}).get("bad_records"),
        "missing": ",".join(missing_statistics(m)) or None,  # statistics an imported layer does not have
    }


def format_summary(rows: list[dict]) -> str:
    """A plain-text table of cache_summary rows."""
    columns = ["layer", "source", "pivot", "tokenizer", "vocab", "k", "logits", "rows", "tokens", "bytes_per_token", "coverage", "kept_mass", "missing", "path"]
    cells = [[("" if r[c] is None else shown(r[c], 80)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def remote_summary(loc) -> list[dict]:
    """Figures of every layer at a remote location (cache_builder.remote.Location), from its manifests only."""
    from cache_builder.share import read_layers

    return [layer_summary(loc.display(layer), found.manifest) for layer, found in read_layers(loc).items()]
