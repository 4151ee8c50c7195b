"""Tests of fuse_trainer.merge: per-element references, identities, and a tiny HF model merge."""

import json

import numpy as np
import pytest
import torch

from fuse_trainer.merge import MERGE_METHODS, merge_checkpoints, task_arithmetic, ties, ties_deltas


def _state_dicts(n_models=3, seed=0):
    g = torch.Generator().manual_seed(seed)

    def one():
        return {
            "w": torch.randn(4, 5, generator=g),
            "b": torch.randn(5, generator=g, dtype=torch.float64),
            "h": torch.randn(3, 2, generator=g).to(torch.bfloat16),
            "scale": torch.randn((), generator=g),
            "count": torch.randint(0, 9, (3,), generator=g),
        }

    return one(), [one() for _ in range(n_models)]


def _ties_reference(base, models, weights, density):
    """TIES per element, written plainly with numpy and Python loops."""
    b = np.asarray(base, dtype=np.float64).ravel()
    deltas = []
    for m, w in zip(models, weights):
        d = np.asarray(m, dtype=np.float64).ravel() - b
        keep = max(1, int(np.ceil(density * d.size)))
        order = sorted(range(d.size), key=lambda i: -abs(d[i]))[:keep]
        trimmed = np.zeros_like(d)
        trimmed[order] = d[order]
        deltas.append(w * trimmed)
    out = b.copy()
    for i in range(b.size):
        sign = np.sign(sum(d[i] for d in deltas))
        agree = [d[i] for d in deltas if d[i] != 0 and np.sign(d[i]) == sign]
        if agree:
            out[i] += sum(agree) / len(agree)
    return out.reshape(np.shape(base))


def test_task_arithmetic_matches_elementwise_reference():
    base, models = _state_dicts()
    weights = [0.5, -0.25, 1.5]
    merged = task_arithmetic(base, models, weights)
    for name in ("w", "b", "scale"):
        b = np.asarray(base[name], dtype=np.float64)
        ref = b.copy()
        for m, w in zip(models, weights):
            ref = ref + w * (np.asarray(m[name], dtype=np.float64) - b)
        assert merged[name].dtype == base[name].dtype
        np.testing.assert_allclose(merged[name].double().numpy(), ref, rtol=1e-5, atol=1e-5)
    assert merged["h"].dtype == torch.bfloat16
    assert torch.equal(merged["count"], base["count"])  # non-float: copied from base


def test_ties_matches_elementwise_reference():
    base, models = _state_dicts(seed=1)
    weights = [1.0, 0.7, 0.4]
    for density in (0.2, 0.5, 1.0):
        merged = ties(base, models, weights, density=density)
        for name in ("w", "b", "scale"):
            finetuned = [m[name].double() for m in models]
            ref = _ties_reference(base[name].double(), finetuned, weights, density)
            np.testing.assert_allclose(merged[name].double().numpy(), ref, rtol=1e-5, atol=1e-5)
        assert torch.equal(merged["count"], base["count"])


def test_ties_hand_computed_1d():
    deltas = torch.tensor([[3.0, -1.0, 0.5, 2.0], [-2.0, -4.0, 1.0, 0.1], [1.0, 0.2, -6.0, 1.5]])
    # density 0.5 keeps 2 entries per row: [3, 0, 0, 2], [-2, -4, 0, 0], [0, 0, -6, 1.5]
    # sums [1, -4, -6, 3.5] -> signs [+, -, -, +]; agreeing: [3], [-4], [-6], [2, 1.5]
    out = ties_deltas(deltas, torch.ones(3), density=0.5)
    torch.testing.assert_close(out, torch.tensor([3.0, -4.0, -6.0, 1.75]))
    # weights scale before the election: [1.5, 0, 0, 1], [-2, -4, 0, 0], [0, 0, -6, 1.5]
    # sums [-0.5, -4, -6, 2.5] -> signs [-, -, -, +]; agreeing: [-2], [-4], [-6], [1, 1.5]
    out = ties_deltas(deltas, torch.tensor([0.5, 1.0, 1.0]), density=0.5)
    torch.testing.assert_close(out, torch.tensor([-2.0, -4.0, -6.0, 1.25]))


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_identities(method):
    options = {"density": 1.0} if method == "ties" else {}
    base, models = _state_dicts(seed=2)
    one = MERGE_METHODS[method](base, [models[0]], [1.0], **options)
    for name, t in models[0].items():
        torch.testing.assert_close(one[name], t if t.is_floating_point() else base[name])
    zero = MERGE_METHODS[method](base, models, [0.0, 0.0, 0.0], **options)
    for name, t in base.items():
        torch.testing.assert_close(zero[name], t)


def test_merge_errors():
    base, models = _state_dicts()
    with pytest.raises(ValueError, match="weights"):
        task_arithmetic(base, models, [1.0])
    bad = dict(models[0], w=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="shape"):
        task_arithmetic(base, [bad], [1.0])
    with pytest.raises(ValueError, match="density"):
        ties(base, models, [1.0] * 3, density=0.0)


def _tiny_llama(path, seed, tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=128, tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("method", sorted(MERGE_METHODS))
def test_merge_checkpoints_tiny_llama(tmp_path, method):
    from transformers import AutoModelForCausalLM

    base = _tiny_llama(tmp_path / "base", 0, tie=True)
    (tmp_path / "base" / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    models = [_tiny_llama(tmp_path / f"ft{i}", i + 1, tie=True) for i in range(2)]
    weights = [0.6, 0.4]
    options = {"density": 0.5} if method == "ties" else {}
    out = merge_checkpoints(
        tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"], weights, method, tmp_path / "out",
        **options,
    )

    merged = AutoModelForCausalLM.from_pretrained(out)
    sd = merged.state_dict()
    finetuned = [m.state_dict() for m in models]
    ref = MERGE_METHODS[method](base.state_dict(), finetuned, weights, **options)
    for name, t in ref.items():
        torch.testing.assert_close(sd[name], t)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    assert (out / "tokenizer_config.json").read_text() == '{"model_max_length": 64}\n'
    record = json.loads((out / "merge_config.json").read_text())
    assert record["method"] == method and record["weights"] == weights
    with torch.no_grad():
        logits = merged(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 128) and torch.isfinite(logits).all()


def test_merge_checkpoints_rejects_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        merge_checkpoints(tmp_path, [tmp_path], [1.0], "task-arithmetic", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_checkpoints(tmp_path, [tmp_path], [1.0], "slerp", tmp_path / "out")
