"""Validation during training: bits per byte per domain on a split the run never learns, and the best step kept.

Every `eval_every` optimizer steps (and at the last step) the pivot being trained is scored on the records of
`eval_split` exactly as `fuse-eval` scores a saved model: the pivot's own tokenization of each record's text,
response tokens only (fuse_trainer/evaluate.py). The records come from the cache the run trains on (its
source-native layer keeps every record's text, split and response spans), so no corpus path is needed.

With `keep_best` (pooled "all", or one domain) the evaluated step with the lowest figure so far is saved as
`out/best/` (written whole or not at all, with best.json saying which step and figure), and becomes `out/final/`
when the run ends. A run killed and resumed finds best/ where it left it: the steps it replays are the same
steps, so a best saved past the resumed checkpoint is the model that step gives again.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from cache_builder.corpus import Record
from cache_builder.format import write_text_atomic
from cache_builder.manifest import CacheError
from cache_builder.reader import iter_batches
from fuse_trainer.checkpoint import BEST_DIR, FINAL_DIR, recover_folder, write_folder
from fuse_trainer.evaluate import encode_records, evaluate_model, score_records

BEST_FILE = "best.json"
RECORD_COLUMNS = ["record_id", "doc_id", "window", "domain", "split", "text", "response_spans"]


@dataclass(frozen=True)
class Best:
    """The evaluated step kept by --keep-best: its step and its bits per byte on every domain."""

    step: int
    metric: str  # "all" (pooled) or a domain
    split: str
    val_bpb: dict[str, float]

    @property
    def value(self) -> float:
        return self.val_bpb[self.metric]


def cache_records(layers: dict[str, Path], split: str) -> list[Record]:
    """The records of `split` as the cache holds them (text, response spans), read from the first source's
    source-native layer (`<root>/<source>/`, the parent of its `aligned/<pivot>/`)."""
    name, aligned = next(iter(layers.items()))
    folder = aligned.parent.parent
    records = []
    for batch in iter_batches(folder, RECORD_COLUMNS):
        for i in np.flatnonzero(batch["split"] == split):
            spans = tuple((int(s), int(e)) for s, e in batch["response_spans"].row(i))
            records.append(Record(str(batch["record_id"][i]), str(batch["doc_id"][i]), int(batch["window"][i]),
                                  batch["domain"][i], split, str(batch["text"][i]), spans, f"{folder}:{name}"))
    if not records:
        raise CacheError(f"no records of split {split!r} in {folder}: build the cache from a corpus with a "
                         f"{split} split, or name another with --eval-split (e.g. heldout)")
    return sorted(records, key=lambda r: r.record_id)


def read_best(out: Path) -> Best | None:
    """The best step a run has kept so far (None: none yet)."""
    path = recover_folder(out / BEST_DIR, BEST_FILE) / BEST_FILE
    return Best(**json.loads(path.read_text())) if path.exists() else None


class Validator:
    """Scores the pivot being trained on the evaluation split and keeps the best step's model."""

    def __init__(self, records: list[Record], tokenizer, add_bos: bool, split: str, keep_best: str | None,
                 out: Path, batch_tokens: int):
        domains = {r.domain or "-" for r in records} | {"all"}
        if keep_best is not None and keep_best not in domains:
            raise ValueError(f"--keep-best {keep_best}: the {split} split has no such domain; "
                             f"use one of {', '.join(sorted(domains))}")
        self.records, self.split, self.keep_best, self.out = records, split, keep_best, out
        self.encoded = encode_records(records, tokenizer, add_bos)
        self.batch_tokens = batch_tokens
        self.best = read_best(out) if keep_best else None
        self.last: dict[str, float] | None = None

    def due(self, step: int, every: int, total: int) -> bool:
        """Whether `step` (1-based) is evaluated: every `every` steps, and the last step."""
        return step % every == 0 or step == total

    def evaluate(self, model, step: int, save: Callable[[Path], None]) -> dict:
        """Score `model` after `step`; keep it as best/ (saved by `save(folder)`) when it beats the best so far.
        Returns the fields added to the step's metrics line."""
        model.eval()
        results = score_records(model, self.encoded, self.records, label="pivot", batch_tokens=self.batch_tokens)
        model.train()
        self.last = {r.domain: r.bits_per_byte for r in results}
        fields = {"val_bpb": self.last}
        if self.keep_best and (self.best is None or self.last[self.keep_best] < self.best.value):
            best = Best(step, self.keep_best, self.split, self.last)

            def write(tmp: Path) -> None:
                save(tmp)
                write_text_atomic(tmp / BEST_FILE, json.dumps(asdict(best), indent=2, sort_keys=True) + "\n")

            write_folder(self.out / BEST_DIR, write)
            self.best = best
            fields["best"] = True
        return fields

    def postfix(self) -> dict[str, str]:
        """The progress bar's validation figures: the last pooled figure, and the best step's."""
        shown = {"val": f"{self.last['all']:.4f}"} if self.last else {}
        return {**shown, "best": f"{self.best.step}"} if self.best else shown

    def promote_best(self, log=print) -> Path:
        """Make the best step's model the run's final/ (a rename: best/ is complete and on the same disk)."""
        final = self.out / FINAL_DIR
        best = recover_folder(self.out / BEST_DIR, BEST_FILE)
        for stale in (final, final.with_name(f".{FINAL_DIR}.tmp"), final.with_name(f".{FINAL_DIR}.old")):
            shutil.rmtree(stale, ignore_errors=True)  # incomplete: a complete final/ ends a run before training
        best.rename(final)
        log(f"{self.out.name}: final/ is step {self.best.step}, the best on {self.split} "
            f"({self.keep_best}: {self.best.value:.4f} bits per byte)")
        return final


def evaluate_merged(merged: Path, records: list[Record], split: str, device, log=print) -> dict[str, float]:
    """Pairwise mode: the merged pivot's bits per byte per domain on the evaluation split, as
    `merged/validation.json`."""
    results = evaluate_model(str(merged), records, label="merged", device=device)
    val_bpb = {r.domain: r.bits_per_byte for r in results}
    write_text_atomic(merged / "validation.json", json.dumps({"split": split, "val_bpb": val_bpb}, indent=2,
                                                             sort_keys=True) + "\n")
    log(f"merged: {split} bits per byte {val_bpb['all']:.4f} pooled ("
        + ", ".join(f"{d} {v:.4f}" for d, v in val_bpb.items() if d != "all") + ")")
    return val_bpb
