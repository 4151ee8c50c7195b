"""Opened cache layers, local or remote, and the local shard store that remote shards stream through.

A layer is opened ONCE: its manifest is read, every shard is verified (sha256, schema, row and token counts,
values: cache-verify's checks) and its record ids are collected. Whoever trains on it then asks the opened layer
for a shard by relative path and never reads the manifest again. A local layer answers with the file in its
folder. A remote layer answers with a file of the shard store: local files named by their sha256, fetched on
demand, hashed before first use, and evicted least recently used first when the store would pass its bound, so
a cache larger than the local disk still trains. A file is never evicted while a reader holds it (`ShardStore.held`):
a prefetch that would need its room fetches nothing, and the trainer fetches that shard itself when it reads it.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache_builder.format import sha256_file
from cache_builder.manifest import CacheError
from cache_builder.reader import Ragged, read_shard
from cache_builder.remote import Location
from cache_builder.share import FileEntry, default_store, download_verified, join
from cache_builder.untrusted import shown
from cache_builder.verify import verify_layer, verify_shard


class ShardStore:
    """Files addressed by sha256 under `root`, at most `max_bytes` of them (None: unbounded)."""

    def __init__(self, root: str | Path | None = None, max_bytes: int | None = None):
        self.root = Path(root or default_store() / "shards")
        self.max_bytes = max_bytes
        self._checked: set[str] = set()  # sha256 of the files hashed by this process
        self.fetched = 0  # files downloaded by this process
        self._lock = threading.Lock()  # one fetch at a time: the trainer's and the prefetcher's
        self._held: Counter[str] = Counter()  # sha256 -> readers holding the file (never evicted meanwhile)
        self._background: ThreadPoolExecutor | None = None

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    @contextmanager
    def held(self, loc: Location, entry: FileEntry) -> Iterator[Path]:
        """The local file holding `entry`'s bytes (as `fetch`), kept in the store until the block ends."""
        path = self.fetch(loc, entry, hold=True)
        try:
            yield path
        finally:
            with self._lock:
                self._held[entry.sha256] -= 1
                if not self._held[entry.sha256]:
                    del self._held[entry.sha256]

    def fetch(self, loc: Location, entry: FileEntry, hold: bool = False, optional: bool = False) -> Path | None:
        """The local file holding `entry`'s bytes: downloaded if absent, hashed once per process, marked used;
        `hold` counts one more reader of it (`held` releases it). `optional` (a prefetch): None, and nothing
        downloaded, when the bound leaves no room for it besides the files readers hold."""
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            path = self.path(entry.sha256)
            if path.is_file() and (entry.sha256 in self._checked or sha256_file(path) == entry.sha256):
                os.utime(path)  # most recently used
            else:
                if not self._make_room(entry.bytes) and optional:
                    return None
                download_verified(loc, [(entry, path)])
                self.fetched += 1
            self._checked.add(entry.sha256)
            if hold:
                self._held[entry.sha256] += 1
            return path

    def fetch_later(self, loc: Location, entry: FileEntry) -> None:
        """Fetch `entry` in a background thread (a shard the run reads next); a failure there is raised again by
        the `fetch` that needs the file."""
        if self._background is None:
            self._background = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
        self._background.submit(self.fetch, loc, entry, optional=True)

    def _make_room(self, incoming: int) -> bool:
        """Evict the least recently used files not held by a reader until `incoming` more bytes fit under the
        bound; whether they fit."""
        if self.max_bytes is None:
            return True
        files = [(p.stat().st_mtime, p.stat().st_size, p) for p in self.root.iterdir()
                 if p.is_file() and not p.name.startswith(".")]
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total + incoming <= self.max_bytes:
                break
            if path.name in self._held:
                continue
            path.unlink(missing_ok=True)
            self._checked.discard(path.name)
            total -= size
        return total + incoming <= self.max_bytes


@dataclass
class VerifiedLayer:
    """One cache layer after opening: where it is, its manifest, what verification found, its record ids."""

    origin: str  # the layer's folder, or its redacted URL
    manifest: dict | None  # None when the manifest itself is unusable (see problems)
    problems: list[str]  # cache-verify's findings at opening; [] = verified
    record_ids: list[str]
    folder: Path | None = None  # a local layer
    location: Location | None = None  # a remote layer: its location, its folder there, the store it streams through
    prefix: str = ""
    store: ShardStore | None = None
    entries: dict[str, FileEntry] = field(default_factory=dict)

    @contextmanager
    def shard_file(self, relpath: str) -> Iterator[Path]:
        """A local, verified file with the bytes of shard `relpath` (as the manifest names it), there until the
        block ends."""
        if self.folder is not None:
            yield self.folder / relpath
        else:
            with self.store.held(self.location, self.entries[relpath]) as path:
                yield path

    def prefetch(self, relpath: str) -> None:
        """Start fetching a remote shard the caller reads soon; nothing to do for a local layer."""
        if self.folder is None:
            self.store.fetch_later(self.location, self.entries[relpath])

    def read(self, relpath: str, columns: list[str] | None = None) -> dict[str, np.ndarray | Ragged]:
        """One whole shard as numpy arrays (cache_builder.reader.read_shard)."""
        with self.shard_file(relpath) as path:
            return read_shard(path.parent, path.name, columns)

    @property
    def shard_paths(self) -> list[str]:
        return [s["path"] for s in self.manifest["shards"]]


def open_local_layer(folder: str | Path) -> VerifiedLayer:
    """Open a local layer: cache-verify's checks, once; the manifest they read is the one passed on."""
    folder = Path(folder)
    check = verify_layer(folder)
    return VerifiedLayer(str(folder), check.manifest, check.problems, check.record_ids, folder=folder)


def open_remote_layer(loc: Location, prefix: str, manifest: dict, store: ShardStore) -> VerifiedLayer:
    """Open a remote aligned layer from its manifest (as share.read_layers read and validated it): every shard
    fetched into the store (sha256-checked as it arrives) and checked like cache-verify checks a local shard; the
    store may evict it later and fetch the same bytes again on demand."""
    origin = loc.display(prefix)
    if manifest["layer"] != "aligned":
        raise CacheError(f"{origin} is a source layer: pull it (cache-pull) and align it to a pivot before training")
    vocab = manifest["pivot"]["vocab_size"]  # bounded by the schema; equal to the pivot's (fuse_trainer.data.check_pivot)
    entries = {s["path"]: FileEntry(join(prefix, s["path"]), s["sha256"], s["bytes"]) for s in manifest["shards"]}
    problems, ids = [], []
    for shard in manifest["shards"]:
        with store.held(loc, entries[shard["path"]]) as path:
            try:
                shard_problems, shard_ids = verify_shard(path, shard, manifest, vocab, deep=True)
            except CacheError as err:
                shard_problems, shard_ids = [str(err)], []
        problems += [p.replace(shown(path), loc.display(entries[shard["path"]].relpath)) for p in shard_problems]
        ids += shard_ids
    duplicates = len(ids) - len(set(ids))
    if duplicates:
        problems.append(f"{origin}: {duplicates} duplicate record ids")
    return VerifiedLayer(origin, manifest, problems, ids, location=loc, prefix=prefix, store=store, entries=entries)
