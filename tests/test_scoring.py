"""The scoring core against a plain full-logits reference, on tiny random models (and SmolLM2, slow)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, PhiConfig

from cache_builder.scoring import (FIELDS, LogitMoments, OutputHead, ScoredSequence, cached_output_head,
                                   length_buckets, output_head, score_batch, scoring_buffers, top_k_by_groups, trunk_hidden,
                                   verify_output_head)
from tests.tiny import make_tiny_model

TOP_K = 5


def reference(model: torch.nn.Module, sequence: list[int], top_k: int) -> dict:
    """Every ScoredSequence field from `model(ids).logits`, log_softmax and a full sort (no chunks, no batch)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0, :-1].double()  # (T-1, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    ordered, order = torch.sort(logits, dim=-1, descending=True)
    mean = logits.mean(-1)
    std = ((logits - mean[:, None]) ** 2).mean(-1).sqrt()
    gold = log_probs.gather(1, torch.tensor(sequence[1:])[:, None])[:, 0]
    return {"topk_ids": order[:, :top_k].numpy(), "topk_logits": ordered[:, :top_k].numpy(),
            "logsumexp": torch.logsumexp(logits, -1).numpy(), "logit_mean": mean.numpy(), "logit_std": std.numpy(),
            "z_logsumexp": torch.logsumexp((logits - mean[:, None]) / std[:, None], -1).numpy(),
            "gold_logprob": gold.numpy()}


def assert_matches(scored: ScoredSequence, expected: dict, model: torch.nn.Module, sequence: list[int],
                   atol: float = 2e-5) -> None:
    """Values within atol of the reference; top-k ids checked by value so that exact ties cannot fail it."""
    positions = len(sequence) - 1
    assert scored.topk_ids.shape == (positions, TOP_K) and scored.topk_ids.dtype == np.int32
    for name in FIELDS[1:]:
        array = getattr(scored, name)
        assert array.dtype == np.float32 and array.shape[0] == positions, name
        np.testing.assert_allclose(array, expected[name], atol=atol, rtol=1e-5, err_msg=name)
    assert np.all(np.diff(scored.topk_logits, axis=1) <= 0)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([sequence])).logits[0, :-1].double().numpy()  # (T-1, V)
    np.testing.assert_allclose(np.take_along_axis(logits, scored.topk_ids, 1), expected["topk_logits"], atol=atol)
    assert (scored.topk_ids == expected["topk_ids"]).mean() > 0.99


def random_sequences(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Uniform random token ids, one list per length."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=n).tolist() for n in lengths]


def load(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}),  # tied
    ("qwen2", {}),  # untied
    ("gemma3", {"final_logit_softcapping": 2.0}),  # tied, sliding window, softcapping that matters
])
def test_every_field_matches_full_logits(tmp_path, arch, overrides):
    model = load(make_tiny_model(tmp_path / arch, arch=arch, seed=1, extra_vocab_rows=3, **overrides))
    sequences = random_sequences(model.config.vocab_size, [17, 5, 12, 2, 23])
    results = score_batch(model, sequences, TOP_K, position_chunk=7)  # chunks cross sequence boundaries
    for sequence, scored in zip(sequences, results):
        assert_matches(scored, reference(model, sequence, TOP_K), model, sequence)


def direct_moments_float64(head, hidden: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The mean and population std over every output row of scale * (W h + b), all in float64."""
    logits = hidden.double() @ head.weight.double().T  # (N, V)
    if head.bias is not None:
        logits += head.bias.double()
    logits *= head.scale
    return logits.mean(-1).numpy(), logits.std(-1, correction=0).numpy()


MOMENTS_RTOL = 1e-10  # closed form vs the direct computation, both float64: only summation order differs


def assert_moments_match(head, hidden: torch.Tensor) -> None:
    """The head's closed-form mean and std of hidden's logits equal the direct float64 ones within MOMENTS_RTOL."""
    mean, std = head.moments.mean_std(hidden)
    expected_mean, expected_std = direct_moments_float64(head, hidden)
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=MOMENTS_RTOL, atol=MOMENTS_RTOL)
    np.testing.assert_allclose(std.numpy(), expected_std, rtol=MOMENTS_RTOL)


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {}),  # tied embeddings
    ("qwen2", {}),  # untied
    ("gemma3", {}),  # tied, scaled embeddings, no softcap
])
def test_closed_form_moments_equal_direct_float64(tmp_path, arch, overrides):
    model = load(make_tiny_model(tmp_path / arch, arch=arch, seed=1, extra_vocab_rows=3, **overrides))
    head = output_head(model)
    assert head.moments is not None and head.weight.shape[0] == model.config.vocab_size  # padded rows included
    ids = torch.tensor(random_sequences(model.config.vocab_size, [20])[0])[None]
    with torch.no_grad():
        hidden = trunk_hidden(model, ids, torch.ones_like(ids))[0]  # (T, D)
    assert_moments_match(head, hidden)


def test_closed_form_moments_with_bias_scale_and_large_offset():
    """A bias, a logit scale, and rows sharing a large offset (mean logit ~1e3 x the std), where E[z^2] - mean^2
    in float32 would lose every digit of the variance; the centred float64 form keeps them."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1001, 24, generator=generator) * 0.1 + 30.0  # (V, D)
    bias = torch.randn(1001, generator=generator)
    hidden = torch.rand(7, 24, generator=generator) + 1.0  # (N, D) positive: the offsets add up
    head = OutputHead(weight=weight, bias=bias, scale=0.125, softcap=None,
                      moments=LogitMoments.of(weight, bias, 0.125, block_rows=100))
    mean, std = head.moments.mean_std(hidden)
    expected_mean, expected_std = direct_moments_float64(head, hidden)
    assert np.all(np.abs(expected_mean) > 100 * expected_std)
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=MOMENTS_RTOL)
    np.testing.assert_allclose(std.numpy(), expected_std, rtol=1e-8)


def test_softcapped_head_has_no_closed_form_moments(tmp_path):
    model = load(make_tiny_model(tmp_path / "g", arch="gemma3", seed=2, final_logit_softcapping=1.0))
    assert output_head(model).moments is None


@pytest.mark.parametrize("vocab, k", [(1000, 10), (1003, 7), (50, 10), (12, 12), (160, 10)])
def test_top_k_by_groups_equals_torch_topk(vocab, k):
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(9, vocab, generator=generator)
    logits[0] = 1.0  # a row of ties
    logits[1, :30] = logits[1].max()  # ties at the top across groups
    logits[2, -3:] = 50.0  # the top in the tail past the groups
    values, ids = top_k_by_groups(logits, k)
    expected = torch.topk(logits, k, dim=-1, sorted=True).values
    assert torch.equal(values, expected)
    assert torch.equal(logits.gather(1, ids), values)
    assert all(len(set(row.tolist())) == k for row in ids)


def test_softcap_is_applied(tmp_path):
    model = load(make_tiny_model(tmp_path / "g", arch="gemma3", seed=2, final_logit_softcapping=1.0))
    head = output_head(model)
    assert head.softcap == 1.0
    sequence = random_sequences(model.config.vocab_size, [9])[0]
    top = score_batch(model, [sequence], TOP_K, head=head)[0].topk_logits
    assert np.all(np.abs(top) < 1.0)


def test_lm_head_bias_is_applied():
    torch.manual_seed(0)
    config = PhiConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.bias.normal_(0, 1.0)
    assert output_head(model).bias is not None
    sequences = random_sequences(101, [11, 4])
    for sequence, scored in zip(sequences, score_batch(model, sequences, TOP_K, position_chunk=4)):
        assert_matches(scored, reference(model, sequence, TOP_K), model, sequence)


def test_unhandled_output_transform_fails_loudly(tmp_path):
    model = load(make_tiny_model(tmp_path / "g", arch="gemma3", seed=2, final_logit_softcapping=1.0))
    head = output_head(model)
    without_cap = OutputHead(weight=head.weight, bias=head.bias, scale=head.scale, softcap=None)
    with pytest.raises(ValueError, match="output transform"):
        verify_output_head(model, without_cap)


def test_batched_equals_alone_and_is_deterministic(tmp_path):
    model = load(make_tiny_model(tmp_path / "m", arch="gemma3", seed=3))  # sliding window 8 < lengths
    sequences = random_sequences(model.config.vocab_size, [30, 3, 19, 30, 11], seed=4)
    head = output_head(model)
    batched = score_batch(model, sequences, TOP_K, position_chunk=16, head=head)
    again = score_batch(model, sequences, TOP_K, position_chunk=16, head=head)
    for sequence, together, repeat in zip(sequences, batched, again):
        alone = score_batch(model, [sequence], TOP_K, position_chunk=1000, head=head)[0]
        for name in FIELDS:
            np.testing.assert_allclose(getattr(together, name), getattr(alone, name), atol=1e-5, err_msg=name)
            assert np.array_equal(getattr(together, name), getattr(repeat, name)), name  # bitwise


def test_buffers_reused_across_batches_give_the_same_bytes(tmp_path):
    model = load(make_tiny_model(tmp_path / "m", arch="llama", seed=3))
    sequences = random_sequences(model.config.vocab_size, [30, 3, 19], seed=4)
    buffers = scoring_buffers(model, 16)
    buffers.fill_(float("nan"))  # leftovers of an earlier batch must not reach a result
    for batch in ([sequences[0]], sequences[1:], sequences):
        fresh = score_batch(model, batch, TOP_K, position_chunk=16)
        reused = score_batch(model, batch, TOP_K, position_chunk=16, buffers=buffers)
        for ours, theirs in zip(reused, fresh):
            for name in FIELDS:
                assert np.array_equal(getattr(ours, name), getattr(theirs, name)), name
    with pytest.raises(ValueError, match="scoring_buffers"):
        score_batch(model, sequences, TOP_K, position_chunk=32, buffers=buffers)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fused_epilogue_gives_the_same_top_k_and_statistics_within_1e_5(tmp_path, arch):
    """--fused-epilogue: both normalisers from one torch.compile'd read of the chunk, against the eager path."""
    model = load(make_tiny_model(tmp_path / "m", arch=arch, seed=3))
    sequences = random_sequences(model.config.vocab_size, [30, 3, 19], seed=4)
    eager = score_batch(model, sequences, TOP_K, position_chunk=16)
    fused = score_batch(model, sequences, TOP_K, position_chunk=16, fused=True)  # chunks of 16 and a last of 9
    for ours, theirs in zip(fused, eager):
        assert np.array_equal(ours.topk_ids, theirs.topk_ids)
        for name in FIELDS[1:]:
            np.testing.assert_allclose(getattr(ours, name), getattr(theirs, name), rtol=1e-5, atol=1e-5, err_msg=name)


def test_fused_epilogue_without_a_compiler_names_the_fix(tmp_path, monkeypatch):
    import cache_builder.scoring as scoring

    def no_compiler(*args):
        raise RuntimeError("InductorError: CppCompileError: no C++ compiler")

    monkeypatch.setattr(scoring, "compiled_exp_sums", lambda: no_compiler)
    model = load(make_tiny_model(tmp_path / "m", arch="llama", seed=3))
    with pytest.raises(ValueError, match="install a C\\+\\+ compiler .* or drop --fused-epilogue"):
        score_batch(model, random_sequences(model.config.vocab_size, [12], seed=4), TOP_K, fused=True)


def test_bf16_trunk_gives_float32_outputs_close_to_fp32(tmp_path):
    folder = make_tiny_model(tmp_path / "m", arch="llama", seed=5)
    sequences = random_sequences(384, [13, 8], seed=6)
    full = score_batch(load(folder), sequences, TOP_K)
    half_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    half = score_batch(half_model, sequences, TOP_K)
    for a, b in zip(full, half):
        assert b.logsumexp.dtype == np.float32 and b.topk_logits.dtype == np.float32
        np.testing.assert_allclose(b.logsumexp, a.logsumexp, atol=0.1)


def test_edge_cases(tmp_path):
    model = load(make_tiny_model(tmp_path / "m", arch="llama", seed=0))
    one, two = score_batch(model, [[5], [5, 6]], TOP_K)
    assert one.topk_ids.shape == (0, TOP_K) and one.gold_logprob.shape == (0,)
    assert two.topk_ids.shape == (1, TOP_K)
    only = score_batch(model, [np.array([7])], TOP_K)[0]
    assert only.topk_logits.shape == (0, TOP_K) and only.topk_ids.dtype == np.int32
    with pytest.raises(ValueError, match="top_k"):
        score_batch(model, [[1, 2]], top_k=10**6)
    with pytest.raises(ValueError, match="non-empty"):
        score_batch(model, [[1, 2], []], TOP_K)


def test_length_buckets_cover_once_and_respect_budget():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 300, size=200).tolist() + [1000, 5]
    budget = 512
    batches = length_buckets(lengths, budget)
    flat = [index for batch in batches for index in batch]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or max(lengths[i] for i in batch) * len(batch) <= budget
    assert [1000 in [lengths[i] for i in batch] and len(batch) == 1 for batch in batches].count(True) == 1
    assert batches == length_buckets(lengths, budget)
    assert length_buckets([], budget) == []
    with pytest.raises(ValueError):
        length_buckets(lengths, 0)


@pytest.mark.slow
def test_smollm2_cached_values_equal_full_logits():
    from cache_builder.models import load_gguf_directly, load_tokenizer, resolve_model

    source = resolve_model("smollm2")
    model = load_gguf_directly(source, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    texts = ["def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
             "Shall I compare thee to a summer's day?"]
    sequences = [tokenizer(text)["input_ids"] for text in texts]
    for sequence, scored in zip(sequences, score_batch(model, sequences, TOP_K, position_chunk=16)):
        assert_matches(scored, reference(model, sequence, TOP_K), model, sequence, atol=2e-4)


def test_head_is_cached_per_model_and_follows_weight_updates(tmp_path):
    model = load(make_tiny_model(tmp_path / "m", arch="qwen2", seed=0)).to(torch.bfloat16)
    first = cached_output_head(model)
    assert cached_output_head(model) is first and first.weight.dtype == torch.float32
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    second = cached_output_head(model)
    assert second is not first
    torch.testing.assert_close(second.weight, first.weight * 2, rtol=1e-2, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run by benchmarks/gpu_check.sh)")
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_bf16_head_on_cuda_equals_its_float32_copy(tmp_path, arch):
    """On CUDA a bf16 model's head runs as one bf16 GEMM with float32 output; the same hidden states through a
    float32 copy of the same weights give the same fields (only the accumulation order differs)."""
    folder = make_tiny_model(tmp_path / arch, arch=arch, seed=7, extra_vocab_rows=3)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    head = output_head(model)
    assert head.weight.dtype == torch.bfloat16
    float_head = type(head)(weight=head.weight.float(), bias=head.bias, scale=head.scale, softcap=head.softcap)
    sequences = random_sequences(model.config.vocab_size, [40, 9, 23], seed=8)
    fast = score_batch(model, sequences, TOP_K, position_chunk=16, head=head)
    exact = score_batch(model, sequences, TOP_K, position_chunk=16, head=float_head)
    for a, b in zip(fast, exact):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        for name in FIELDS[1:]:
            np.testing.assert_allclose(getattr(a, name), getattr(b, name), atol=1e-4, rtol=1e-5, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2", "qwen", "gemma3"])
def test_real_model_closed_form_moments_equal_direct_float64(name):
    """The three real sources (Qwen2.5's 151,936 rows include padding past its tokenizer): closed-form mean and
    std against the float64 logits of the same float32 head, within MOMENTS_RTOL."""
    from cache_builder.models import load_model, load_tokenizer, resolve_model

    source = resolve_model(name)
    model = load_model(source, torch.float32)
    head = output_head(model)
    assert head.moments is not None  # none of the three caps its logits
    text = "def fibonacci(n):\n    a, b = 0, 1\n    return a\nShall I compare thee to a summer's day?"
    ids = torch.tensor(load_tokenizer(source)(text)["input_ids"])[None]  # (1, T)
    with torch.no_grad():
        hidden = trunk_hidden(model, ids, torch.ones_like(ids))[0]  # (T, D)
    assert_moments_match(head, hidden)
