"""cache-push and cache-pull: move a verified cache between a local folder and a location (remote.py).

Push: the local cache must pass cache-verify. Data files (shards, the vocabulary) go first, then the cards,
then the manifests, so a reader never sees a manifest naming a missing file. A file whose remote copy already
has the same sha256 is skipped, so a rerun (after a change, or after kill -9) uploads only what differs.

Pull: the manifests are read once (from a pinned Hub commit) and validated like any manifest; every file
downloads to a temporary name while it is hashed and gets its final name only when its sha256 matches the
manifest, which is written last: the pulled bytes are the publisher's. The value checks of cache-verify run
where a cache is used (fuse-train, cache-align, cache-verify), not during the download. A rerun keeps the
verified files. `provenance.json` records where the cache came from.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import fsspec.asyn

from cache_builder.card import hub_card
from cache_builder.format import ALIGNED_DIR, CARD, MANIFEST, sha256_file, write_text_atomic
from cache_builder.manifest import CacheError, find_layers, load_manifest
from cache_builder.remote import (Location, RemoteError, bucket_missing, check_bucket, confine, explain, git_blob_sha1,
                                  layers_matching, read_bytes, read_if_present, redact)
from cache_builder.verify import verify_cache
from cache_builder.vocab_file import VOCAB_FILE

PROVENANCE = "provenance.json"
PART_SUFFIX = ".part-"
BLOCK = 1 << 23  # the most bytes taken from a download at a time


@dataclass(frozen=True)
class FileEntry:
    """One file of a cache, relative to the cache root, with the checksum it must have."""

    relpath: str
    sha256: str
    bytes: int


@dataclass
class TransferSummary:
    transferred: list[str] = field(default_factory=list)  # paths relative to the cache root
    bytes: int = 0  # transferred
    kept: int = 0  # files already there with the right sha256
    layers: list[str] = field(default_factory=list)

    @property
    def files(self) -> int:
        return len(self.transferred)


def join(layer: str, relpath: str) -> str:
    return f"{layer}/{relpath}" if layer else relpath


def layer_files(layer: str, manifest: dict) -> list[FileEntry]:
    """The files a manifest vouches for (shards and the source vocabulary), relative to the cache root."""
    entries = [FileEntry(join(layer, s["path"]), s["sha256"], s["bytes"]) for s in manifest["shards"]]
    vocab = (manifest.get("source") or {}).get("vocab_file") if manifest["layer"] == "source" else None
    if vocab:
        if vocab.get("path") != VOCAB_FILE:
            raise CacheError(f"{layer or '.'}/{MANIFEST}: vocabulary path {vocab.get('path')!r} is not {VOCAB_FILE}")
        entries.append(FileEntry(join(layer, VOCAB_FILE), vocab["sha256"], -1))
    return entries


def config_name(layer: str, manifest: dict) -> str:
    """The `datasets` config of a layer: `qwen`, `qwen.aligned.smollm2`."""
    parts = PurePosixPath(layer).parts if layer else ()
    if not parts or parts[0] == ALIGNED_DIR:
        parts = (manifest["source"]["name"], *parts)
    return ".".join(parts)


# ----------------------------------------------------------------------------------------------
# Push
# ----------------------------------------------------------------------------------------------


def _remote_checksum(loc: Location, entry: FileEntry, local: Path) -> bool:
    """Whether the remote file already holds exactly the local bytes (sha256 recorded at upload)."""
    path = loc.path(entry.relpath)
    try:
        if loc.protocol == "file":
            return Path(path).is_file() and sha256_file(Path(path)) == entry.sha256
        if loc.protocol == "s3":
            return loc.fs.metadata(path).get("sha256") == entry.sha256
        if loc.protocol == "gs":
            return (loc.fs.info(path).get("metadata") or {}).get("sha256") == entry.sha256
    except FileNotFoundError as err:
        if bucket_missing(err, loc):
            raise explain(err, loc, "checking what is already pushed") from None
        return False
    except Exception as err:  # noqa: BLE001
        raise explain(err, loc, "checking what is already pushed") from None
    raise RemoteError(f"{loc.url}: pushing to {loc.protocol}:// is not supported; push to s3://, gs://, hf:// or a folder")


def _hub_present(loc: Location, entries: list[tuple[FileEntry, Path]]) -> set[str]:
    """Paths whose Hub copy has the local bytes: LFS sha256, or git's blob id for small files."""
    from huggingface_hub import HfApi

    paths = {loc.in_repo(e.relpath): (e, local) for e, local in entries}
    try:
        infos = HfApi().get_paths_info(loc.repo_id, list(paths), repo_type="dataset", revision=loc.revision)
    except Exception as err:  # noqa: BLE001
        raise explain(err, loc, "checking what is already pushed") from None
    present = set()
    for info in infos:
        entry, local = paths[info.path]
        lfs = getattr(info, "lfs", None)
        if (lfs and lfs.sha256 == entry.sha256) or (not lfs and getattr(info, "blob_id", None) == git_blob_sha1(local)):
            present.add(entry.relpath)
    return present


def _upload(loc: Location, local: Path, entry: FileEntry) -> None:
    """One file to its remote name; the remote name never holds a partial file."""
    path = loc.path(entry.relpath)
    try:
        if loc.protocol == "file":
            final = Path(path)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".{final.name}{PART_SUFFIX}{os.getpid()}")
            shutil.copyfile(local, tmp)
            os.replace(tmp, final)
        elif loc.protocol == "s3":  # a PUT (or a multipart upload) appears whole or not at all
            loc.fs.put_file(str(local), path, Metadata={"sha256": entry.sha256})
        else:
            loc.fs.put_file(str(local), path, metadata={"sha256": entry.sha256})
    except Exception as err:  # noqa: BLE001
        raise explain(err, loc, f"uploading {entry.relpath}") from None


def _hub_commit(loc: Location, uploads: list[tuple[FileEntry, Path]], message: str) -> None:
    from huggingface_hub import CommitOperationAdd, HfApi

    operations = [CommitOperationAdd(path_in_repo=loc.in_repo(e.relpath), path_or_fileobj=str(local)) for e, local in uploads]
    try:
        HfApi().create_commit(loc.repo_id, operations, commit_message=message, repo_type="dataset")
    except Exception as err:  # noqa: BLE001
        raise explain(err, loc, "committing to the Hub") from None


def _send(loc: Location, files: list[tuple[FileEntry, Path]], summary: TransferSummary, message: str, workers: int) -> None:
    """Upload the files that differ from their remote copies."""
    if not files:
        return
    if loc.protocol == "hf":
        present = _hub_present(loc, files)
    else:
        with ThreadPoolExecutor(workers) as pool:
            same = list(pool.map(lambda f: _remote_checksum(loc, f[0], f[1]), files))
        present = {e.relpath for (e, _), s in zip(files, same) if s}
    todo = [(e, local) for e, local in files if e.relpath not in present]
    summary.kept += len(files) - len(todo)
    summary.transferred += [e.relpath for e, _ in todo]
    summary.bytes += sum(local.stat().st_size for _, local in todo)
    if not todo:
        return
    if loc.protocol == "hf":
        _hub_commit(loc, todo, message)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda f: _upload(loc, f[1], f[0]), todo))


def push_cache(cache: str | Path, loc: Location, *, licenses: tuple[str, ...] = (), workers: int = 8,
               log=print) -> TransferSummary:
    """Upload a verified local cache (a layer or a root with several sources) to `loc`."""
    cache = Path(cache)
    problems = verify_cache(cache)
    if problems:
        raise CacheError(f"{cache} does not pass cache-verify ({len(problems)} problem(s), the first: {problems[0]}); "
                         "fix or rebuild it before pushing")
    layers = {("" if p == cache else p.relative_to(cache).as_posix()): p for p in find_layers(cache)}
    manifests = {layer: load_manifest(folder) for layer, folder in layers.items()}

    def local_entry(layer: str, name: str) -> tuple[FileEntry, Path]:
        path = layers[layer] / name
        return FileEntry(join(layer, name), sha256_file(path), path.stat().st_size), path

    data = [(e, cache / e.relpath) for layer, m in manifests.items() for e in layer_files(layer, m)]
    cards = [local_entry(layer, CARD) for layer in layers if layer and (layers[layer] / CARD).is_file()]
    summary = TransferSummary(layers=list(layers))
    with tempfile.TemporaryDirectory() as tmp:
        root_card = Path(tmp) / CARD
        root_card.write_text(hub_card([(layer, m, config_name(layer, m)) for layer, m in manifests.items()], licenses))
        cards.append((FileEntry(CARD, sha256_file(root_card), root_card.stat().st_size), root_card))
        _send(loc, data, summary, "Logit cache: shards", workers)
        _send(loc, cards, summary, "Logit cache: dataset cards", workers)
        for aligned in (False, True):  # source manifests, then the aligned ones that name them
            manifests_now = [local_entry(layer, MANIFEST) for layer in layers
                             if (manifests[layer]["layer"] == "aligned") == aligned]
            _send(loc, manifests_now, summary, "Logit cache: manifests", workers)
    log(f"pushed {cache} -> {loc.url}: {summary.files} files ({summary.bytes} bytes) uploaded, "
        f"{summary.kept} already there, {len(layers)} layer(s)")
    return summary


# ----------------------------------------------------------------------------------------------
# Pull
# ----------------------------------------------------------------------------------------------


def select_layers(available: list[str], manifests: dict[str, dict], sources: tuple[str, ...] = (),
                  layers: tuple[str, ...] = ()) -> list[str]:
    """The layers a pull wants: --sources (source names) and --layers (`source`, `aligned/PIVOT`)."""
    chosen = []
    for layer in available:
        m = manifests[layer]
        kind = "source" if m["layer"] == "source" else f"{ALIGNED_DIR}/{PurePosixPath(layer).name}"
        if sources and m["source"]["name"] not in sources:
            continue
        if layers and kind not in layers:
            continue
        chosen.append(layer)
    if not chosen:
        have = ", ".join(f"{m['source']['name']}:{'source' if m['layer'] == 'source' else 'aligned/' + PurePosixPath(la).name}"
                         for la, m in manifests.items())
        raise CacheError(f"nothing matches --sources {list(sources) or 'any'} --layers {list(layers) or 'any'}; "
                         f"the location holds {have or 'no cache layer'}")
    return chosen


@dataclass(frozen=True)
class RemoteManifest:
    """A layer's manifest as read once from a location: validated like a local one, every file it names confined."""

    manifest: dict
    raw: bytes  # the bytes read, written unchanged into a pulled copy


def check_remote_manifest(loc: Location, layer: str, raw: bytes) -> RemoteManifest:
    """Validate a manifest read from `loc` (through a temporary folder, like a local one); CacheError naming it."""
    with tempfile.TemporaryDirectory() as staging:
        (Path(staging) / MANIFEST).write_bytes(raw)
        try:
            manifest = load_manifest(Path(staging))
        except CacheError as err:
            raise CacheError(str(err).replace(str(Path(staging) / MANIFEST), loc.display(join(layer, MANIFEST)))) from None
    for entry in layer_files(layer, manifest):
        confine(entry.relpath, loc.display(join(layer, MANIFEST)))
    return RemoteManifest(manifest, raw)


def read_layers(loc: Location) -> dict[str, RemoteManifest]:
    """Every cache layer at the location ('' for a layer at the root itself), source layers first, each with its
    manifest. The root's manifest is read while its aligned/ folder is listed, so a cache whose root is a layer
    costs one round trip (two with aligned layers) before its files download. CacheError if there is none."""
    with ThreadPoolExecutor(2) as pool:
        root = pool.submit(read_if_present, loc, MANIFEST)
        aligned = pool.submit(layers_matching, loc, f"{ALIGNED_DIR}/*/{MANIFEST}")
        root_manifest = root.result()
        raw = {} if root_manifest is None else {"": root_manifest}
        layers = [""] + aligned.result() if raw else layers_matching(loc, f"*/{MANIFEST}", f"*/{ALIGNED_DIR}/*/{MANIFEST}")
        rest = [layer for layer in layers if layer not in raw]
        raw.update(zip(rest, pool.map(lambda layer: read_bytes(loc, join(layer, MANIFEST)), rest)))
    if not raw:
        check_bucket(loc)
        raise CacheError(f"{loc.url}: no cache there (no {MANIFEST} at the location or one folder below it)")
    order = sorted(raw, key=lambda layer: (ALIGNED_DIR in PurePosixPath(layer).parts, layer))
    return {layer: check_remote_manifest(loc, layer, raw[layer]) for layer in order}


class _Incoming:
    """One file on its way in: written under a temporary name beside `final` and hashed as its bytes arrive. It
    gets its final name only if its sha256 and size are the manifest's; otherwise nothing of it remains."""

    def __init__(self, loc: Location, entry: FileEntry, final: Path):
        self.loc, self.entry, self.final = loc, entry, final
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = final.with_name(f".{final.name}{PART_SUFFIX}{os.getpid()}")
        self.out = open(self.tmp, "wb")
        self.hash, self.size = hashlib.sha256(), 0

    def take(self, block: bytes) -> bool:
        """Hash and write the next bytes; False once more arrived than the manifest records (read no further)."""
        self.size += len(block)
        if 0 <= self.entry.bytes < self.size:
            return False
        self.hash.update(block)
        self.out.write(block)
        return True

    def finish(self) -> None:
        """Give the file its final name if its bytes are the manifest's, else CacheError naming it."""
        self.out.close()
        if self.hash.hexdigest() != self.entry.sha256 or (self.entry.bytes >= 0 and self.size != self.entry.bytes):
            self.tmp.unlink(missing_ok=True)
            raise CacheError(f"{self.loc.display(self.entry.relpath)}: sha256 or size differs from the manifest "
                             "(modified or corrupted at the origin); refusing it. Ask the publisher to re-push the cache")
        if self.final.exists() or self.final.is_symlink():
            self.final.unlink()
        os.replace(self.tmp, self.final)

    def abandon(self, err: BaseException) -> RemoteError:
        """Remove the partial file; the store's error as one line."""
        self.out.close()
        self.tmp.unlink(missing_ok=True)
        return explain(err, self.loc, f"downloading {self.entry.relpath}")


def _fetch(loc: Location, entry: FileEntry, final: Path) -> None:
    """One file through the file system's blocking reader (the Hub, a folder)."""
    incoming = _Incoming(loc, entry, final)
    try:
        with loc.fs.open(loc.path(entry.relpath), "rb", block_size=BLOCK) as src:
            while (block := src.read(BLOCK)) and incoming.take(block):
                pass
    except Exception as err:  # noqa: BLE001 - every store error becomes one line naming the fix
        raise incoming.abandon(err) from None
    incoming.finish()


async def _fetch_async(loc: Location, entry: FileEntry, final: Path) -> None:
    """One file as one streamed GET (S3, HTTP): its bytes hashed and written as they arrive."""
    incoming = _Incoming(loc, entry, final)
    try:
        src = await loc.fs.open_async(loc.path(entry.relpath), "rb")
        while (block := await src.read(BLOCK)) and await asyncio.to_thread(incoming.take, block):
            pass  # hashed and written off the event loop (both release the GIL): the other GETs go on meanwhile
        await src.close()
    except Exception as err:  # noqa: BLE001
        raise incoming.abandon(err) from None
    incoming.finish()


async def _fetch_all_async(loc: Location, files: list[tuple[FileEntry, Path]], workers: int) -> list[BaseException | None]:
    """Every file, at most `workers` at a time, all in the file system's event loop; each one's error or None."""
    slots = asyncio.Semaphore(workers)

    async def one(entry: FileEntry, final: Path) -> None:
        async with slots:
            await _fetch_async(loc, entry, final)

    return await asyncio.gather(*(one(e, final) for e, final in files), return_exceptions=True)


def _streams(fs) -> bool:
    """Whether the file system streams a file with one request from its event loop (s3fs, HTTP)."""
    return getattr(fs, "async_impl", False) and type(fs).open_async is not fsspec.asyn.AsyncFileSystem.open_async


def _holds(final: Path, sha256: str) -> bool:
    """Whether `final` already holds the right bytes (hashed again: a file renamed just before a power cut is not
    trusted, so no fsync is needed)."""
    return final.is_file() and not final.is_symlink() and sha256_file(final) == sha256


def download_verified(loc: Location, files: list[tuple[FileEntry, Path]], workers: int = 8) -> list[bool]:
    """Download each (entry, final) to a temporary name, hashing as the bytes arrive; rename it to `final` only if
    its sha256 and size are the manifest's. Files already at `final` with the right bytes are kept. Returns, per
    file, whether it was downloaded. On S3 every file is one GET, `workers` of them at a time in one event loop."""
    there = [f for f in files if f[1].exists()]  # a fresh pull starts no hashing threads
    with ThreadPoolExecutor(min(workers, len(there) or 1)) as pool:
        held = {f[1] for f, ok in zip(there, pool.map(lambda f: _holds(f[1], f[0].sha256), there)) if ok}
    kept = [final in held for _, final in files]
    todo = [f for f, k in zip(files, kept) if not k]
    if _streams(loc.fs):
        for error in fsspec.asyn.sync(loc.fs.loop, _fetch_all_async, loc, todo, workers):
            if error is not None:
                raise error
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda f: _fetch(loc, *f), todo))
    return [not k for k in kept]


def _read_card(loc: Location, layer: str) -> bytes | None:
    """A layer's dataset card, or None: a card is documentation, and a cache without one is still whole."""
    try:
        return read_bytes(loc, join(layer, CARD))
    except RemoteError:
        return None


def _replace(path: Path, data: bytes) -> None:
    """Write `data` under a temporary name, then rename it to `path`. No fsync: after a crash, a rerun writes the
    card and the manifest again and hashes every file the manifest names."""
    tmp = path.with_name(f".{path.name}{PART_SUFFIX}{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def remove_partials(folder: Path) -> None:
    """Temporary files left by a pull killed mid-file (never under a final name)."""
    if folder.is_dir():
        for path in folder.rglob(f".*{PART_SUFFIX}*"):
            path.unlink(missing_ok=True)


def pulled_before(dest: Path, loc: Location) -> dict:
    """The layers recorded in `dest/provenance.json`; CacheError if `dest` holds a pull of another origin or revision."""
    path = dest / PROVENANCE
    if not path.is_file():
        return {}
    previous = json.loads(path.read_text())
    if previous.get("origin") != loc.url or previous.get("revision") != loc.revision:
        raise CacheError(f"{dest} holds a cache pulled from {previous.get('origin')} "
                         f"(revision {previous.get('revision')}); pull {loc.url} into another folder")
    return previous.get("layers", {})


def write_provenance(dest: Path, loc: Location, pulled: dict[str, RemoteManifest]) -> None:
    """`provenance.json`: origin (redacted), pinned revision, and each layer's manifest sha256."""
    layers = pulled_before(dest, loc)
    for layer, item in pulled.items():
        layers[layer or "."] = {"manifest_sha256": hashlib.sha256(item.raw).hexdigest(),
                                "source": item.manifest["source"]["name"], "layer": item.manifest["layer"]}
    record = {"origin": redact(loc.url), "revision": loc.revision, "protocol": loc.protocol,
              "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "layers": layers}
    write_text_atomic(dest / PROVENANCE, json.dumps(record, indent=2, sort_keys=True) + "\n")


def pull_cache(loc: Location, dest: str | Path, *, sources: tuple[str, ...] = (), layers: tuple[str, ...] = (),
               workers: int = 8, found: dict[str, RemoteManifest] | None = None, log=print) -> TransferSummary:
    """Download the chosen layers of the cache at `loc` into `dest`, every file verified before it is named.
    found: the location's layers as `read_layers` returned them to the caller (read here when omitted)."""
    dest = Path(dest)
    pulled_before(dest, loc)
    found = found if found is not None else read_layers(loc)
    wanted = select_layers(list(found), {layer: f.manifest for layer, f in found.items()}, sources, layers)
    folders = {layer: dest / layer if layer else dest for layer in wanted}
    for layer, folder in folders.items():
        remove_partials(folder)
        if (folder / MANIFEST).is_file() and (folder / MANIFEST).read_bytes() != found[layer].raw:
            (folder / MANIFEST).unlink()  # another version of the layer: it is a cache again once complete
    entries = [e for layer in wanted for e in layer_files(layer, found[layer].manifest)]
    with ThreadPoolExecutor(min(workers, len(wanted))) as pool:
        cards = pool.map(lambda layer: _read_card(loc, layer), wanted)  # while the data downloads
        fetched = download_verified(loc, [(e, dest / e.relpath) for e in entries], workers)
        cards = dict(zip(wanted, cards))
    downloaded = [e.relpath for e, f in zip(entries, fetched) if f]
    summary = TransferSummary(layers=wanted, transferred=downloaded, kept=fetched.count(False),
                              bytes=sum((dest / relpath).stat().st_size for relpath in downloaded))
    for layer, folder in folders.items():  # each manifest after its layer's files
        if cards.get(layer) is not None:
            _replace(folder / CARD, cards[layer].decode("utf-8", errors="replace").encode("utf-8"))
        _replace(folder / MANIFEST, found[layer].raw)
    write_provenance(dest, loc, {la: found[la] for la in wanted})
    log(f"pulled {loc.url}" + (f"@{loc.revision}" if loc.revision else "") + f" -> {dest}: {summary.files} files "
        f"({summary.bytes} bytes) downloaded, {summary.kept} already there and verified, {len(wanted)} layer(s)")
    return summary


def default_store() -> Path:
    """Where remote caches are kept locally: `$XDG_CACHE_HOME/logit-cache-fusion` (default ~/.cache/...)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "logit-cache-fusion"


def local_copy(loc: Location, cache_dir: str | Path | None = None, *, sources: tuple[str, ...] = (),
               layers: tuple[str, ...] = (), found: dict[str, RemoteManifest] | None = None, log=print) -> Path:
    """A verified local copy of (part of) a remote cache, under `cache_dir/pulled/`, named by the location and
    its pinned revision; files already there and verified are kept. A local location is returned as is.
    found: as for `pull_cache`."""
    if loc.is_local:
        return Path(loc.root)
    key = hashlib.sha256(f"{loc.url}@{loc.revision}".encode()).hexdigest()[:16]
    dest = Path(cache_dir or default_store()) / "pulled" / key
    pull_cache(loc, dest, sources=sources, layers=layers, found=found, log=log)
    return dest
