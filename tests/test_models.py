"""Model resolution and loading: names, errors, assembly checks, local folders and GGUF conversion."""

from __future__ import annotations

import hashlib

import pytest
import torch

from cache_builder.models import (concatenate_verified, ensure_converted, load_gguf_directly, load_model,
                                  load_tokenizer, package_dir, resolve_model)
from tests.tiny import make_tiny_gguf, make_tiny_model


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    """Every test converts into its own model home, never the user's."""
    monkeypatch.setenv("LCF_HOME", str(tmp_path / "home"))


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]  # (T, V)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        resolve_model("llama-9000")
    assert all(short in str(err.value) for short in ("smollm2", "gemma3", "qwen"))


def test_missing_package_names_the_fix():
    with pytest.raises(FileNotFoundError) as err:
        package_dir("no_such_package_lcf", ("no-such-package-lcf==1.0",))
    assert "make setup" in str(err.value) and "--no-deps no-such-package-lcf==1.0" in str(err.value)


def test_assembly_checks_sha256_and_is_atomic(tmp_path):
    parts = [tmp_path / f"part{i}" for i in range(3)]
    for i, part in enumerate(parts):
        part.write_bytes(bytes([i]) * 1000)
    good = hashlib.sha256(b"".join(part.read_bytes() for part in parts)).hexdigest()
    target = tmp_path / "out" / "model.gguf"
    with pytest.raises(ValueError, match="reinstall pkg"):
        concatenate_verified(parts, target, "0" * 64, "reinstall pkg")
    assert list(target.parent.iterdir()) == []  # no half file, no temporary left behind
    assert concatenate_verified(parts, target, good, "reinstall pkg") == target
    assert hashlib.sha256(target.read_bytes()).hexdigest() == good
    parts[0].write_bytes(b"corrupt")  # an existing verified file is not re-assembled
    assert concatenate_verified(parts, target, good, "reinstall pkg").read_bytes()[:1] == b"\x00"


def test_local_folder_resolution_and_loading(tmp_path):
    folder = make_tiny_model(tmp_path / "My Model", arch="gemma3", seed=0)
    source = resolve_model(str(folder))
    assert source.name == "My-Model" and source.hf_dir == folder.resolve() and source.add_bos
    assert source.identity["kind"] == "hf-folder" and source.gguf_path is None
    assert not resolve_model(str(make_tiny_model(tmp_path / "plain", arch="llama"))).add_bos
    model = load_model(source, dtype=torch.bfloat16, device="cpu")
    assert not model.training and model.dtype == torch.bfloat16
    tokenizer = load_tokenizer(source)
    assert tokenizer("hello")["input_ids"][0] == tokenizer.bos_token_id


def test_folder_without_config_is_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))


def test_uncached_hub_id_names_the_alternatives():
    with pytest.raises(FileNotFoundError, match="local Hugging Face cache"):
        resolve_model("nobody-lcf/not-a-model")


def test_gguf_resolution_and_conversion(tmp_path):
    gguf = make_tiny_gguf(tmp_path / "tiny-model.gguf", seed=1)
    source = resolve_model(str(gguf))
    assert source.name == "tiny-model" and not source.add_bos
    assert source.identity == {"kind": "gguf", "path": str(gguf.resolve()),
                               "sha256": hashlib.sha256(gguf.read_bytes()).hexdigest()}
    assert not source.hf_dir.exists()
    tokenizer = load_tokenizer(source)  # from the GGUF, without converting
    assert not source.hf_dir.exists()
    ids = tokenizer("def fibonacci(n): return n")["input_ids"]
    converted = load_model(source)
    assert (source.hf_dir / "model.safetensors").is_file()
    assert "quantization_config" not in (source.hf_dir / "config.json").read_text()
    assert not converted.training
    torch.testing.assert_close(logits(converted, ids), logits(load_gguf_directly(source), ids), rtol=0, atol=0)
    assert load_tokenizer(source)(" return n")["input_ids"] == tokenizer(" return n")["input_ids"]
    assert ensure_converted(source) == source.hf_dir  # second call: nothing to do


def test_trust_remote_code_is_off_by_default(tmp_path, monkeypatch):
    seen = {}

    def fake_from_pretrained(folder, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop")

    folder = make_tiny_model(tmp_path / "m", arch="llama")
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", fake_from_pretrained)
    with pytest.raises(RuntimeError):
        load_model(str(folder))
    assert seen["trust_remote_code"] is False and seen["local_files_only"] is True


@pytest.mark.slow
def test_real_smollm2_resolves_converts_and_matches_its_gguf():
    source = resolve_model("smollm2")
    assert source.name == "smollm2" and not source.add_bos and len(source.identity["sha256"]) == 64
    tokenizer = load_tokenizer(source)
    ids = tokenizer("def add(a, b):\n    return a + b\n")["input_ids"]
    converted = load_model(source, dtype=torch.float32)
    assert converted.config.vocab_size == 49152
    torch.testing.assert_close(logits(converted, ids), logits(load_gguf_directly(source), ids), rtol=0, atol=1e-5)
