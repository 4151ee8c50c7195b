"""Parity tests of fuse_trainer.losses against plain dense references."""

import math

import pytest
import torch

from fuse_trainer.losses import (
    FUSION_LOSSES,
    FusionInputs,
    alm_loss,
    chunk_logprob_sum,
    log1mexp,
    pivot_uld_stats,
    sft_loss,
    soft_ce_loss,
    topk_kl_loss,
    uld_loss,
    valid_positions,
)

EPS = 1e-6


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _source(n, vs, k, seed=1, dtype=torch.float64, scale=3.0):
    """Full source logits (n, vs) and the cache fields derived from them, densely."""
    z = torch.randn(n, vs, generator=_gen(seed), dtype=dtype) * scale
    top = torch.sort(z, dim=-1, descending=True)
    mean = z.mean(-1)
    std = z.std(-1, correction=0)
    zlse = torch.logsumexp((z - mean[:, None]) / std[:, None], dim=-1)
    return dict(
        full=z, topk_logits=top.values[:, :k], topk_ids=top.indices[:, :k],
        lse=torch.logsumexp(z, -1), mean=mean, std=std, zlse=zlse,
    )


def _dense_uld(piv, src_full, k, temperature, standardize, normalize):
    """Reference ULD: full softmax, full sort, first K, per position in a Python loop."""
    out = []
    for p_row, s_row in zip(piv, src_full):
        vecs = []
        for row in (s_row, p_row):
            s = (row - row.mean()) / row.std(correction=0) if standardize else row
            s = s / temperature
            if normalize == "full":
                probs = torch.sort(torch.softmax(s, 0), descending=True).values[:k]
            else:
                probs = torch.softmax(torch.sort(s, descending=True).values[:k], 0)
            vecs.append(probs)
        out.append(sum(abs(a - b) for a, b in zip(*vecs)))
    return torch.stack(out)


# ---------------------------------------------------------------- SFT and combiner


def test_sft_loss_matches_loop():
    logits = torch.randn(2, 5, 11, generator=_gen())
    labels = torch.randint(0, 11, (2, 5), generator=_gen(1))
    mask = torch.rand(2, 5, generator=_gen(2)) > 0.4
    labels[~mask] = -100  # ignored values must not break the gather
    total, n = sft_loss(logits, labels, mask)
    ref = sum(
        -torch.log_softmax(logits[b, t], 0)[labels[b, t]]
        for b in range(2) for t in range(5) if mask[b, t]
    )
    assert int(n) == int(mask.sum())
    torch.testing.assert_close(total, ref)


# ---------------------------------------------------------------- ULD


@pytest.mark.parametrize("standardize", [True, False])
@pytest.mark.parametrize("normalize", ["topk", "full"])
def test_uld_matches_dense(standardize, normalize):
    n, v, k = 6, 40, 5
    src = _source(n, 30, k)  # the source vocabulary differs from the pivot's
    piv = torch.randn(n, v, generator=_gen(3), dtype=torch.float64) * 2
    for temperature in ([1.0] if normalize == "full" else [1.0, 0.3, 2.0]):
        got = uld_loss(
            piv, src["topk_logits"], src["lse"], src["mean"], src["std"], src["zlse"],
            top_k=k, temperature=temperature, standardize=standardize, normalize=normalize,
        )
        ref = _dense_uld(piv, src["full"], k, temperature, standardize, normalize)
        torch.testing.assert_close(got, ref)


def test_uld_k_equals_v_is_dense_uld_and_normalisations_agree():
    n, v = 4, 12
    src = _source(n, v, v)
    piv = torch.randn(n, v, generator=_gen(4), dtype=torch.float64)
    args = (piv, src["topk_logits"], src["lse"], src["mean"], src["std"], src["zlse"])
    topk = uld_loss(*args, top_k=v, normalize="topk")
    full = uld_loss(*args, top_k=v, normalize="full")
    ref = torch.stack([
        (torch.sort(torch.softmax((s - s.mean()) / s.std(correction=0), 0)).values
         - torch.sort(torch.softmax((p - p.mean()) / p.std(correction=0), 0)).values).abs().sum()
        for s, p in zip(src["full"], piv)
    ])
    torch.testing.assert_close(topk, ref)
    torch.testing.assert_close(full, ref)


def test_uld_uses_only_first_top_k_of_a_larger_cache_and_ignores_empty_slots():
    n, v, k = 3, 20, 4
    src = _source(n, 25, 8)
    piv = torch.randn(n, v, generator=_gen(5), dtype=torch.float64)
    stats = (src["lse"], src["mean"], src["std"], src["zlse"])
    wide = uld_loss(piv, src["topk_logits"], *stats, top_k=k)
    narrow = uld_loss(piv, src["topk_logits"][:, :k], *stats, top_k=k)
    torch.testing.assert_close(wide, narrow)

    valid = torch.ones(n, 8, dtype=torch.bool)
    valid[0, 1] = False  # an empty slot: probability 0, sorted to the end
    valid[2] = False  # no slot at all: loss 0
    got = uld_loss(piv, src["topk_logits"], *stats, top_k=k, src_valid=valid)
    s = (src["topk_logits"][0, [0, 2, 3]] - src["mean"][0]) / src["std"][0]
    p_src = torch.cat([torch.softmax(s, 0), torch.zeros(1, dtype=s.dtype)])
    pz = (piv[0] - piv[0].mean()) / piv[0].std(correction=0)
    p_piv = torch.softmax(torch.sort(pz, descending=True).values[:k], 0)
    torch.testing.assert_close(got[0], (p_src - p_piv).abs().sum())
    torch.testing.assert_close(got[1], wide[1])
    assert got[2].item() == 0.0


def test_uld_errors():
    src = _source(2, 10, 4)
    piv = torch.randn(2, 10, dtype=torch.float64)
    args = (piv, src["topk_logits"], src["lse"], src["mean"], src["std"], src["zlse"])
    with pytest.raises(ValueError, match="temperature 1"):
        uld_loss(*args, top_k=4, normalize="full", temperature=0.5)
    with pytest.raises(ValueError, match="top_k"):
        uld_loss(*args, top_k=5)
    with pytest.raises(ValueError, match="normalize"):
        uld_loss(*args, top_k=4, normalize="vocab")


@pytest.mark.parametrize("standardize,normalize,temperature", [
    (True, "topk", 0.5), (True, "full", 1.0), (False, "topk", 2.0), (False, "full", 1.0),
])
def test_uld_gradcheck(standardize, normalize, temperature):
    src = _source(3, 9, 3)
    piv = torch.randn(3, 8, generator=_gen(6), dtype=torch.float64, requires_grad=True)

    def f(p):
        return uld_loss(
            p, src["topk_logits"], src["lse"], src["mean"], src["std"], src["zlse"],
            top_k=3, temperature=temperature, standardize=standardize, normalize=normalize,
        )

    assert torch.autograd.gradcheck(f, (piv,))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pivot_uld_stats_one_pass_backward_matches_autograd_of_plain_ops(dtype):
    """The fused top-K / mean / std statistics give the values and (B, T, V) gradients of plain torch ops."""
    logits = torch.randn(2, 5, 11, generator=_gen(3), dtype=dtype) * 2
    logits[1, 4] = 0.5  # a constant row: std 0, no std gradient (plain autograd gives nan there)
    g_top, g_mean, g_std = (torch.randn(*shape, generator=_gen(i), dtype=dtype)
                            for i, shape in enumerate([(2, 5, 4), (2, 5), (2, 5)]))

    def grads(stats_of):
        x = logits.clone().requires_grad_(True)
        top, mean, std = stats_of(x)
        ((top * g_top).sum() + (mean * g_mean).sum() + (std * g_std).sum()).backward()
        return (top, mean, std), x.grad

    fused, fused_grad = grads(lambda x: (lambda s: (s["top"], s["mean"], s["std"]))(pivot_uld_stats(x, 4, True, False)))
    plain, plain_grad = grads(lambda x: (torch.topk(x, 4, dim=-1).values, x.mean(-1), x.std(-1, correction=0)))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    regular = torch.ones(2, 5, dtype=torch.bool)
    regular[1, 4] = False
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a[regular], b[regular], **tol)
    torch.testing.assert_close(fused_grad[regular], plain_grad[regular], **tol)
    # The constant row: var = E[z^2] - mean^2 leaves float rounding (std ~ sqrt(eps) * |mean|), never nan.
    assert fused[2][1, 4] < 1e-3 and torch.isfinite(fused_grad).all()
    assert torch.autograd.gradcheck(lambda x: pivot_uld_stats(x, 3, True, True)["norm"],
                                    (logits[0].double().requires_grad_(True),))


# ---------------------------------------------------------------- FuseLLM soft CE


def _ids_and_logits(n, v, k, seed=7, dtype=torch.float64):
    ids = torch.stack([torch.randperm(v, generator=_gen(seed + i))[:k] for i in range(n)])
    logits = torch.sort(torch.randn(n, k, generator=_gen(seed), dtype=dtype) * 3, -1, True).values
    return ids, logits


def test_soft_ce_matches_loop_with_empty_slots_and_temperature():
    n, v, k = 5, 15, 4
    ids, logits = _ids_and_logits(n, v, k)
    ids[1, 2:] = -1
    logits[1, 2:] = 0.0
    ids[3] = -1
    logits[3] = 0.0
    piv = torch.randn(n, v, generator=_gen(8), dtype=torch.float64)
    for temperature in (1.0, 0.5, 3.0):
        got = soft_ce_loss(piv, ids.int(), logits, temperature=temperature)
        ref = []
        for i in range(n):
            kept = [j for j in range(k) if ids[i, j] >= 0]
            if not kept:
                ref.append(torch.zeros((), dtype=piv.dtype))
                continue
            target = torch.softmax(logits[i, kept] / temperature, 0)
            logq = torch.log_softmax(piv[i], 0)[ids[i, kept]]
            ref.append(-(target * logq).sum())
        torch.testing.assert_close(got, torch.stack(ref))
    assert valid_positions(ids).tolist() == [True, True, True, False, True]


def test_soft_ce_k_equals_v_is_dense_ce():
    n, v = 4, 9
    src = _source(n, v, v)
    piv = torch.randn(n, v, generator=_gen(9), dtype=torch.float64)
    got = soft_ce_loss(piv, src["topk_ids"], src["topk_logits"])
    ref = -(torch.softmax(src["full"], -1) * torch.log_softmax(piv, -1)).sum(-1)
    torch.testing.assert_close(got, ref)


def test_soft_ce_gradcheck():
    ids, logits = _ids_and_logits(3, 8, 3)
    ids[0, 2] = -1
    piv = torch.randn(3, 8, generator=_gen(10), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: soft_ce_loss(p, ids, logits, temperature=0.7), (piv,))


# ---------------------------------------------------------------- top-k KL


def test_topk_kl_k_equals_v_is_dense_kl():
    n, v = 5, 10
    src = _source(n, v, v)
    piv = torch.randn(n, v, generator=_gen(11), dtype=torch.float64)
    got = topk_kl_loss(piv, src["topk_ids"], src["topk_logits"], src["lse"])
    p = torch.softmax(src["full"], -1)
    ref = (p * (torch.log_softmax(src["full"], -1) - torch.log_softmax(piv, -1))).sum(-1)
    torch.testing.assert_close(got, ref)
    # identity ids in vocabulary order, too
    got_id = topk_kl_loss(piv, torch.arange(v).expand(n, v), src["full"], src["lse"])
    torch.testing.assert_close(got_id, ref)


def test_topk_kl_matches_loop_with_tail_and_empty_slots():
    n, vs, v, k = 4, 30, 20, 5
    src = _source(n, vs, k)
    ids, _ = _ids_and_logits(n, v, k, seed=12)
    logits = src["topk_logits"].clone()
    ids[0, 3] = -1  # an unmapped candidate: its mass goes to the tail
    logits[0, 3] = 0.0
    ids[2] = -1
    logits[2] = 0.0
    piv = torch.randn(n, v, generator=_gen(13), dtype=torch.float64)
    got = topk_kl_loss(piv, ids, logits, src["lse"])
    ref = []
    for i in range(n):
        logq_all = torch.log_softmax(piv[i], 0)
        total, p_sum, q_sum = 0.0, 0.0, 0.0
        for j in range(k):
            if ids[i, j] < 0:
                continue
            p = math.exp(logits[i, j] - src["lse"][i])
            q = math.exp(logq_all[ids[i, j]])
            total += p * math.log(p / q)
            p_sum, q_sum = p_sum + p, q_sum + q
        p_tail, q_tail = 1 - p_sum, max(1 - q_sum, 1e-8)
        total += p_tail * math.log(p_tail / q_tail)
        ref.append(total)
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float64))
    assert got[2].item() == pytest.approx(0.0, abs=1e-12)


def test_topk_kl_gradcheck():
    src = _source(3, 12, 4)
    ids, _ = _ids_and_logits(3, 8, 4, seed=14)
    ids[1, 3] = -1
    piv = torch.randn(3, 8, generator=_gen(15), dtype=torch.float64, requires_grad=True)
    def f(p):
        return topk_kl_loss(p, ids, src["topk_logits"], src["lse"])

    assert torch.autograd.gradcheck(f, (piv,))


def test_all_slots_empty_gives_zero_and_finite_grads():
    n, v, k = 3, 7, 4
    ids = torch.full((n, k), -1)
    logits = torch.zeros(n, k)
    stats = [torch.zeros(n), torch.zeros(n), torch.ones(n), torch.zeros(n)]
    piv = torch.randn(n, v, requires_grad=True)
    losses = [
        soft_ce_loss(piv, ids, logits),
        topk_kl_loss(piv, ids, logits, stats[0]),
        uld_loss(piv, logits, *stats, top_k=k, src_valid=ids >= 0),
    ]
    for loss in losses:
        assert torch.all(loss == 0)
    sum(loss.sum() for loss in losses).backward()
    assert torch.isfinite(piv.grad).all()
    assert not valid_positions(ids).any()


def test_float32_inputs_give_float32_losses():
    src = _source(2, 9, 3, dtype=torch.float32)
    piv = torch.randn(2, 9)
    ids = src["topk_ids"]
    assert soft_ce_loss(piv, ids, src["topk_logits"]).dtype == torch.float32
    assert topk_kl_loss(piv, ids, src["topk_logits"], src["lse"]).dtype == torch.float32
    stats = (src["lse"], src["mean"], src["std"], src["zlse"])
    out = uld_loss(piv, src["topk_logits"], *stats, top_k=3)
    assert out.dtype == torch.float32


# ---------------------------------------------------------------- gating


# ---------------------------------------------------------------- ALM


def _alm_reference(piv_lp, rows, starts, chunk_lp, num_pos, temperature, distance, eps=1e-6):
    """Per-chunk Python reference of alm_loss (float64, math module)."""
    out, lengths = [], []
    for k, (r, s) in enumerate(zip(rows.tolist(), starts.tolist())):
        nxt = k + 1 < len(rows) and rows[k + 1] == r
        e = int(starts[k + 1]) if nxt else int(num_pos[r])
        lp = sum(float(piv_lp[r, t]) for t in range(s, e))
        a = min(max(float(chunk_lp[k]) / temperature, -1e4), -eps)
        b = min(max(lp / temperature, -1e4), -eps)
        l1a, l1b = math.log(-math.expm1(a)), math.log(-math.expm1(b))
        if distance == "kl":
            pa = math.exp(a)
            out.append(pa * (a - b) + (1 - pa) * (l1a - l1b))
        else:
            out.append(abs(a - b) + abs(l1a - l1b))
        lengths.append(e - s)
    return torch.tensor(out, dtype=torch.float64), lengths


def _alm_batch(seed=16):
    g = _gen(seed)
    piv_lp = -torch.rand(3, 9, generator=g, dtype=torch.float64) * 3  # (B, T)
    num_pos = torch.tensor([9, 6, 8])
    rows = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2])
    starts = torch.tensor([0, 1, 4, 5, 0, 3, 1, 2, 7])  # row 2: position 0 is in no chunk
    chunk_lp = -torch.rand(9, generator=g, dtype=torch.float64) * 4
    return piv_lp, rows, starts, chunk_lp, num_pos


@pytest.mark.parametrize("distance", ["kl", "abs-log"])
@pytest.mark.parametrize("temperature", [1.0, 0.25, 100.0])
def test_alm_matches_per_chunk_reference(distance, temperature):
    piv_lp, rows, starts, chunk_lp, num_pos = _alm_batch()
    got, lengths = alm_loss(  # int32 indices, as the cache stores them
        piv_lp, rows.int(), starts.int(), chunk_lp, num_pos.int(),
        temperature=temperature, distance=distance,
    )
    ref, ref_len = _alm_reference(piv_lp, rows, starts, chunk_lp, num_pos, temperature, distance)
    torch.testing.assert_close(got, ref)
    assert lengths.tolist() == ref_len == [1, 3, 1, 4, 3, 3, 1, 5, 1]


def test_alm_zero_at_match_and_chunk_sums():
    piv_lp, rows, starts, _, num_pos = _alm_batch()
    sums, _ = chunk_logprob_sum(piv_lp, rows, starts, num_pos)
    loss, _ = alm_loss(piv_lp, rows, starts, sums.detach(), num_pos)
    torch.testing.assert_close(loss, torch.zeros_like(loss))
    # every position from a row's first chunk start to num_positions is counted exactly once
    assert sums.sum().item() == pytest.approx(
        piv_lp[0, :9].sum().item() + piv_lp[1, :6].sum().item() + piv_lp[2, 1:8].sum().item()
    )


def test_alm_gradcheck():
    piv_lp, rows, starts, chunk_lp, num_pos = _alm_batch()
    piv_lp.requires_grad_(True)
    for distance in ("kl", "abs-log"):
        def f(p, distance=distance):
            return alm_loss(p, rows, starts, chunk_lp, num_pos, distance=distance)[0]

        assert torch.autograd.gradcheck(f, (piv_lp,))


def test_alm_stable_at_extremes():
    piv_lp = torch.tensor([[0.0, -1e-9, -80.0, -1e-3]], requires_grad=True)
    rows = torch.tensor([0, 0, 0, 0])
    starts = torch.tensor([0, 1, 2, 3])
    chunk_lp = torch.tensor([0.0, -60.0, float("-inf"), -1e-8])
    for temperature in (0.01, 1.0, 100.0):
        num_pos = torch.tensor([4])
        loss, _ = alm_loss(piv_lp, rows, starts, chunk_lp, num_pos, temperature=temperature)
        assert torch.isfinite(loss).all() and (loss >= -1e-6).all()
        piv_lp.grad = None
        loss.sum().backward()
        assert torch.isfinite(piv_lp.grad).all()
    x = torch.tensor([-1e-10, -0.69, -0.7, -50.0, -1e4], dtype=torch.float64)
    ref = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), ref)


def test_alm_rejects_unsorted_chunks():
    piv_lp, rows, starts, chunk_lp, num_pos = _alm_batch()
    with pytest.raises(ValueError, match="sorted"):
        alm_loss(piv_lp, rows, starts.flip(0), chunk_lp, num_pos)
    with pytest.raises(ValueError, match="sorted"):
        alm_loss(piv_lp, rows, torch.tensor([0, 1, 4, 5, 0, 6, 1, 2, 7]), chunk_lp, num_pos)


# ---------------------------------------------------------------- registry


def test_registry_calls_every_loss():
    n, v, k = 4, 10, 3
    src = _source(n, 12, k, dtype=torch.float32)
    ids, _ = _ids_and_logits(n, v, k, seed=17)
    ids[3] = -1
    piv = torch.randn(n, v, requires_grad=True)
    row_lp = torch.log_softmax(torch.randn(1, 6, v), -1)[..., 0].requires_grad_(True)  # (1, 6)
    x = FusionInputs(
        piv_logits=piv, src_topk_ids=ids, src_topk_logits=src["topk_logits"], src_lse=src["lse"],
        src_mean=src["mean"], src_std=src["std"], src_zlse=src["zlse"],
        src_gold_logprob=-torch.rand(n), piv_gold_logprob=-torch.rand(n),
        piv_row_gold_logprob=row_lp, aligned_row=torch.zeros(n, dtype=torch.long),
        aligned_pos=torch.tensor([0, 2, 3, 5]), src_chunk_logprob=-torch.rand(n) * 3,
        num_positions=torch.tensor([6]),
    )
    configs = {"infifusion": {"top_k": 3, "temperature": 0.5}, "fusellm": {}, "topk-kl": {},
               "alm": {"temperature": 2.0}}
    assert set(FUSION_LOSSES) == set(configs)
    for name, cfg in configs.items():
        loss, valid = FUSION_LOSSES[name](x, **cfg)
        assert loss.shape == valid.shape == (n,) and valid.dtype == torch.bool
        assert torch.isfinite(loss).all()
        if name != "alm":
            assert valid.tolist() == [True, True, True, False]
    x.aligned_pos = None
    with pytest.raises(ValueError, match="aligned_pos"):
        FUSION_LOSSES["alm"](x)


def test_every_loss_gets_its_keyword_arguments_from_the_settings_its_registry_entry_names():
    from fuse_trainer.config import TrainConfig
    from fuse_trainer.losses import LOSS_SETTINGS

    assert set(LOSS_SETTINGS) == set(FUSION_LOSSES)
    cfg = TrainConfig(loss="infifusion", uld_top_k=7, fusion_temperature=0.5, alm_temperature=9.0).validate()
    assert cfg.loss_kwargs() == {"top_k": 7, "temperature": 0.5, "standardize": True, "normalize": "topk"}
    assert TrainConfig(loss="alm", alm_temperature=9.0).validate().loss_kwargs() == {"temperature": 9.0, "distance": "kl"}
