"""Aligned shards of N sources -> training batches of tensors. No source model is ever loaded.

Each source folder under the cache root holds `aligned/<pivot>/`. The sources are checked to describe
the same corpus and the same records on the same pivot tokenizer, verified (checksums, schema, values),
then joined by record id. A batch carries the pivot's tokens and, per source, the cached signals at the
pivot positions that have a partner in that source.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from cache_builder.format import ALIGNED_DIR, MANIFEST, missing_statistics, topk_values
from cache_builder.manifest import CacheError, load_manifest
from cache_builder.reader import Ragged, read_shard
from cache_builder.untrusted import shown
from cache_builder.verify import cross_source_problems, verify_layer

SOURCE_FIELDS = ("aligned_pos", "topk_ids", "topk_logits", "native_topk_logits", "logsumexp", "logit_mean", "logit_std", "z_logsumexp",
                 "gold_logprob", "kept_mass", "chunk_logprob")


def discover_sources(root: str | Path, pivot: str, sources: list[str] | None = None) -> dict[str, Path]:
    """{source name: its aligned folder for `pivot`} under the cache root, optionally restricted."""
    root = Path(root)
    if not root.is_dir():
        raise CacheError(f"cache root {root} does not exist: build one with `cache-build --model <source> --corpus <corpus> "
                         f"--pivot {pivot} --out {root}`, or pass --shards the folder that holds <source>/aligned/{pivot}/")
    found = {p.parent.parent.parent.name: p.parent for p in sorted(root.glob(f"*/{ALIGNED_DIR}/{pivot}/{MANIFEST}"))}
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


def check_sources(layers: dict[str, Path]) -> None:
    """Verify every aligned layer, then that they share corpus, pivot tokenizer and record ids."""
    problems, id_sets, corpus, pivots = [], {}, {}, {}
    for name, folder in layers.items():
        layer_problems, ids = verify_layer(folder)
        problems += layer_problems
        if layer_problems:
            continue
        manifest = load_manifest(folder)
        id_sets[folder], corpus[folder] = set(ids), manifest["corpus"]["fingerprint"]
        pivots[folder] = manifest["pivot"]["tokenizer_fingerprint"]
    problems += cross_source_problems(id_sets, corpus, pivots)
    if problems:
        raise CacheError("refusing to train on these caches: " + "; ".join(problems))


def check_pivot(layers: dict[str, Path], tokenizer, embedding_rows: int) -> None:
    """The aligned layers were made for the pivot being trained: the tokenizer fingerprint of each layer is
    the loaded tokenizer's, and its vocabulary (which bounds every id, see cache_builder.values) fits the
    model's embedding rows. A manifest alone is never trusted for either."""
    from alignment import tokenizer_fingerprint

    loaded = tokenizer_fingerprint(tokenizer)
    for folder in layers.values():
        pivot = load_manifest(folder)["pivot"]
        if pivot["tokenizer_fingerprint"] != loaded:
            raise CacheError(f"{shown(folder)}: aligned to another pivot tokenizer (fingerprint "
                             f"{pivot['tokenizer_fingerprint'][:12]}) than the pivot loaded ({loaded[:12]}); rerun "
                             f"`cache-align --cache {shown(folder.parent.parent)} --pivot <this pivot>`")
        if pivot["vocab_size"] > embedding_rows:
            raise CacheError(f"{shown(folder)}: pivot vocab_size {pivot['vocab_size']} is more than the "
                             f"{embedding_rows} token rows of the pivot loaded; the layer was made for another pivot")


def known_statistics_gaps(manifest: dict) -> set[str]:
    """Statistics an (imported) layer lacks; a logsumexp of raw log-probs is known (0) and not a gap."""
    missing = set(missing_statistics(manifest))
    if topk_values(manifest) == "logprobs":
        missing.discard("logsumexp")
    return missing


def check_statistics(layers: dict[str, Path], needed: dict[str, str]) -> None:
    """Refuse sources that lack a statistic the run needs (imported caches store only what their format kept)."""
    problems = []
    for name, folder in layers.items():
        manifest = load_manifest(folder)
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

    path: str  # relative shard path, the same in every source (same corpus, same sharding)
    rows: dict[str, np.ndarray]  # source -> row numbers of the split's records in its shard, in record-id order
    num_tokens: np.ndarray  # (R,) pivot tokens per record
    response_tokens: np.ndarray  # (R,) positions that predict a response token


def index_shards(layers: dict[str, Path], splits: tuple[str, ...]) -> list[ShardIndex]:
    """Index every shard group: which rows of each source hold the same records of `splits`."""
    paths = {name: [s["path"] for s in load_manifest(folder)["shards"]] for name, folder in layers.items()}
    names = list(layers)
    for name in names[1:]:
        if paths[name] != paths[names[0]]:
            raise CacheError(
                f"{layers[name]} and {layers[names[0]]} are sharded differently; build every source with the same "
                "--rows-per-shard and --world-size so that their shards hold the same records"
            )
    index, seen = [], set()
    for path in paths[names[0]]:
        rows, ids = {}, None
        for name, folder in layers.items():
            meta = read_shard(folder, path, ["record_id", "split", "num_tokens", "loss_mask"])
            keep = np.flatnonzero(np.isin(meta["split"], splits))
            order = keep[np.argsort(meta["record_id"][keep], kind="stable")]
            if ids is None:  # the first source; the others must hold the same records
                seen.update(np.unique(meta["split"]).tolist())
                ids = meta["record_id"][order]
                num_tokens = meta["num_tokens"][order].astype(np.int64)
                counted = np.concatenate([[0], np.cumsum(meta["loss_mask"].values, dtype=np.int64)])
                response = (counted[meta["loss_mask"].offsets[1:]] - counted[meta["loss_mask"].offsets[:-1]])[order]
            elif not np.array_equal(meta["record_id"][order], ids):
                raise CacheError(f"{folder / path}: its {'/'.join(splits)} records differ from {layers[names[0]] / path}")
            rows[name] = order
        if len(ids):
            index.append(ShardIndex(path, rows, num_tokens, response.astype(np.int64)))
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
    pivot wrote itself) are marked as having no gold text to learn.
    """

    def __init__(self, layers: dict[str, Path], splits: tuple[str, ...] = ("train",), window: int = 1,
                 distill_only: tuple[str, ...] = ()):
        if window < 1:
            raise ValueError(f"the shuffle window must hold at least one shard group, got {window}")
        self.layers, self.window, self.distill_only = layers, window, distill_only
        self.index = index_shards(layers, splits)
        self.zero_lse = {name for name, folder in layers.items()
                         if topk_values(manifest := load_manifest(folder)) == "logprobs"
                         and "logsumexp" in missing_statistics(manifest)}
        self._loaded: OrderedDict[int, FusionDataset] = OrderedDict()  # the last `window` groups used

    def __len__(self) -> int:
        return sum(len(s.num_tokens) for s in self.index)

    def shard(self, i: int) -> FusionDataset:
        """Shard group i, joined across sources."""
        if i not in self._loaded:
            entry = self.index[i]
            sources, first = {}, None
            for name, folder in self.layers.items():
                data, rows = read_shard(folder, entry.path), entry.rows[name]
                if name in self.zero_lse:  # raw log-probs: their full-vocabulary logsumexp is 0
                    data["logsumexp"] = Ragged(np.zeros_like(data["logsumexp"].values), data["logsumexp"].offsets)
                first = first or (data, rows)
                sources[name] = {f: take_rows(data[f], rows) for f in SOURCE_FIELDS}
            data, rows = first
            self._loaded[i] = FusionDataset(list(data["record_id"][rows]), list(data["domain"][rows]),
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
        plan = []
        for start in range(0, len(order), self.window):
            groups = order[start : start + self.window]
            batches = [(int(i), rows) for i in groups for rows in token_batches(self.index[i].num_tokens, batch_tokens, rng)]
            if len(groups) > 1:
                batches = [batches[j] for j in rng.permutation(len(batches))]
            plan += batches
        return plan


def take_rows(column: Ragged, rows: np.ndarray) -> Ragged:
    """The given rows of a Ragged column, in that order (vectorised gather)."""
    lengths = column.lengths[rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
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
