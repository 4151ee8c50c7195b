"""Interoperability with the ecosystem's teacher-signal formats: DistillKit, axolotl KD, FuseLLM/FuseChat.

    export_layer(layer, "axolotl", out)            # one of our layers -> the peer's files, for its trainer
    import_folder(folder, "distillkit", model, out) # the peer's files -> a format-v1 source layer

One module per format (distillkit.py, axolotl.py, fusellm.py) maps columns each way; targets.py reads our
layers as next-token targets, source_layer.py writes imported rows as a source-native layer, and
logprob_codec.py / bitpack.py implement DistillKit's compressed columns, and writer.py writes files on
background threads while the next rows are converted. Output folders appear under their final name only when
complete (staging.py). docs/interop.md has the table of what each format keeps.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cache_builder.interop import axolotl, distillkit, fusellm
from cache_builder.interop.logprob_codec import CodecError, CompressionConfig, default_config
from cache_builder.interop.source_layer import BadRow, write_imported_layer
from cache_builder.interop.staging import InteropError, staged_folder
from cache_builder.interop.targets import iter_targets
from cache_builder.manifest import load_manifest

FORMATS = ("distillkit", "axolotl", "fusellm")
# What the top-k values of each format are, on import (cache_builder.format.TOPK_VALUES).
IMPORTED_VALUES = {"distillkit": "logprobs", "axolotl": "renormalized-logprobs", "fusellm": "logits"}


def export_layer(layer: str | Path, fmt: str, out: str | Path, *, compress: bool = False,
                 compression: dict | None = None, source_index: int = 0, batch_rows: int = 256,
                 overwrite: bool = False) -> Path:
    """Write one of our cache layers (source-native or pivot-aligned) in `fmt` to the folder `out`."""
    if fmt not in FORMATS:
        raise InteropError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    manifest = load_manifest(layer)
    batches = iter_targets(layer, batch_rows)
    with staged_folder(out, overwrite) as folder:
        if fmt == "distillkit":
            config = None
            if compress or compression is not None:
                vocab = (manifest["pivot"] if manifest["layer"] == "aligned" else manifest["source"])["vocab_size"]
                try:
                    config = (CompressionConfig.from_dict(compression) if compression is not None
                              else default_config(vocab, manifest["top_k"]))
                except CodecError as err:
                    raise InteropError(str(err)) from None
            distillkit.export(batches, folder, config, batch_rows)
        elif fmt == "axolotl":
            axolotl.export(batches, folder, batch_rows)
        else:
            fusellm.export(batches, folder, source_index, fingerprint=export_fingerprint(manifest, fmt, source_index))
    return Path(out)


def export_fingerprint(manifest: dict, fmt: str, source_index: int) -> str:
    """16 hex digits naming an export: the layer's manifest (which holds every shard's sha256), the format and
    the source index, so the same export of the same layer gets the same name."""
    key = json.dumps({"manifest": manifest, "format": fmt, "source_index": source_index}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def import_folder(folder: str | Path, fmt: str, model: str, out: str | Path, *, split: str = "train",
                  rows_per_shard: int = 256, strict: bool = False, overwrite: bool = False) -> tuple[Path, list[BadRow]]:
    """Read a peer's files in `fmt` into `out`/<model name>/, a source-native layer; returns (it, skipped rows)."""
    folder = Path(folder)
    if fmt not in FORMATS:
        raise InteropError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    if not folder.is_dir():
        raise InteropError(f"{folder} is not a folder")
    rows = {"distillkit": lambda: distillkit.import_rows(folder), "axolotl": lambda: axolotl.import_rows(folder),
            "fusellm": lambda: fusellm.import_rows(folder, split)}[fmt]()
    return write_imported_layer(rows, fmt=fmt, input_dir=folder, model=model, out=out, kind=IMPORTED_VALUES[fmt],
                                split=split, rows_per_shard=rows_per_shard, strict=strict, overwrite=overwrite)


__all__ = ["FORMATS", "BadRow", "InteropError", "export_layer", "import_folder"]
