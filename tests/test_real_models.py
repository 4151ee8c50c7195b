"""The whole pipeline once with the real pretrained models (slow: runs in CI, skip locally with -m 'not slow').

Qwen2.5-Coder-0.5B is the source and SmolLM2-135M the pivot, over a few short records: cache-build with
--pivot, cache-verify with --rescore, fuse-train for two steps, fuse-eval.
"""

import json

import pytest
from click.testing import CliRunner

from cache_builder.cli import build, info, verify
from fuse_trainer.cli import evaluate, train

pytestmark = pytest.mark.slow

RECORDS = [
    {"prompt": "Write a function that adds two numbers.", "response": "def add(a, b):\n    return a + b\n", "domain": "code"},
    {"text": "It was the best of times, it was the worst of times, it was the age of wisdom.", "domain": "prose"},
    {"text": "To be, or not to be, that is the question.", "domain": "prose", "split": "heldout"},
    {"prompt": "What is 7 * 6?", "response": "7 * 6 = 42.", "domain": "math", "split": "heldout"},
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    (folder / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return folder


def _run(command, args):
    result = CliRunner().invoke(command, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_real_source_to_fused_pivot(corpus, tmp_path):
    cache = tmp_path / "cache"
    _run(build, ["--model", "qwen", "--corpus", str(corpus / "corpus.jsonl"), "--out", str(cache), "--pivot", "smollm2",
                 "--dtype", "fp32", "--logit-dtype", "float32"])
    assert "verified" in _run(verify, [str(cache), "--rescore", "2"])
    summary = json.loads(_run(info, [str(cache), "--json"]))
    aligned = next(r for r in summary if r["layer"] == "aligned")
    assert aligned["coverage"] > 0.6 and aligned["kept_mass"] > 0.5
    _run(train, ["--shards", str(cache), "--mode", "unified", "--max-steps", "2", "--batch-tokens", "512",
                 "--out", str(tmp_path / "run"), "--save-every", "0", "--gate", "token"])
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(s["fusion"] > 0 and 0 < s["kept_mass"] <= 1 for s in steps)
    table = _run(evaluate, ["--data", str(corpus), "--model", "pivot=smollm2", "--model", f"fused={tmp_path / 'run' / 'final'}"])
    assert "pivot" in table and "fused" in table and "prose" in table
