"""Loading a manifest safely: caches come from strangers.

A manifest is plain JSON, read strictly (size cap, no duplicate keys, bounded nesting; untrusted.load_json)
and checked against the manifest schema (schema.py) before any field is used. Every shard path is checked
to be a relative path under the cache folder's shards/ (no `..`, no absolute path, no symlink), listed
once, and the format version is checked to be one this code understands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cache_builder.format import FORMAT_NAME, FORMAT_VERSION, MANIFEST, SHARD_DIR
from cache_builder.schema import MAX_MANIFEST_BYTES, SHARD_PATH, check_manifest
from cache_builder.untrusted import CacheError, load_json, refuse_unsafe_tree, shown

__all__ = ["CacheError", "OpenedLayer", "check_shard_path", "find_layers", "load_manifest", "open_layer"]


def check_shard_path(folder: Path, relpath: object) -> Path:
    """The shard's absolute path, or CacheError if the manifest points anywhere but shards/ inside folder."""
    where = f"{shown(folder / MANIFEST)}: shard path '{shown(relpath, 80)}'"
    if not isinstance(relpath, str) or not relpath:
        raise CacheError(f"{where} is not a string")
    pure = PurePosixPath(relpath)
    if pure.is_absolute() or relpath.startswith(("/", "\\")) or ":" in pure.parts[0]:
        raise CacheError(f"{where} is absolute; shard paths must be relative")
    if ".." in pure.parts or pure.parts[0] != SHARD_DIR or "\\" in relpath:
        raise CacheError(f"{where} points outside {SHARD_DIR}/ of the cache")
    if not re.fullmatch(SHARD_PATH, relpath):
        raise CacheError(f"{where} is not a shard name ({SHARD_PATH})")
    path = folder / pure
    if path.is_symlink() or any(p.is_symlink() for p in path.parents if folder in p.parents or p == folder):
        raise CacheError(f"{shown(path)}: shard is a symlink; a cache must contain its shards as regular files")
    return path


def load_manifest(folder: str | Path) -> dict:
    """Read and validate `folder/manifest.json` (schema, version, shard paths); no shard is opened."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists() and not path.is_symlink():
        raise CacheError(
            f"{shown(folder)} is not a cache: it has no {MANIFEST} (an unfinished build? rerun the same cache-build "
            "command to resume it)"
        )
    manifest = load_json(path, MAX_MANIFEST_BYTES)
    where = shown(path)
    if isinstance(manifest, dict) and manifest.get("format") != FORMAT_NAME:
        raise CacheError(f"{where}: format '{shown(manifest.get('format'), 60)}' is not {FORMAT_NAME!r}")
    check_manifest(manifest, where)
    version = manifest["format_version"]
    if version > FORMAT_VERSION:
        raise CacheError(
            f"{where}: format version {version} is newer than this code reads ({FORMAT_VERSION}); "
            "upgrade logit-cache-fusion"
        )
    for shard in manifest["shards"]:
        check_shard_path(folder, shard["path"])
    return manifest


@dataclass(frozen=True)
class OpenedLayer:
    """One cache layer opened once: its folder, its validated manifest and the checked path of every shard
    (in manifest order). What readers take instead of a bare folder: nothing here needs checking again."""

    folder: Path
    manifest: dict
    shard_paths: tuple[Path, ...]


def open_layer(folder: str | Path) -> OpenedLayer:
    """Open a cache layer: refuse a tree with a symlink or special file, load and validate the manifest."""
    folder = Path(folder)
    refuse_unsafe_tree(folder)
    manifest = load_manifest(folder)
    return OpenedLayer(folder, manifest, tuple(folder / s["path"] for s in manifest["shards"]))


def find_layers(path: str | Path) -> list[Path]:
    """Cache layers under `path`: itself if it has a manifest, else each source folder and its aligned/*."""
    root = Path(path)
    if (root / MANIFEST).is_file():
        layers = [root]
    else:
        layers = sorted(p for p in root.iterdir() if p.is_dir() and (p / MANIFEST).is_file()) if root.is_dir() else []
    aligned = [a for layer in layers for a in sorted((layer / "aligned").glob(f"[!.]*/{MANIFEST}"))]
    return layers + [a.parent for a in aligned]
