"""The manifest schema, as plain code: every field of every cache manifest typed and bounded before use.

A manifest comes from a stranger who also re-signs it, so nothing in it is trusted for its type, range or
size: a `vocab_size` of NaN or 1e12 would switch a range check off, `top_k` of 2^31 would size an array, a
list where an object belongs would raise a traceback. `check_manifest` walks the specification below and
names the first field that breaks it (`manifest.json: source.vocab_size: ...`). Unknown keys are refused
where the format defines every key, and bounded where it allows free-form settings (`build`, identities,
corpus summaries). No third-party validator: the specification is small and these checks need no
dependency (types, ranges, lengths, patterns and a few cross-field rules in `check_manifest`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from cache_builder.format import NULLABLE_EXTRA, STAT_COLUMNS, TOPK_VALUES
from cache_builder.untrusted import MAX_JSON_DEPTH, CacheError, depth_of, shown

MAX_VOCAB = 1 << 22  # token ids per vocabulary (the largest real ones have 262,144)
MAX_VOCAB_PADDING = 4096  # output rows past the tokenizer's size (padded vocabularies: Qwen has 271)
MAX_TOP_K = 1024
MAX_SHARDS = 100_000
MAX_SHARD_ROWS = 1 << 20
MAX_SHARD_BYTES = 1 << 34
MAX_TOKENS_PER_ROW = 1 << 22
MAX_COUNT = 1 << 50  # totals, coverage counts
MAX_STRING = 4096
MAX_LIST = 1_000_000
MAX_MANIFEST_BYTES = 64 << 20
HEX64 = r"[0-9a-f]{64}"
SHARD_PATH = r"shards/[A-Za-z0-9_-][A-Za-z0-9._-]{0,200}\.parquet"


class Spec:
    """One node of the specification: `check(value, where)` raises CacheError naming `where`."""

    def check(self, value: object, where: str) -> None:
        raise NotImplementedError


def _fail(where: str, message: str) -> None:
    raise CacheError(f"{where}: {message}")


TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}


def _expect(value: object, kind: type, where: str) -> None:
    """Exactly `kind` (bool is no integer, an integer no float)."""
    if type(value) is not kind:
        _fail(where, f"expected {TYPE_NAMES[kind]}, got {shown(type(value).__name__)}")


def _at_most(value: list | str, limit: int, where: str) -> None:
    if len(value) > limit:
        what = f"a string of {len(value)} characters" if isinstance(value, str) else f"a list of {len(value)} items"
        _fail(where, f"{what}, more than {limit}")


def _child(where: str, key: str) -> str:
    """The location of `key` inside `where` ("manifest.json: " + "source" -> "manifest.json: source")."""
    return f"{where}{key}" if where.endswith(": ") else f"{where}.{key}"


@dataclass(frozen=True)
class Int(Spec):
    low: int
    high: int

    def check(self, value, where):
        _expect(value, int, where)
        if not self.low <= value <= self.high:
            _fail(where, f"{value} is outside [{self.low}, {self.high}]")


@dataclass(frozen=True)
class Float(Spec):
    low: float
    high: float

    def check(self, value, where):
        if type(value) not in (int, float) or not math.isfinite(value):
            _fail(where, f"expected a finite number, got {shown(value, 40)}")
        if not self.low <= value <= self.high:
            _fail(where, f"{value} is outside [{self.low}, {self.high}]")


@dataclass(frozen=True)
class Str(Spec):
    pattern: str | None = None
    max_len: int = MAX_STRING

    def check(self, value, where):
        _expect(value, str, where)
        _at_most(value, self.max_len, where)
        if self.pattern is not None and not re.fullmatch(self.pattern, value):
            _fail(where, f"'{shown(value, 80)}' does not match {self.pattern}")


@dataclass(frozen=True)
class OneOf(Spec):
    values: tuple

    def check(self, value, where):
        if not any(type(value) is type(v) and value == v for v in self.values):
            _fail(where, f"'{shown(value, 80)}' is not one of {list(self.values)}")


@dataclass(frozen=True)
class Bool(Spec):
    def check(self, value, where):
        if type(value) is not bool:
            _fail(where, f"expected true or false, got {shown(value, 40)}")


@dataclass(frozen=True)
class Nullable(Spec):
    inner: Spec

    def check(self, value, where):
        if value is not None:
            self.inner.check(value, where)


@dataclass(frozen=True)
class Free(Spec):
    """Free-form JSON (settings, identities): only bounded in depth, list length and string length."""

    def check(self, value, where):
        pending = [(value, where)]
        while pending:
            item, at = pending.pop()
            if isinstance(item, dict):
                pending += [(v, _child(at, shown(k, 40))) for k, v in item.items()]
            elif isinstance(item, list):
                _at_most(item, MAX_LIST, at)
                pending += [(v, f"{at}[{i}]") for i, v in enumerate(item)]
            elif isinstance(item, str):
                Str().check(item, at)
            elif isinstance(item, float) and not math.isfinite(item):
                _fail(at, "not a finite number")


@dataclass(frozen=True)
class List(Spec):
    item: Spec
    max_len: int = MAX_LIST

    def check(self, value, where):
        _expect(value, list, where)
        _at_most(value, self.max_len, where)
        for i, item in enumerate(value):
            self.item.check(item, f"{where}[{i}]")


@dataclass(frozen=True)
class Obj(Spec):
    """An object with `required` and `optional` keys; other keys are refused unless `extra` is True."""

    required: dict[str, Spec]
    optional: dict[str, Spec] = field(default_factory=dict)
    extra: bool = False

    def check(self, value, where):
        _expect(value, dict, where)
        missing = [k for k in self.required if k not in value]
        if missing:
            _fail(where, f"missing keys {missing}")
        for key, item in value.items():
            spec = self.required.get(key) or self.optional.get(key)
            if spec is None and not self.extra:
                _fail(where, f"unknown key '{shown(key, 60)}'")
            (spec or Free()).check(item, _child(where, shown(key, 60)))


COUNT = Int(0, MAX_COUNT)
NAME = Str(r"[A-Za-z0-9._-]{1,200}")

SHARD = Obj({"path": Str(max_len=256), "rows": Int(0, MAX_SHARD_ROWS), "tokens": Int(0, MAX_SHARD_ROWS * MAX_TOKENS_PER_ROW),
             "bytes": Int(1, MAX_SHARD_BYTES), "sha256": Str(HEX64)})
VOCAB_FILE = Obj({"path": OneOf(("vocab.parquet",)), "sha256": Str(HEX64), "convention": Str(r"[a-z_]{1,40}"),
                  "dummy_prefix": Bool(), "fingerprint": Str(HEX64)})
SOURCE = Obj(
    {"name": NAME, "vocab_size": Int(1, MAX_VOCAB), "tokenizer_fingerprint": Str(HEX64)},
    {"vocab_file": VOCAB_FILE, "identity": Free(), "dtype": OneOf(("fp32", "bf16", "fp16")), "add_bos": Bool(),
     "tokenizer_convention": Str(r"[a-z_]{1,40}"), "tokenizer_size": Int(1, MAX_VOCAB), "chat_template": Str()},
)
PIVOT = Obj(
    {"name": NAME, "vocab_size": Int(1, MAX_VOCAB), "tokenizer_fingerprint": Str(HEX64)},
    {"identity": Free(), "add_bos": Bool(),
     "vocab_map": Obj({"strategy": Str(r"[a-z+-]{1,60}"), "exact": COUNT, "fallback": COUNT, "unmapped": COUNT}),
     "alignment": Obj({"response_positions": COUNT, "aligned_response_positions": COUNT,
                       "coverage": Float(0.0, 1.0), "mean_kept_mass": Nullable(Float(0.0, 1.0))})},  # null: unknown
)
CORPUS = Obj(
    {"fingerprint": Str(HEX64)},
    {"render_version": Int(1, 1 << 20), "summary": Free(),
     "bad_records": List(Obj({"origin": Str(), "reason": Str()}))},
)
BUILD = Obj(
    {},
    {"model": Str(), "dtype": OneOf(("fp32", "bf16", "fp16")), "max_tokens": Int(2, MAX_TOKENS_PER_ROW),
     "top_k": Int(1, MAX_TOP_K), "source_manifest_sha256": Str(HEX64), "vocab_map": Str(r"[a-z+-]{1,60}")},
    extra=True,
)
MANIFEST_SPEC = Obj(
    {"format": Str(max_len=64), "format_version": Int(1, 1 << 31), "layer": OneOf(("source", "aligned")),
     "top_k": Int(1, MAX_TOP_K), "logit_dtype": OneOf(("float16", "float32")), "source": SOURCE,
     "corpus": CORPUS, "build": BUILD, "shards": List(SHARD, MAX_SHARDS),
     "totals": Obj({"rows": COUNT, "tokens": COUNT, "bytes": COUNT})},
    {"created_by": Str(), "pivot": Nullable(PIVOT),
     # an imported layer (cache-import): the statistics stored as nulls, and what its top-k values are
     "missing_statistics": List(OneOf(STAT_COLUMNS + NULLABLE_EXTRA), 16), "topk_values": OneOf(TOPK_VALUES)},
)


def check_manifest(manifest: object, where: str) -> None:
    """CacheError naming the first field of `manifest` that breaks MANIFEST_SPEC or the layer's rules."""
    if depth_of(manifest) > MAX_JSON_DEPTH:
        _fail(where, f"nested more than {MAX_JSON_DEPTH} levels")
    MANIFEST_SPEC.check(manifest, f"{where}: ")
    aligned = manifest["layer"] == "aligned"
    if aligned != (manifest.get("pivot") is not None):
        _fail(f"{where}: pivot", "an aligned layer names its pivot, a source layer has none (null)")
    source = manifest["source"]
    if "tokenizer_size" in source and not 0 <= source["vocab_size"] - source["tokenizer_size"] <= MAX_VOCAB_PADDING:
        _fail(f"{where}: source.vocab_size", f"{source['vocab_size']} output rows for a tokenizer of "
              f"{source['tokenizer_size']} tokens (at most {MAX_VOCAB_PADDING} padding rows)")
    shards = manifest["shards"]
    for key in ("rows", "tokens", "bytes"):
        total = sum(s[key] for s in shards)
        if manifest["totals"][key] != total:
            _fail(f"{where}: totals.{key}", f"{manifest['totals'][key]} but the shards add up to {total}")
    seen: set[str] = set()
    for shard in shards:
        if shard["path"] in seen:
            _fail(f"{where}: shards", f"shard path '{shown(shard['path'], 80)}' is listed more than once")
        seen.add(shard["path"])
