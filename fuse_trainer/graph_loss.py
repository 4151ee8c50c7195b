"""InfiGFusion's graph-on-logits distillation (GLD): one loss per sequence, from the cached top-k of its positions.

Wang et al. 2025, "InfiGFusion: Graph-on-Logits Distillation via Efficient Gromov-Wasserstein for Model Fusion"
(arXiv 2505.13893). Per sequence, the top-k output activations of every position are stacked into a matrix Z whose
columns are vocabulary ids (zero where an id is not in that position's top-k); the co-activation graph Z^T Z, summed
over positions, has the ids as nodes and their joint activation as edge weights. The student's graph is aligned with
the teacher's by a Gromov-Wasserstein (GW) distance, which the paper approximates in closed form by sorting, in
O(n log n) for n nodes instead of GW's O(n^4).

The graph construction above is the paper's. The closed form below is ours, a sorted comparison of node strengths
with its GW bound proved here; the paper's own expression may differ in normalisation or power. For one sequence
with the T positions the term reads (response positions the gates let in), given the teacher's top-k ids mapped
into the pivot's vocabulary:

    nodes     the n pivot ids in the union of the positions' top-k sets (empty slots, id -1, are no node)
    X, Y      (T, n)  X[t, i] = teacher probability of node i at position t if i is in t's top-k, else 0;
                      Y[t, i] = the student's (pivot's) probability of node i at t, on the same support
    A, B      (n, n)  A = X^T X / T,  B = Y^T Y / T       (mean co-activation over the positions)
    d, e      (n,)    node strengths d_i = sum_j A_ij,  e_i = sum_j B_ij
    loss      sum_{m <= n} | d_(m) - e_(m) |              (d_(m), e_(m): the m-th smallest strength of each graph)

The strengths need no (n, n) graph: d_i = (1/T) sum_t X[t, i] * (sum_j X[t, j]), a sum over the (T, k) values. The
sorted comparison is the 1-D optimal transport (W1) between the two graphs' strength distributions, which is a
lower bound of GW: with uniform node weights 1/n and row means s = d / n, for every coupling pi of the nodes
    s_A(i) - s_B(j) = sum_kl (A_ik - B_jl) pi_kl,  so
    sum_ij |s_A(i) - s_B(j)| pi_ij <= sum_ijkl |A_ik - B_jl| pi_ij pi_kl;
the left side is at least W1(s_A, s_B), the right side's minimum over pi is GW1(A, B), and 1-D W1 between two
uniform n-point measures is the mean absolute difference of their sorted values. Hence
    loss = n^2 * W1(s_A, s_B) <= n^2 * GW1(A, B).
The L1 form matches the sorted L1 of InfiFusion's ULD (losses.uld_loss).

Choices of ours, where the paper's text leaves room (documented here, checked by tests/test_graph_loss.py):
- Activations are probabilities (exp(logit - logsumexp), exact for the teacher from its cached logsumexp), not raw
  logits: a raw logit carries a per-position offset that the softmax ignores and that differs between models.
- The student's graph is read at the teacher's (pivot-mapped) ids, so both graphs have the same nodes. GW itself
  needs no node correspondence (the paper compares graphs over different vocabularies); the sorted strengths do not
  use it either.
"""

from __future__ import annotations

import torch


def sorted_within(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """(M,) values, (M,) int64 group ids sorted ascending -> the values sorted ascending inside each group.

    Group g's values land in the slots group g holds, so the result lines up with `group` itself."""
    by_value = torch.argsort(values, stable=True)  # (M,)
    by_group = torch.argsort(group[by_value], stable=True)  # (M,) groups back in order, values sorted inside each
    return values[by_value[by_group]]


def graph_loss(
    src_values: torch.Tensor,
    piv_values: torch.Tensor,
    ids: torch.Tensor,
    record: torch.Tensor,
    num_records: int,
) -> torch.Tensor:
    """GLD per sequence: the sorted L1 distance between the node strengths of the two co-activation graphs.

    Args:
        src_values: (N, K) teacher activations at the candidate ids (probabilities), no grad.
        piv_values: (N, K) student activations at the same ids, with grad.
        ids: (N, K) int64 node ids (pivot vocabulary), -1 = empty slot; no id twice in one row.
        record: (N,) int64 sequence of each position, in [0, num_records).
        num_records: R, the number of sequences.

    Returns:
        (R,) loss per sequence (module docstring), in float32 or float64 (gradcheck); 0 for a sequence with no node.
    """
    dtype = torch.promote_types(piv_values.dtype, torch.float32)
    keep = ids >= 0  # (N, K)
    record = record.long()
    x = torch.where(keep, src_values.to(dtype), 0.0)  # (N, K)
    y = torch.where(keep, piv_values.to(dtype), 0.0)  # (N, K)
    positions = torch.bincount(record, minlength=num_records).clamp_min(1).to(dtype)  # (R,) T per sequence
    span = int(ids.max()) + 1 if bool(keep.any()) else 1
    keys = (record.unsqueeze(-1) * span + ids)[keep]  # (E,) one per kept (position, slot): sequence and id
    nodes, node_of = torch.unique(keys, return_inverse=True)  # (M,) every sequence's nodes, by sequence; (E,)
    node_record = nodes // span  # (M,) ascending

    def strengths(z: torch.Tensor) -> torch.Tensor:
        """(N, K) activations -> (M,) node strengths: sum over positions of z_ti * sum_j z_tj, over T."""
        per_slot = (z * z.sum(dim=-1, keepdim=True))[keep]  # (E,)
        return z.new_zeros(nodes.shape[0]).index_add(0, node_of, per_slot) / positions[node_record]

    gap = sorted_within(strengths(x), node_record) - sorted_within(strengths(y), node_record)  # (M,)
    return gap.new_zeros(num_records).index_add(0, node_record, gap.abs())
