"""Shared fixtures: a small corpus and caches built from tiny random models with three different tokenizers."""

import json
from pathlib import Path

import pytest

from cache_builder.align import align_cache
from cache_builder.build import BuildSettings, build_cache
from tests.tiny import make_tiny_model

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Ünïcödé text — with “quotes” and 日本語 and emoji 🙂.",
    "for i in range(10):\n\tprint(i * i)\n\n\n",
    "A tale of two cities: it was the best of times, it was the worst of times.",
    "x = [n ** 2 for n in range(100) if n % 3 == 0]",
    "Proof. Let n be even; then n = 2k and n^2 = 4k^2, which is even.",
    "class Stack:\n    def __init__(self):\n        self.items = []\n",
]


def write_corpus(path: Path) -> Path:
    records = []
    for i in range(24):
        text = TEXTS[i % len(TEXTS)] + f" #{i}"
        split = "heldout" if i % 6 == 5 else "train"
        domain = "code" if "def" in text or "for" in text or "class" in text or "x =" in text else "prose"
        if i % 3 == 0:
            records.append({"prompt": f"Task {i}:", "response": text, "domain": domain, "split": split})
        else:
            records.append({"text": text, "domain": domain, "split": split})
    path.mkdir(parents=True, exist_ok=True)
    (path / "corpus.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    models = {
        "pivot": make_tiny_model(root / "models" / "pivot", arch="llama", seed=0),
        "srcq": make_tiny_model(root / "models" / "srcq", arch="qwen2", vocab=300, seed=1, extra_vocab_rows=7),
        "srcg": make_tiny_model(root / "models" / "srcg", arch="gemma3", seed=2),
    }
    corpus = write_corpus(root / "corpus")
    settings = {name: BuildSettings(model=str(models[name]), top_k=4, rows_per_shard=5, batch_tokens=256,
                                    position_chunk=16) for name in ("srcq", "srcg")}
    for name in ("srcq", "srcg"):
        build_cache(corpus, settings[name], root / "cache", log=lambda *_: None)
        align_cache(root / "cache" / name, str(models["pivot"]), log=lambda *_: None)
    return {"root": root, "models": models, "corpus": corpus, "cache": root / "cache", "settings": settings}


