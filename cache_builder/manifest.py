"""Loading a manifest safely: caches come from strangers.

A manifest is plain JSON. Before anything reads a shard, its path is checked to be a relative path
under the cache folder's shards/ (no `..`, no absolute path, no symlink), and the format version is
checked to be one this code understands.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath

from cache_builder.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    NULLABLE_EXTRA,
    SHARD_DIR,
    STAT_COLUMNS,
    TOPK_VALUES,
)

REQUIRED_KEYS = ("format", "format_version", "layer", "top_k", "logit_dtype", "source", "corpus", "build", "shards", "totals")


class CacheError(ValueError):
    """A cache that must not be used; the message names the problem and, where possible, the fix."""


def check_shard_path(folder: Path, relpath: object) -> Path:
    """The shard's absolute path, or CacheError if the manifest points anywhere but shards/ inside folder."""
    if not isinstance(relpath, str) or not relpath:
        raise CacheError(f"{folder / MANIFEST}: shard path {relpath!r} is not a string")
    pure = PurePosixPath(relpath)
    if pure.is_absolute() or relpath.startswith(("/", "\\")) or ":" in pure.parts[0]:
        raise CacheError(f"{folder / MANIFEST}: shard path {relpath!r} is absolute; shard paths must be relative")
    if ".." in pure.parts or pure.parts[0] != SHARD_DIR or "\\" in relpath:
        raise CacheError(f"{folder / MANIFEST}: shard path {relpath!r} points outside {SHARD_DIR}/ of the cache")
    path = folder / pure
    if path.is_symlink() or any(p.is_symlink() for p in path.parents if folder in p.parents or p == folder):
        raise CacheError(f"{path}: shard is a symlink; a cache must contain its shards as regular files")
    if not path.resolve().is_relative_to(folder.resolve()):
        raise CacheError(f"{path}: shard resolves outside the cache folder")
    return path


def load_manifest(folder: str | Path) -> dict:
    """Read and validate `folder/manifest.json` (structure, version, shard paths); no shard is opened."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise CacheError(
            f"{folder} is not a cache: it has no {MANIFEST} (an unfinished build? rerun the same cache-build "
            "command to resume it)"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise CacheError(f"{path}: a manifest must be a JSON object")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise CacheError(f"{path}: missing keys {missing}")
    if manifest["format"] != FORMAT_NAME:
        raise CacheError(f"{path}: format {manifest['format']!r} is not {FORMAT_NAME!r}")
    version = manifest["format_version"]
    if not isinstance(version, int) or version < 1:
        raise CacheError(f"{path}: invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise CacheError(
            f"{path}: format version {version} is newer than this code reads ({FORMAT_VERSION}); "
            "upgrade logit-cache-fusion"
        )
    if manifest["layer"] not in ("source", "aligned"):
        raise CacheError(f"{path}: unknown layer {manifest['layer']!r}")
    if not isinstance(manifest["top_k"], int) or manifest["top_k"] < 1:
        raise CacheError(f"{path}: invalid top_k {manifest['top_k']!r}")
    if manifest["logit_dtype"] not in ("float16", "float32"):
        raise CacheError(f"{path}: invalid logit_dtype {manifest['logit_dtype']!r}")
    nullable = STAT_COLUMNS + NULLABLE_EXTRA  # statistics an imported layer may lack (format.py)
    missing = manifest.get("missing_statistics", [])
    if not isinstance(missing, list) or not set(missing) <= set(nullable):
        raise CacheError(f"{path}: missing_statistics must list some of {', '.join(nullable)}, got {missing!r}")
    if manifest.get("topk_values", "logits") not in TOPK_VALUES:
        raise CacheError(f"{path}: topk_values must be one of {', '.join(TOPK_VALUES)}, got {manifest['topk_values']!r}")
    if not isinstance(manifest["shards"], list):
        raise CacheError(f"{path}: 'shards' must be a list")
    for shard in manifest["shards"]:
        if not isinstance(shard, dict) or not {"path", "rows", "tokens", "bytes", "sha256"} <= shard.keys():
            raise CacheError(f"{path}: every shard entry needs path, rows, tokens, bytes, sha256")
        check_shard_path(folder, shard["path"])
    return manifest


def find_layers(path: str | Path) -> list[Path]:
    """Cache layers under `path`: itself if it has a manifest, else each source folder and its aligned/*."""
    root = Path(path)
    if (root / MANIFEST).is_file():
        layers = [root]
    else:
        layers = sorted(p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file()) if root.is_dir() else []
    aligned = [a for layer in layers for a in sorted((layer / "aligned").glob(f"*/{MANIFEST}"))]
    return layers + [a.parent for a in aligned]
