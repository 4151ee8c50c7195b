"""experiments/target_ceiling.py: the targets-as-predictor distribution against an explicit per-position loop."""

import numpy as np

from experiments import target_ceiling


def explicit_distribution(p_model: np.ndarray, ids: np.ndarray, q: np.ndarray) -> np.ndarray:
    """p* over the whole vocabulary at one aligned position, built entry by entry."""
    candidates = [int(v) for v in ids if v >= 0]
    rest = 1.0 - sum(q[j] for j, v in enumerate(ids) if v >= 0)
    model_rest = 1.0 - sum(p_model[v] for v in candidates)
    out = np.empty_like(p_model)
    for v in range(len(p_model)):
        if v in candidates:
            out[v] = q[candidates.index(v)]
        else:
            out[v] = rest * p_model[v] / model_rest
    return out


def test_ceiling_matches_an_explicit_distribution_and_is_normalised():
    rng = np.random.default_rng(0)
    T1, V, K = 7, 12, 4
    logits = rng.normal(size=(T1, V))
    logprobs = logits - np.log(np.exp(logits).sum(1, keepdims=True))  # (T-1, V)
    gold = rng.integers(0, V, size=T1)
    aligned_pos = np.array([0, 2, 3, 5])
    topk_ids = np.full((4, K), -1)
    topk_ids[0, :3] = [gold[0], 4, 7]  # gold among the candidates
    topk_ids[1, :4] = [(gold[2] + d) % V for d in (1, 2, 3, 4)]  # gold absent: the model's tail carries it
    topk_ids[2, :2] = [gold[3], (gold[3] + 5) % V]
    topk_ids[3, :1] = [(gold[5] + 1) % V]  # one candidate, gold absent
    source_logits = rng.normal(size=(4, K)) * 2
    lse = np.log(np.exp(source_logits).sum(1)) + 0.7  # the source's full vocabulary holds more mass
    got, named = target_ceiling.ceiling_logprobs(logprobs, gold, aligned_pos, topk_ids, source_logits, lse)

    for t in range(T1):
        if t in aligned_pos:
            j = int(np.flatnonzero(aligned_pos == t)[0])
            dist = explicit_distribution(np.exp(logprobs[t]), topk_ids[j], np.exp(source_logits[j] - lse[j]))
            np.testing.assert_allclose(dist.sum(), 1.0, rtol=1e-12)
            np.testing.assert_allclose(got[t], np.log(dist[gold[t]]), rtol=1e-10)
            assert named[t] == (gold[t] in topk_ids[j])
        else:
            np.testing.assert_allclose(got[t], logprobs[t, gold[t]], rtol=1e-12)
            assert not named[t]
    assert named.sum() == 2  # positions 0 and 3


def test_position_kinds():
    named = np.array([True, False, True, False, False, True, False])
    kinds = target_ceiling.position_kinds(7, np.array([0, 1, 2, 5]), np.array([0, 1, 3, 4]), named)
    assert kinds.tolist() == ["single+named", "multi+absent", "multi+named", "unaligned", "unaligned",
                              "multi+named", "unaligned"]
