"""The local shard store that remote shards stream through: bounded, least recently used first, and never
evicting a file a reader holds (the prefetcher fetches the next shards while the trainer reads this one)."""

import hashlib
import os

from cache_builder.remote import open_location
from cache_builder.share import FileEntry
from cache_builder.store import ShardStore


def published(folder, names, size=100):
    """Files of `size` distinct bytes under `folder`, with their FileEntry."""
    folder.mkdir()
    entries = {}
    for i, name in enumerate(names):
        data = bytes([i]) * size
        (folder / name).write_bytes(data)
        entries[name] = FileEntry(name, hashlib.sha256(data).hexdigest(), size)
    return entries


def aged(path, seconds):
    """Set `path`'s last use `seconds` into the past (file times can tie within a test's milliseconds)."""
    stamp = path.stat().st_mtime - seconds
    os.utime(path, (stamp, stamp))


def test_the_least_recently_used_file_is_evicted_to_stay_under_the_bound(tmp_path):
    entries = published(tmp_path / "remote", ["a", "b", "c"])
    loc, store = open_location(tmp_path / "remote"), ShardStore(tmp_path / "store", max_bytes=250)
    aged(store.fetch(loc, entries["a"]), 20)
    aged(store.fetch(loc, entries["b"]), 10)
    store.fetch(loc, entries["a"])  # used again: now b is the oldest
    store.fetch(loc, entries["c"])
    assert sorted(p.name for p in store.root.iterdir()) == sorted([entries["a"].sha256, entries["c"].sha256])
    assert store.fetched == 3


def test_a_held_file_survives_fetches_past_the_bound_and_is_evicted_once_released(tmp_path):
    entries = published(tmp_path / "remote", ["a", "b", "c", "d"])
    loc, store = open_location(tmp_path / "remote"), ShardStore(tmp_path / "store", max_bytes=250)
    with store.held(loc, entries["a"]) as path:
        aged(path, 20)
        aged(store.fetch(loc, entries["b"]), 10)
        store.fetch(loc, entries["c"])  # a is the oldest but held: b goes
        assert path.read_bytes() == bytes([0]) * 100
        assert not store.path(entries["b"].sha256).exists()
    store.fetch(loc, entries["d"])  # released: a, now the oldest, goes
    assert not path.exists()
    assert sorted(p.name for p in store.root.iterdir()) == sorted([entries["c"].sha256, entries["d"].sha256])


def test_a_prefetch_needing_a_held_files_room_fetches_nothing_and_a_read_still_gets_its_file(tmp_path):
    entries = published(tmp_path / "remote", ["a", "b"])
    loc, store = open_location(tmp_path / "remote"), ShardStore(tmp_path / "store", max_bytes=150)
    with store.held(loc, entries["a"]) as path:
        assert store.fetch(loc, entries["b"], optional=True) is None
        assert [p.name for p in store.root.iterdir()] == [entries["a"].sha256]
        assert path.read_bytes() == bytes([0]) * 100
    assert store.fetch(loc, entries["b"], optional=True) == store.path(entries["b"].sha256)  # released: a goes
    with store.held(loc, entries["a"]) as path:  # read again: fetched again, b goes
        assert path.read_bytes() == bytes([0]) * 100
    assert [p.name for p in store.root.iterdir()] == [entries["a"].sha256] and store.fetched == 3
