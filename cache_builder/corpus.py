"""Corpus ingestion: files -> canonical records.

Every record, whatever its input shape, renders to ONE canonical text plus the byte spans of its
response part (the part that is trained on). The rendering is deterministic and the same for every
model, so the token positions of different tokenizers can later be aligned by byte offset. Long
records are cut into windows here, at the character level, so every model sees the same windows.

Input files: a file or a folder (searched recursively, sorted) of `.jsonl`, `.jsonl.zst`, `.parquet`
and `.txt`. Record shapes (one per JSON line / Parquet row):

- plain text:          {"text": "..."}                       -> the whole text is response
- text after context:  {"context": "...", "text": "..."}     -> context + text verbatim; only text is response
  (corpus-generate writes this shape: the prompt a source continued is context, not trained on)
- prompt + response:   {"prompt": "...", "response": "..."}  (also "instruction" / "output")
- chat:                {"messages": [{"role": "user", "content": "..."}, ...]}
  (assistant turns are response)

Optional fields on any record: "domain" (str) and "split" (str, default "train"). A `.txt` file is one
plain-text record. Bad records never crash the job and never vanish: each is skipped and reported with
its file and line.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq
import zstandard

RENDER_VERSION = 1
SUFFIXES = (".jsonl", ".jsonl.zst", ".parquet", ".txt")
DEFAULT_WINDOW_CHARS = 4000
EVALUATION_SPLITS = ("validation", "heldout")  # never trained on, never written by corpus-generate

# The canonical chat rendering: plain text markers, no model's special tokens, so that every
# tokenizer sees the same characters.
ROLE_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
TURN_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Record:
    """One canonical record (or one window of a long record), ready to tokenize."""

    record_id: str  # sha256 hex of the canonical text
    doc_id: str  # sha256 hex of the whole record's canonical text (shared by its windows)
    window: int  # index of this window within the record
    domain: str | None
    split: str
    text: str
    response_spans: tuple[tuple[int, int], ...]  # UTF-8 byte offsets [start, end) into text
    origin: str  # "file:line" where the record came from


@dataclass(frozen=True)
class BadRecord:
    origin: str  # "file:line"
    reason: str


@dataclass
class Corpus:
    records: list[Record]
    bad: list[BadRecord] = field(default_factory=list)
    duplicates: int = 0
    files: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        """sha256 over the rendering version and the ordered record ids: equal corpora, equal hash."""
        h = hashlib.sha256(f"render-v{RENDER_VERSION}\n".encode())
        for r in self.records:
            h.update(r.record_id.encode())
        return h.hexdigest()

    def summary(self) -> dict:
        return {
            "files": len(self.files),
            "records": len(self.records),
            "documents": len({r.doc_id for r in self.records}),
            "bad_records": len(self.bad),
            "bad_reasons": dict(Counter(b.reason.split(":")[0] for b in self.bad)),
            "duplicates_skipped": self.duplicates,
            "domains": dict(Counter(r.domain or "-" for r in self.records)),
            "splits": dict(Counter(r.split for r in self.records)),
        }


class RecordError(ValueError):
    """A record that cannot be rendered; the message says why."""


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Rendering: one raw record (a dict) -> canonical text + response character spans
# ----------------------------------------------------------------------------------------------


def _string_field(raw: dict, key: str) -> str:
    value = raw[key]
    if not isinstance(value, str):
        raise RecordError(f"wrong type: field '{key}' must be a string, got {type(value).__name__}")
    return unicodedata.normalize("NFC", value)


def _render_messages(messages: object) -> tuple[str, list[tuple[int, int]]]:
    if not isinstance(messages, list) or not messages:
        raise RecordError("wrong type: 'messages' must be a non-empty list of {role, content}")
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    length = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RecordError(f"wrong type: messages[{i}] must be an object with a string 'content'")
        content = unicodedata.normalize("NFC", message["content"])
        role = message.get("role")
        if role not in ROLE_HEADERS:
            raise RecordError(f"unknown role: messages[{i}].role={role!r}, expected one of {list(ROLE_HEADERS)}")
        prefix = (TURN_SEPARATOR if i else "") + ROLE_HEADERS[role]
        parts.append(prefix)
        length += len(prefix)
        if role == "assistant":
            spans.append((length, length + len(content)))
        parts.append(content)
        length += len(content)
    return "".join(parts), spans


def render(raw: dict) -> tuple[str, list[tuple[int, int]]]:
    """Render one raw record to (canonical text, response spans in CHARACTER offsets).

    Every text field is NFC-normalised first: tokenizers that normalise (Qwen's) would otherwise spell other
    bytes than the text's, and canonically equal texts get one record id.

    Raises RecordError with a short "kind: detail" reason for a record that cannot be rendered.
    """
    if not isinstance(raw, dict):
        raise RecordError(f"wrong type: a record must be a JSON object, got {type(raw).__name__}")
    if raw.get("messages") is not None:
        text, spans = _render_messages(raw["messages"])
    elif raw.get("text") is not None:
        context = _string_field(raw, "context") if raw.get("context") is not None else ""
        text = context + _string_field(raw, "text")
        spans = [(len(context), len(text))]
    else:
        prompt_key = next((k for k in ("prompt", "instruction") if raw.get(k) is not None), None)
        response_key = next((k for k in ("response", "output") if raw.get(k) is not None), None)
        if prompt_key is None or response_key is None:
            raise RecordError("missing field: need 'text', 'messages', or 'prompt'/'instruction' + 'response'/'output'")
        prompt, response = _string_field(raw, prompt_key), _string_field(raw, response_key)
        head = ROLE_HEADERS["user"] + prompt + TURN_SEPARATOR + ROLE_HEADERS["assistant"]
        text = head + response
        spans = [(len(head), len(text))]
    if not text.strip():
        raise RecordError("empty: the record renders to an empty text")
    if "\x00" in text:
        raise RecordError("NUL byte: the text contains U+0000")
    if not unicodedata.is_normalized("NFC", text):  # each field is NFC; a field starting with a combining mark is not
        raise RecordError("not NFC: a field starts with a combining character, which composes with the text before it")
    return text, [(s, e) for s, e in spans if e > s]


# ----------------------------------------------------------------------------------------------
# Windows: long texts are cut at the character level, identically for every model
# ----------------------------------------------------------------------------------------------


def window_bounds(text: str, max_chars: int) -> list[tuple[int, int]]:
    """Character ranges [start, end) covering `text`, each at most `max_chars` long.

    A cut prefers the last newline in the second half of the window, so windows tend to end on a line.
    """
    if max_chars <= 0:
        raise ValueError("max_chars must be positive")
    bounds = []
    start = 0
    while start < len(text):
        end = min(start + max_chars, len(text))
        if end < len(text):
            newline = text.rfind("\n", start + max_chars // 2, end)
            if newline != -1:
                end = newline + 1
        bounds.append((start, end))
        start = end
    return bounds


def _char_to_byte_spans(text: str, spans: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    return tuple((len(text[:s].encode("utf-8")), len(text[:e].encode("utf-8"))) for s, e in spans)


def split_windows(
    text: str, spans: list[tuple[int, int]], max_chars: int
) -> Iterator[tuple[int, str, tuple[tuple[int, int], ...]]]:
    """Yield (window index, window text, response spans in window BYTE offsets)."""
    for index, (ws, we) in enumerate(window_bounds(text, max_chars)):
        clipped = [(max(s, ws) - ws, min(e, we) - ws) for s, e in spans if s < we and e > ws]
        window_text = text[ws:we]
        yield index, window_text, _char_to_byte_spans(window_text, clipped)


# ----------------------------------------------------------------------------------------------
# Readers: one file -> (line number, raw record | _Bad reason)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Bad:
    """A line that could not even be decoded into a raw record."""

    reason: str


def _decode_json_lines(stream: Iterator[bytes]) -> Iterator[tuple[int, dict | _Bad]]:
    for line_no, line in enumerate(stream, start=1):
        if not line.strip():
            continue
        try:
            decoded = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield line_no, _Bad(f"invalid UTF-8: byte {err.start}")
            continue
        try:
            yield line_no, json.loads(decoded)
        except json.JSONDecodeError as err:
            yield line_no, _Bad(f"invalid JSON: {err.msg} at column {err.colno}")
        except RecursionError:
            yield line_no, _Bad("invalid JSON: nested too deeply")


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict | _Bad]]:
    with path.open("rb") as f:
        yield from _decode_json_lines(f)


def _zstd_lines(path: Path, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed lines of a .zst file; a truncated or corrupt stream raises zstandard.ZstdError."""
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    pending = b""
    with path.open("rb") as f:
        while block := f.read(chunk):
            pending += decompressor.decompress(block)
            *lines, pending = pending.split(b"\n")
            yield from (line + b"\n" for line in lines)
    if not decompressor.eof:
        raise zstandard.ZstdError("the stream ends before its last frame is complete (truncated file)")
    if pending:
        yield pending


def _read_jsonl_zst(path: Path) -> Iterator[tuple[int, dict | _Bad]]:
    line_no = 0
    try:
        for line_no, item in _decode_json_lines(_zstd_lines(path)):
            yield line_no, item
    except zstandard.ZstdError as err:
        yield line_no + 1, _Bad(f"corrupt zstd stream: {err}")


def _read_parquet(path: Path) -> Iterator[tuple[int, dict | _Bad]]:
    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for raw in batch.to_pylist():
            row += 1
            yield row, raw


def _read_txt(path: Path) -> Iterator[tuple[int, dict | _Bad]]:
    try:
        yield 1, {"text": path.read_bytes().decode("utf-8")}
    except UnicodeDecodeError as err:
        yield 1, _Bad(f"invalid UTF-8: byte {err.start}")


READERS = {".jsonl.zst": _read_jsonl_zst, ".jsonl": _read_jsonl, ".parquet": _read_parquet, ".txt": _read_txt}


def _suffix(path: Path) -> str | None:
    return next((s for s in READERS if path.name.endswith(s)), None)


def corpus_files(path: str | Path) -> list[Path]:
    """The corpus files under `path` (a file or a folder), in a deterministic order."""
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"corpus not found: {root}")
    if root.is_file():
        if _suffix(root) is None:
            raise ValueError(f"unsupported corpus file {root}: expected one of {', '.join(SUFFIXES)}")
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and _suffix(p) is not None)
    if not files:
        raise ValueError(f"no corpus files under {root}: expected {', '.join(SUFFIXES)}")
    return files


def load_corpus(path: str | Path, *, max_chars: int = DEFAULT_WINDOW_CHARS, limit: int | None = None) -> Corpus:
    """Read, render, window and de-duplicate a corpus.

    `limit` keeps the first N records (before windowing). Duplicate windows (same canonical text, hence
    same record id) are kept once and counted.
    """
    files = corpus_files(path)
    corpus = Corpus(records=[], files=[str(f) for f in files])
    seen: set[str] = set()
    taken = 0
    for file in files:
        for line_no, raw in READERS[_suffix(file)](file):
            if limit is not None and taken >= limit:
                return corpus
            origin = f"{file}:{line_no}"
            if isinstance(raw, _Bad):
                corpus.bad.append(BadRecord(origin, raw.reason))
                continue
            try:
                text, spans = render(raw)
            except RecordError as err:
                corpus.bad.append(BadRecord(origin, str(err)))
                continue
            domain, split = raw.get("domain"), raw.get("split", "train")
            if not isinstance(domain, (str, type(None))) or not isinstance(split, str):
                corpus.bad.append(BadRecord(origin, "wrong type: 'domain' and 'split' must be strings"))
                continue
            taken += 1
            doc_id = sha256_hex(text)
            for window, window_text, byte_spans in split_windows(text, spans, max_chars):
                record_id = sha256_hex(window_text)
                if record_id in seen:
                    corpus.duplicates += 1
                    continue
                seen.add(record_id)
                corpus.records.append(
                    Record(record_id, doc_id, window, domain, split, window_text, byte_spans, origin)
                )
    return corpus
