"""Aligned shards of N sources -> training batches of tensors. No source model is ever loaded.

Each source folder under the cache root (a folder or a URL, or several) holds `aligned/<pivot>/`. Each layer is
opened once (cache_builder.store: manifest read, every shard verified: checksums, schema, values) and the
opened layers are passed down. The sources are checked to describe the same records (or, with `--join
intersect`, trained on the records they share) on the same pivot tokenizer, then joined by record id. A batch carries the pivot's tokens and, per source, the cached signals at the
pivot positions that have a partner in that source.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from cache_builder.format import ALIGNED_DIR, MANIFEST, missing_statistics, topk_values
from cache_builder.manifest import CacheError
from cache_builder.reader import Ragged
from cache_builder.store import VerifiedLayer, ShardStore, open_local_layer, open_remote_layer
from cache_builder.verify import cross_source_problems
from cache_builder.untrusted import shown

SOURCE_FIELDS = ("aligned_pos", "topk_ids", "topk_logits", "native_topk_logits", "logsumexp", "logit_mean", "logit_std", "z_logsumexp",
                 "gold_logprob", "kept_mass", "chunk_logprob")


def discover_sources(root: str | Path, pivot: str, sources: list[str] | None = None, *, align_pivot: str | None = None,
                     store: ShardStore | None = None, allow_insecure: bool = False,
                     log=print) -> dict[str, VerifiedLayer]:
    """{source name: its aligned layer for `pivot`, opened (verified once)} from one or more cache roots.

    root: a cache root, a source folder or a URL (s3://, gs://, hf://datasets/...), or several joined by ','.
    A source with no layer aligned to the pivot is aligned here when `align_pivot` (the pivot model) is given:
    cheap, only the pivot's tokenizer is loaded; a remote source is pulled (its source layer, verified) first.
    """
    found: dict[str, VerifiedLayer] = {}
    for spec in [s for s in str(root).split(",") if s]:
        for name, layer in _sources_at(spec, pivot, align_pivot, store, allow_insecure, log).items():
            if name in found:
                raise CacheError(f"source {name!r} is in both {found[name].origin} and {layer.origin}; "
                                 "keep one of them (--sources, or a different --shards list)")
            found[name] = layer
    if not found:
        raise CacheError(
            f"no source under {root} is aligned to pivot {pivot!r}; run `cache-align --cache {root}/<source> --pivot {pivot}`"
        )
    if sources:
        missing = [s for s in sources if s not in found]
        if missing:
            raise CacheError(f"sources {missing} have no aligned/{pivot} under {root}; found {sorted(found)}")
        found = {s: found[s] for s in sources}
    return found


def _sources_at(spec: str, pivot: str, align_pivot: str | None, store: ShardStore | None, allow_insecure: bool,
                log) -> dict[str, VerifiedLayer]:
    """The sources at one location, each opened at its layer aligned to `pivot` (aligned here if needed)."""
    from cache_builder.align import align_cache
    from cache_builder.remote import is_url, open_location
    from cache_builder.share import local_copy, read_layers

    if not is_url(spec):
        root = Path(spec)
        if not root.is_dir():
            raise CacheError(f"cache root {root} does not exist: build one with `cache-build --model <source> --corpus "
                             f"<corpus> --out {root}`, or pass --shards the folder that holds <source>/aligned/{pivot}/")
        sources = [root] if (root / MANIFEST).is_file() else sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        found = {}
        for folder in sources:
            aligned = folder / ALIGNED_DIR / pivot
            if not (aligned / MANIFEST).is_file() and align_pivot and (folder / MANIFEST).is_file():
                log(f"{folder} has no layer aligned to {pivot}: aligning it now (no source model is loaded)")
                aligned = align_cache(folder, align_pivot, log=log)
            if (aligned / MANIFEST).is_file():
                found[folder.name] = open_local_layer(aligned)
        return found
    store = store or ShardStore()
    loc = open_location(spec, allow_insecure=allow_insecure)
    layers = read_layers(loc)
    manifests = {layer: read.manifest for layer, read in layers.items()}
    found = {}
    for layer in layers:
        parts = PurePosixPath(layer).parts
        name = parts[0] if parts and parts[0] != ALIGNED_DIR else manifests[layer]["source"]["name"]
        if manifests[layer]["layer"] == "aligned" and parts[-1] == pivot:
            found[name] = open_remote_layer(loc, layer, manifests[layer], store)
    for layer in layers:
        parts = PurePosixPath(layer).parts
        name = parts[0] if parts else manifests[layer]["source"]["name"]
        if manifests[layer]["layer"] == "source" and name not in found and align_pivot:
            log(f"{loc.display(layer)} has no layer aligned to {pivot}: pulling its source layer and aligning it "
                "(no source model is loaded)")
            copy = local_copy(loc, store.root.parent, sources=(manifests[layer]["source"]["name"],), layers=("source",),
                              found=layers, log=log)
            found[name] = open_local_layer(align_cache(copy / layer if layer else copy, align_pivot, log=log))
    return found


def check_domain_epochs(layers: dict[str, VerifiedLayer], domain_epochs: dict[str, int]) -> None:
    """ValueError unless every domain named in `domain_epochs` is one of the corpus's (a misspelt domain would
    silently be seen every epoch)."""
    known = next(iter(layers.values())).manifest["corpus"]["summary"].get("domains", {})
    unknown = sorted(set(domain_epochs) - set(known))
    if unknown:
        raise ValueError(f"domain_epochs names the domain(s) {', '.join(unknown)}, which the corpus does not have "
                         f"(its domains: {', '.join(sorted(known)) or 'none recorded'})")


def check_named_sources(layers: dict[str, VerifiedLayer], setting: str, names) -> None:
    """ValueError unless every source a per-source setting names is one of `layers`."""
    unknown = sorted(set(names) - set(layers))
    if unknown:
        raise ValueError(f"{setting} names {', '.join(map(repr, unknown))}, not a source of this run "
                         f"({', '.join(layers)})")


def check_source_domains(layers: dict[str, VerifiedLayer], source_domains: dict[str, list[str]]) -> None:
    """ValueError unless every source named in `source_domains` is one of `layers` and every domain listed for it
    is one of its corpus's (a misspelt domain would silently leave the source teaching nothing)."""
    check_named_sources(layers, "source_domains", source_domains)
    for name, domains in source_domains.items():
        known = layers[name].manifest["corpus"]["summary"].get("domains", {})
        unknown = sorted(set(domains) - set(known))
        if unknown:
            raise ValueError(f"source_domains gives {name} the domain(s) {', '.join(unknown)}, which its corpus does not "
                             f"have (its domains: {', '.join(sorted(known)) or 'none recorded'})")


def refuse_unverified(layers: dict[str, VerifiedLayer]) -> None:
    """CacheError naming every problem of the layers that failed verification when opened (their manifests are
    not to be read)."""
    problems = [p for layer in layers.values() for p in layer.problems]
    if problems:
        raise CacheError("refusing to train on these caches: " + "; ".join(problems))


def check_sources(layers: dict[str, VerifiedLayer], join: str = "exact") -> None:
    """Refuse layers that failed verification when opened, or that do not describe the same records (join
    `exact`) or share none (`intersect`), or were aligned to different pivot tokenizers."""
    refuse_unverified(layers)
    keys = {name: Path(layer.origin) for name, layer in layers.items()}
    ids = {keys[n]: set(layer.record_ids) for n, layer in layers.items()}
    corpus = {keys[n]: layer.manifest["corpus"]["fingerprint"] for n, layer in layers.items()}
    pivots = {keys[n]: layer.manifest["pivot"]["tokenizer_fingerprint"] for n, layer in layers.items()}
    shared = set.intersection(*ids.values())
    if join == "intersect":
        problems = cross_source_problems(dict.fromkeys(ids, shared), dict.fromkeys(ids, ""), pivots)
        if not shared:
            problems.append(f"{', '.join(layers)} share no record: nothing to train on")
    else:
        problems = cross_source_problems(ids, corpus, pivots)
        if any(len(i) != len(shared) for i in ids.values()):
            counts = ", ".join(f"{n} {len(layer.record_ids)}" for n, layer in layers.items())
            problems.append(f"{len(shared)} records are shared by all sources (records: {counts}); "
                            "--join intersect trains on the shared records only")
    if problems:
        for name, layer in layers.items():  # name remote layers by their URLs
            problems = [p.replace(str(keys[name]), layer.origin) for p in problems]
        raise CacheError("refusing to train on these caches: " + "; ".join(problems))


def check_pivot(layers: dict[str, VerifiedLayer], tokenizer, embedding_rows: int) -> None:
    """The aligned layers were made for the pivot being trained: the tokenizer fingerprint of each layer is
    the loaded tokenizer's, and its vocabulary (which bounds every id, see cache_builder.values) fits the
    model's embedding rows. A manifest alone is never trusted for either."""
    from alignment import tokenizer_fingerprint

    loaded = tokenizer_fingerprint(tokenizer)
    for layer in layers.values():
        pivot = layer.manifest["pivot"]
        if pivot["tokenizer_fingerprint"] != loaded:
            raise CacheError(f"{shown(layer.origin)}: aligned to another pivot tokenizer (fingerprint "
                             f"{pivot['tokenizer_fingerprint'][:12]}) than the pivot loaded ({loaded[:12]}); rerun "
                             f"`cache-align --cache {shown(layer.origin.rsplit('/', 2)[0])} --pivot <this pivot>`")
        if pivot["vocab_size"] > embedding_rows:
            raise CacheError(f"{shown(layer.origin)}: pivot vocab_size {pivot['vocab_size']} is more than the "
                             f"{embedding_rows} token rows of the pivot loaded; the layer was made for another pivot")


def known_statistics_gaps(manifest: dict) -> set[str]:
    """Statistics an (imported) layer lacks; a logsumexp of raw log-probs is known (0) and not a gap."""
    missing = set(missing_statistics(manifest))
    if topk_values(manifest) == "logprobs":
        missing.discard("logsumexp")
    return missing


def check_statistics(layers: dict[str, VerifiedLayer], needed: dict[str, str]) -> None:
    """Refuse sources that lack a statistic the run needs (imported caches store only what their format kept)."""
    problems = []
    for name, layer in layers.items():
        manifest = layer.manifest
        for stat in sorted(known_statistics_gaps(manifest) & set(needed)):
            problems.append(f"source {name}: {stat} is missing (the cache was imported from a format that does not "
                            f"keep it), and {needed[stat]} needs it; choose a loss/weighting/gate that does not, e.g. "
                            "--loss fusellm --weighting uniform --gate none")
    if problems:
        raise CacheError("refusing to train on these caches:\n  " + "\n  ".join(problems))


@dataclass
class FusionDataset:
    """Records of one shard group, joined across sources; arrays stay columnar (Ragged), never per token."""

    record_ids: list[str]
    domains: list[str | None]
    gold_text: np.ndarray  # (R,) bool: the record's text is learned by the SFT term (False: a distill-only split)
    token_ids: Ragged  # (T) per record
    loss_mask: Ragged  # (T-1) per record
    sources: dict[str, dict[str, Ragged]]  # source -> field -> Ragged, rows in record_ids order

    def __len__(self) -> int:
        return len(self.record_ids)

    @property
    def num_tokens(self) -> np.ndarray:
        return self.token_ids.lengths


@dataclass(frozen=True)
class ShardIndex:
    """What planning an epoch needs from one shard group, without its signals."""

    path: str  # relative path of the first source's shard that defines the group
    # source -> (shard path, row numbers) pieces whose rows, concatenated, are the group's records in record-id
    # order: one piece (the shard of the same path) when every source holds the same records in the same shards
    rows: dict[str, tuple[tuple[str, np.ndarray], ...]]
    num_tokens: np.ndarray  # (R,) pivot tokens per record
    response_tokens: np.ndarray  # (R,) positions that predict a response token
    domains: np.ndarray  # (R,) object: each record's corpus domain (None where the corpus gives none)


def record_locations(layer: VerifiedLayer) -> dict[str, tuple[str, int]]:
    """record id -> (shard path, row) in a layer, from the ids collected when it was opened (in shard order)."""
    where, start = {}, 0
    for shard in layer.manifest["shards"]:
        for row, record_id in enumerate(layer.record_ids[start : start + shard["rows"]]):
            where[record_id] = (shard["path"], row)
        start += shard["rows"]
    return where


def pieces(locations: list[tuple[str, int]]) -> tuple[tuple[str, np.ndarray], ...]:
    """[(path, row), ...] -> runs of the same shard, in order."""
    runs: list[tuple[str, list[int]]] = []
    for path, row in locations:
        if not runs or runs[-1][0] != path:
            runs.append((path, []))
        runs[-1][1].append(row)
    return tuple((path, np.array(rows, dtype=np.int64)) for path, rows in runs)


def index_shards(layers: dict[str, VerifiedLayer], splits: tuple[str, ...], join: str = "exact") -> list[ShardIndex]:
    """Index every shard group: where each source holds the group's records of `splits`.

    join `exact`: every source holds the same records in the same shards. `intersect`: only the records every
    source holds, wherever each source keeps them (labs that built on different corpora or shardings)."""
    names = list(layers)
    first = layers[names[0]]
    if join == "exact":
        for name in names[1:]:
            if layers[name].shard_paths != first.shard_paths:
                raise CacheError(
                    f"{layers[name].origin} and {first.origin} are sharded differently; build every source with the same "
                    "--rows-per-shard and --world-size so that their shards hold the same records, or train on the "
                    "shared records with --join intersect"
                )
        shared, where = None, {}
    else:
        shared = np.array(sorted(set.intersection(*(set(layer.record_ids) for layer in layers.values()))))
        where = {name: record_locations(layers[name]) for name in names[1:]}
    index, seen = [], set()
    for path in first.shard_paths:
        meta = first.read(path, ["record_id", "split", "num_tokens", "loss_mask", "domain"])
        seen.update(np.unique(meta["split"]).tolist())
        keep = np.flatnonzero(np.isin(meta["split"], splits) & (True if shared is None else np.isin(meta["record_id"], shared)))
        order = keep[np.argsort(meta["record_id"][keep], kind="stable")]
        ids = meta["record_id"][order]
        rows = {names[0]: ((path, order),)}
        for name in names[1:]:
            if join == "exact":  # the same records in the shard of the same path
                other = layers[name].read(path, ["record_id", "split"])
                keep_other = np.flatnonzero(np.isin(other["split"], splits))
                other_order = keep_other[np.argsort(other["record_id"][keep_other], kind="stable")]
                if not np.array_equal(other["record_id"][other_order], ids):
                    raise CacheError(f"{layers[name].origin}/{path}: its {'/'.join(splits)} records differ from "
                                     f"{first.origin}/{path}")
                rows[name] = ((path, other_order),)
            else:
                rows[name] = pieces([where[name][record_id] for record_id in ids])
        counted = np.concatenate([[0], np.cumsum(meta["loss_mask"].values, dtype=np.int64)])
        response = (counted[meta["loss_mask"].offsets[1:]] - counted[meta["loss_mask"].offsets[:-1]])[order]
        if len(ids):
            index.append(ShardIndex(path, rows, meta["num_tokens"][order].astype(np.int64), response.astype(np.int64),
                                    np.asarray(meta["domain"], dtype=object)[order]))
    missing = [s for s in splits if s not in seen]
    if missing:  # a misspelled split would otherwise train on the others alone, silently
        raise CacheError(f"no records of split {' or '.join(map(repr, missing))} in the caches; "
                         f"they hold {', '.join(map(repr, sorted(seen)))}")
    return index


class FusionData:
    """The training records of several sources, streamed a few shard groups at a time (bounded memory).

    A cache stores records in corpus order, and a corpus is often sorted (one domain after another), so
    training shard group after shard group would learn one domain, then the next, and forget. Shard groups
    come in a seeded random order, `window` at a time; the micro-batches of a window's groups are shuffled
    together, and at most `window` groups are held in memory. Records of the `distill_only` splits (text the
    pivot wrote itself) are marked as having no gold text to learn; a source named in `source_domains` has no
    aligned positions, so teaches nothing, in the records of other domains. A domain named in `domain_epochs`
    is in the first N epochs only (e.g. {prose: 1}: prose seen once while the rest is seen every epoch).
    """

    def __init__(self, layers: dict[str, VerifiedLayer], splits: tuple[str, ...] = ("train",), window: int = 1,
                 distill_only: tuple[str, ...] = (), join: str = "exact",
                 source_domains: dict[str, list[str]] | None = None, domain_epochs: dict[str, int] | None = None):
        if window < 1:
            raise ValueError(f"the shuffle window must hold at least one shard group, got {window}")
        self.layers, self.window, self.distill_only = layers, window, distill_only
        self.source_domains = source_domains or {}
        self.domain_epochs = domain_epochs or {}
        self.index = index_shards(layers, splits, join)
        self.zero_lse = {name for name, layer in layers.items()
                         if topk_values(layer.manifest) == "logprobs" and "logsumexp" in missing_statistics(layer.manifest)}
        self._loaded: OrderedDict[int, FusionDataset] = OrderedDict()  # the last `window` groups used

    def __len__(self) -> int:
        return sum(len(s.num_tokens) for s in self.index)

    def prefetch(self, i: int) -> None:
        """Start fetching the remote shards of group i, unless it is in memory: they arrive while a step trains."""
        if i not in self._loaded:
            for name, layer in self.layers.items():
                for path, _ in self.index[i].rows[name]:
                    layer.prefetch(path)

    def shard(self, i: int) -> FusionDataset:
        """Shard group i, joined across sources."""
        if i not in self._loaded:
            entry = self.index[i]
            first = next(iter(self.layers))
            (_, rows), = entry.rows[first]  # the first source: one piece, the group's own shard
            data = self.layers[first].read(entry.path)
            if first in self.zero_lse:  # raw log-probs: their full-vocabulary logsumexp is 0
                data["logsumexp"] = Ragged(np.zeros_like(data["logsumexp"].values), data["logsumexp"].offsets)
            sources = {first: {f: take_rows(data[f], rows) for f in SOURCE_FIELDS}}
            for name, layer in list(self.layers.items())[1:]:
                sources[name] = gather_rows(layer, entry.rows[name], SOURCE_FIELDS)
                if name in self.zero_lse:
                    lse = sources[name]["logsumexp"]
                    sources[name]["logsumexp"] = Ragged(np.zeros_like(lse.values), lse.offsets)
            domains = list(data["domain"][rows])
            for name in set(self.source_domains) & set(sources):
                taught = taught_records(domains, self.source_domains[name])
                sources[name] = {f: emptied_rows(column, taught) for f, column in sources[name].items()}
            self._loaded[i] = FusionDataset(list(data["record_id"][rows]), domains,
                                            ~np.isin(data["split"][rows], self.distill_only),
                                            take_rows(data["token_ids"], rows), take_rows(data["loss_mask"], rows),
                                            sources)
            while len(self._loaded) > self.window:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(i)
        return self._loaded[i]

    def plan(self, epoch: int, batch_tokens: int, seed: int) -> list[tuple[int, np.ndarray]]:
        """(shard group, rows) of every micro-batch of an epoch, deterministic from (seed, epoch).

        The batches of one group are already in random order (`token_batches`); those of a window of
        several groups are shuffled together."""
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(self.index))
        over = [d for d, n in self.domain_epochs.items() if epoch >= n]  # domains whose epochs are done
        plan = []
        for start in range(0, len(order), self.window):
            groups = order[start : start + self.window]
            batches = []
            for i in groups:
                kept = np.flatnonzero(~taught_records(list(self.index[i].domains), over))  # (R',) rows of this epoch
                batches += [(int(i), kept[rows]) for rows in token_batches(self.index[i].num_tokens[kept], batch_tokens, rng)]
            if len(groups) > 1:
                batches = [batches[j] for j in rng.permutation(len(batches))]
            plan += batches
        return plan


def taught_records(domains: list[str | None], allowed: list[str]) -> np.ndarray:
    """(R,) bool: the records whose domain is one of `allowed`."""
    return np.array([domain in allowed for domain in domains], dtype=bool)


def emptied_rows(column: Ragged, keep: np.ndarray) -> Ragged:
    """The column with every row where `keep` (R,) is False made empty, the others unchanged."""
    return Ragged(column.values[np.repeat(keep, column.lengths)], row_offsets(np.where(keep, column.lengths, 0)))


def gather_rows(layer: VerifiedLayer, parts: tuple[tuple[str, np.ndarray], ...], names: tuple[str, ...]) -> dict[str, Ragged]:
    """The given columns of the rows named by (shard path, rows) pieces, concatenated in order."""
    taken = []
    for path, rows in parts:
        data = layer.read(path, list(names))
        taken.append({f: take_rows(data[f], rows) for f in names})
    if len(taken) == 1:
        return taken[0]
    return {f: concat_rows([t[f] for t in taken]) for f in names}


def concat_rows(columns: list[Ragged]) -> Ragged:
    """Ragged columns one after another."""
    offsets = row_offsets(np.concatenate([c.lengths for c in columns]))
    return Ragged(np.concatenate([c.values for c in columns]), offsets)


def row_offsets(lengths: np.ndarray) -> np.ndarray:
    """(R+1,) int64 Ragged offsets of rows of the given (R,) lengths."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return offsets


def take_rows(column: Ragged, rows: np.ndarray) -> Ragged:
    """The given rows of a Ragged column, in that order (vectorised gather)."""
    lengths = column.lengths[rows]
    offsets = row_offsets(lengths)
    starts = column.offsets[rows]
    index = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
    return Ragged(column.values[index], offsets)


def token_batches(lengths: np.ndarray, batch_tokens: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle records, then group them into batches of at most `batch_tokens` padded tokens.

    Records are sorted by length inside windows of 64 shuffled records, so padding stays small while the
    order stays random; a record longer than the budget is a batch of its own.
    """
    order = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    for start in range(0, len(order), 64):
        window = order[start : start + 64]
        window = window[np.argsort(lengths[window], kind="stable")]
        current: list[int] = []
        for i in window:
            if current and max(lengths[current + [i]]) * (len(current) + 1) > batch_tokens:
                batches.append(np.array(current))
                current = []
            current.append(int(i))
        if current:
            batches.append(np.array(current))
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclass
class SourceBatch:
    """One source's signals at the aligned pivot positions of a batch, sorted by (row, position)."""

    row: torch.Tensor  # (N,) int64
    pos: torch.Tensor  # (N,) int64
    topk_ids: torch.Tensor  # (N, K) int64 pivot ids, -1 = empty slot
    topk_logits: torch.Tensor  # (N, K) after mapping (duplicates merged; 0 in empty slots)
    native_topk_logits: torch.Tensor  # (N, K) the source's own top-k, before mapping
    lse: torch.Tensor  # (N,)
    mean: torch.Tensor
    std: torch.Tensor
    zlse: torch.Tensor
    gold_logprob: torch.Tensor
    kept_mass: torch.Tensor
    chunk_logprob: torch.Tensor

    def to(self, device: torch.device) -> "SourceBatch":
        return SourceBatch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64, right-padded
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T) next token at each position (0 where none)
    loss_mask: torch.Tensor  # (B, T) bool: position predicts a response token
    gold_text: torch.Tensor  # (B,) bool: the record's text is learned by the SFT term (False: distill-only split)
    num_positions: torch.Tensor  # (B,) int64: T_b - 1
    sources: dict[str, SourceBatch]

    def to(self, device: torch.device) -> "Batch":
        """Every tensor on `device` (the trainer's); collate builds batches on the CPU."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=True)
                 for f in fields(self) if f.name != "sources"}
        return Batch(**moved, sources={name: src.to(device) for name, src in self.sources.items()})


def collate(dataset: FusionDataset, rows: np.ndarray) -> Batch:
    """Pad the chosen records into tensors and gather every source's aligned signals."""
    lengths = dataset.num_tokens[rows]
    B, T = len(rows), int(lengths.max())
    input_ids = np.zeros((B, T), dtype=np.int64)
    labels = np.zeros((B, T), dtype=np.int64)
    loss_mask = np.zeros((B, T), dtype=bool)
    attention = np.zeros((B, T), dtype=np.int64)
    for b, r in enumerate(rows):
        ids = dataset.token_ids.row(r)
        input_ids[b, : len(ids)] = ids
        labels[b, : len(ids) - 1] = ids[1:]
        loss_mask[b, : len(ids) - 1] = dataset.loss_mask.row(r)
        attention[b, : len(ids)] = 1
    sources = {}
    for name, columns in dataset.sources.items():
        sub = {f: take_rows(col, rows) for f, col in columns.items()}
        row = np.repeat(np.arange(B), sub["aligned_pos"].lengths)
        sources[name] = SourceBatch(
            row=torch.from_numpy(row),
            pos=torch.from_numpy(sub["aligned_pos"].values.astype(np.int64)),
            topk_ids=torch.from_numpy(sub["topk_ids"].values.astype(np.int64)),
            topk_logits=torch.from_numpy(sub["topk_logits"].values.astype(np.float32)),
            native_topk_logits=torch.from_numpy(sub["native_topk_logits"].values.astype(np.float32)),
            lse=torch.from_numpy(sub["logsumexp"].values),
            mean=torch.from_numpy(sub["logit_mean"].values),
            std=torch.from_numpy(sub["logit_std"].values),
            zlse=torch.from_numpy(sub["z_logsumexp"].values),
            gold_logprob=torch.from_numpy(sub["gold_logprob"].values),
            kept_mass=torch.from_numpy(sub["kept_mass"].values),
            chunk_logprob=torch.from_numpy(sub["chunk_logprob"].values),
        )
    return Batch(
        input_ids=torch.from_numpy(input_ids),
        attention_mask=torch.from_numpy(attention),
        labels=torch.from_numpy(labels),
        loss_mask=torch.from_numpy(loss_mask),
        gold_text=torch.from_numpy(dataset.gold_text[rows]),
        num_positions=torch.from_numpy((lengths - 1).astype(np.int64)),
        sources=sources,
    )
