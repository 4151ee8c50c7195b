"""Files from strangers: regular files only, no symlink anywhere, no blocking open, bounded JSON, escaped output.

A cache folder is data that an attacker may have laid out: a symlink planted anywhere in it could make a
writer truncate, overwrite or delete a file elsewhere, a FIFO or device node could block a reader forever,
a JSON file could be huge, nested 10^5 deep or hold a key twice, and a string could carry terminal escape
sequences that repaint the screen. Every reader and writer of a cache first walks its tree
(`refuse_unsafe_tree`); every file is opened with O_NOFOLLOW | O_NONBLOCK and checked to be a regular file of
bounded size (`open_regular`); JSON is parsed strictly (`load_json`); untrusted text is printed through `shown`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

MAX_TREE_ENTRIES = 1_000_000  # files and folders under one cache root; more is not a cache
MAX_JSON_DEPTH = 32
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class CacheError(ValueError):
    """A cache that must not be used; the message names the problem and, where possible, the fix."""


def shown(text: object, limit: int = 200) -> str:
    """Untrusted text made safe to print: control characters (terminal escapes, NUL, newlines) escaped,
    cut to `limit` characters."""
    text = str(text)
    cut = text[:limit]
    safe = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in cut)
    return safe + (f"...({len(text)} characters)" if len(text) > limit else "")


def refuse_unsafe_tree(folder: Path) -> None:
    """CacheError if anything under `folder` (itself included) is a symlink or neither a file nor a folder."""
    folder = Path(folder)
    if folder.is_symlink():
        raise CacheError(f"{shown(folder)}: is a symlink; a cache must be its own real folder")
    entries, pending = 0, [folder]
    while pending:
        with os.scandir(pending.pop()) as scan:
            for entry in scan:
                entries += 1
                if entries > MAX_TREE_ENTRIES:
                    raise CacheError(f"{shown(folder)}: more than {MAX_TREE_ENTRIES} files; not a cache")
                if entry.is_symlink():
                    raise CacheError(f"{shown(entry.path)}: is a symlink; a cache must hold only regular files and "
                                     "folders (a symlink could make a writer change files elsewhere)")
                if entry.is_dir(follow_symlinks=False):
                    pending.append(Path(entry.path))
                elif not entry.is_file(follow_symlinks=False):
                    raise CacheError(f"{shown(entry.path)}: is not a regular file (a FIFO, socket or device); a cache "
                                     "must hold only regular files and folders")


def open_regular(path: Path, max_bytes: int) -> BinaryIO:
    """`path` opened for reading without following a symlink or blocking, checked to be a regular file of at
    most `max_bytes` bytes; CacheError otherwise."""
    try:
        fd = os.open(path, READ_FLAGS)
    except FileNotFoundError:
        raise CacheError(f"{shown(path)}: missing") from None
    except OSError as err:
        raise CacheError(f"{shown(path)}: cannot be opened safely ({err.strerror}; a symlink?)") from None
    info = os.fstat(fd)
    problem = ("not a regular file (a FIFO, socket or device)" if not stat.S_ISREG(info.st_mode) else
               f"{info.st_size} bytes, more than the {max_bytes} allowed" if info.st_size > max_bytes else None)
    if problem:
        os.close(fd)
        raise CacheError(f"{shown(path)}: {problem}")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: Path, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most `max_bytes` (see open_regular)."""
    with open_regular(path, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise CacheError(f"{shown(path)}: more than the {max_bytes} bytes allowed")
    return data


def sha256_regular(path: Path, max_bytes: int) -> tuple[int, str]:
    """(size, sha256) of a regular file of at most `max_bytes`, read in blocks."""
    digest, size = hashlib.sha256(), 0
    with open_regular(path, max_bytes) as f:
        while block := f.read(1 << 20):
            size += len(block)
            digest.update(block)
    return size, digest.hexdigest()


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    value: dict = {}
    for key, item in pairs:
        if key in value:
            raise ValueError(f"key '{shown(key, 60)}' appears twice in one object")
        value[key] = item
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def depth_of(value: object) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), without recursion."""
    deepest, pending = 0, [(value, 0)]
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            pending += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            pending += [(v, depth + 1) for v in item]
    return deepest


def load_json(path: Path, max_bytes: int) -> object:
    """A JSON file parsed strictly: at most `max_bytes`, UTF-8, no duplicate keys, no NaN or Infinity, at most
    MAX_JSON_DEPTH levels deep; CacheError otherwise."""
    data = read_regular(path, max_bytes)
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except RecursionError:
        raise CacheError(f"{shown(path)}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise CacheError(f"{shown(path)}: not valid JSON ({shown(err)})") from None
    if depth_of(value) > MAX_JSON_DEPTH:
        raise CacheError(f"{shown(path)}: JSON nested too deeply (more than {MAX_JSON_DEPTH} levels)")
    return value
