"""The InfiFusion-sized run worked out from measured figures and FLOP counts (docs/scale.md).

    python -m benchmarks.scale_estimate [--tokens 520e6] [--seq 4096] [--mfu 0.4] [--epochs 1]

Inputs, each an option: the corpus size in tokens; the H200's measured cache-build scoring rate for Qwen2.5-0.5B
(benchmarks/README.md: 113,842 tokens/s, bf16, position chunk 2,048), converted to achieved FLOP/s by the same
FLOP count as the big models; the measured bytes per token of a k=10 cache (source-native and pivot-aligned
layers); the measured fusion-step / SFT-step ratio; an assumed model FLOP utilisation for 14-24B models. The
architectures are the published configs of the paper's models. Prints the tables of docs/scale.md and one JSON line.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import click

PEAK_BF16 = 989e12  # dense bf16 FLOP/s of an H100/H800/H200 SXM (the same tensor cores)


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer with grouped-query attention and a gated MLP (Llama, Qwen2, Mistral, Phi-3)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False

    @property
    def layer_params(self) -> int:
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o and k, v
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden  # + gate, up, down + two norms

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        embeddings = 0 if self.tied else self.vocab * self.hidden
        return self.layers * self.layer_params + self.head_params + embeddings + self.hidden

    def forward_flops(self, seq: int) -> float:
        """FLOPs per token of a forward pass over sequences of `seq` tokens: 2 per weight of the trunk and the
        output layer, plus causal attention (scores and weighted sum over seq/2 earlier tokens on average)."""
        matmuls = 2 * (self.layers * self.layer_params + self.head_params)
        attention = 4 * self.layers * (seq / 2) * self.heads * self.head_dim
        return matmuls + attention

    def layer_activation_bytes(self) -> int:
        """bf16 bytes per token one layer saves for its backward (norm in/out twice, q, k, v, attention output,
        o_proj, residual, gate, up, activation, product)."""
        attention = self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return 2 * (6 * self.hidden + attention + 4 * self.intermediate)


PIVOT = Shape("Phi-4", 5120, 40, 40, 10, 128, 17920, 100352)
SOURCES = (
    Shape("Qwen2.5-14B-Instruct", 5120, 48, 40, 8, 128, 13824, 152064),
    Shape("Qwen2.5-Coder-14B-Instruct", 5120, 48, 40, 8, 128, 13824, 152064),
    Shape("Mistral-Small-24B-Instruct", 5120, 40, 32, 8, 128, 32768, 131072),
)
MEASURED = Shape("Qwen2.5-Coder-0.5B", 896, 24, 14, 2, 64, 4864, 151936, tied=True)


def fsdp_bytes_per_gpu(shape: Shape, world: int, tokens: int, recompute: bool) -> dict[str, float]:
    """Peak bytes on one GPU of FSDP2 (fp32 sharded parameters, fp32 gradients, AdamW's two fp32 moments; bf16
    compute parameters) for a micro-batch of `tokens` tokens per GPU, with or without activation checkpointing.

    Sharded: 16 bytes per parameter / world. Unsharded while in use: the root group (embeddings, output layer)
    in bf16 for the whole forward and backward, and its fp32 gradient before the reduce-scatter; two layers in
    bf16 (the one computing and the one prefetched) and one layer's fp32 gradient. Activations: with
    checkpointing each layer's bf16 input plus one layer's saved tensors during its recompute, without it every
    layer's saved tensors; and the logits (bf16 out of the model, an fp32 copy and its fp32 gradient)."""
    root = shape.params - shape.layers * shape.layer_params
    saved = (shape.layers * 2 * shape.hidden + shape.layer_activation_bytes() if recompute
             else shape.layers * shape.layer_activation_bytes())
    return {
        "params_grads_adam": 16 * shape.params / world,
        "gathered_params": 2 * root + 2 * 2 * shape.layer_params,
        "unsharded_grads": 4 * root + 4 * shape.layer_params,
        "activations": tokens * saved,
        "logits": tokens * shape.vocab * (2 + 4 + 4),
    }


@click.command(help=__doc__)
@click.option("--tokens", default=520e6, show_default=True, help="Corpus tokens (InfiGFusion-14B's card: 520M at 4K).")
@click.option("--seq", default=4096, show_default=True, help="Tokens per sequence (attention FLOPs, micro-batch).")
@click.option("--measured-tokens-per-s", default=113842.0, show_default=True, help="H200 scoring rate of Qwen2.5-0.5B.")
@click.option("--measured-seq", default=229, show_default=True, help="Mean tokens per record of that measurement.")
@click.option("--command-tokens-per-s", default=8200.0, show_default=True, help="H200 cache-build command rate of Qwen2.5-0.5B on 190k tokens (tokenizing, writing and first calls of each batch shape included).")
@click.option("--mfu", default=0.4, show_default=True, help="Assumed FLOP utilisation of 14-24B models on the GPU.")
@click.option("--source-bytes", default=49.4, show_default=True, help="Measured B/token, source-native layer, k=10.")
@click.option("--aligned-bytes", default=63.5, show_default=True, help="Measured B/token, pivot-aligned layer, k=10.")
@click.option("--fusion-over-sft", default=1.12, show_default=True, help="Measured fusion step / SFT step (H200, 135M pivot, ULD).")
@click.option("--vocab-passes", default=10, show_default=True, help="Extra fp32 passes over the pivot's logits per position for the fusion terms.")
@click.option("--bandwidth", default=3.35e12, show_default=True, help="GPU memory bandwidth, bytes/s (H800).")
def main(tokens, seq, measured_tokens_per_s, measured_seq, command_tokens_per_s, mfu, source_bytes, aligned_bytes, fusion_over_sft,
         vocab_passes, bandwidth):
    achieved = measured_tokens_per_s * MEASURED.forward_flops(measured_seq)  # FLOP/s the measured build reached
    assumed = mfu * PEAK_BF16
    print(f"measured scoring: {MEASURED.name} {MEASURED.forward_flops(measured_seq) / 1e9:.2f} GFLOP/token x "
          f"{measured_tokens_per_s:,.0f} tokens/s = {achieved / 1e12:.0f} TFLOP/s ({achieved / PEAK_BF16:.1%} of peak)")
    overhead_h = tokens / command_tokens_per_s / 3600  # at most: all of the small command's time, on top
    print(f"\n{'source':28s} {'params':>7s} {'GFLOP/tok':>9s} {f'GPU-h at {mfu:.0%} MFU':>17s} {'at measured rate':>16s} "
          f"{'+ command overhead':>18s} {'cache GB':>9s}")
    build = []
    for shape in SOURCES:
        flops = tokens * shape.forward_flops(seq)
        row = {"model": shape.name, "params_b": shape.params / 1e9, "gflop_per_token": shape.forward_flops(seq) / 1e9,
               "gpu_h_at_mfu": flops / assumed / 3600, "gpu_h_measured_rate": flops / achieved / 3600,
               "gpu_h_with_overhead": flops / achieved / 3600 + overhead_h,
               "cache_gb": tokens * (source_bytes + aligned_bytes) / 1e9}
        build.append(row)
        print(f"{row['model']:28s} {row['params_b']:6.1f}B {row['gflop_per_token']:9.1f} {row['gpu_h_at_mfu']:17.1f} "
              f"{row['gpu_h_measured_rate']:16.1f} {row['gpu_h_with_overhead']:18.1f} {row['cache_gb']:9.1f}")
    cache_h = sum(r["gpu_h_at_mfu"] for r in build)
    cache_h_slow = sum(r["gpu_h_with_overhead"] for r in build)
    print(f"{'all three':28s} {'':7s} {'':9s} {cache_h:17.1f} {sum(r['gpu_h_measured_rate'] for r in build):16.1f} "
          f"{cache_h_slow:18.1f} {sum(r['cache_gb'] for r in build):9.1f}")

    step_flops = 4 * PIVOT.forward_flops(seq)  # forward, backward (2x), recomputed forward (activation checkpointing)
    sft_s_per_token = step_flops / assumed
    fusion_s_per_token = vocab_passes * PIVOT.vocab * 4 / bandwidth  # memory-bound passes over (V,) fp32 rows
    fusion_ratio = 1 + fusion_s_per_token / sft_s_per_token
    sft_h = tokens * sft_s_per_token / 3600
    source_fwd = sum(s.forward_flops(seq) for s in SOURCES)
    print(f"\npivot {PIVOT.name}: {PIVOT.params / 1e9:.2f}B parameters, {step_flops / 1e9:.0f} GFLOP per trained token "
          f"with activation checkpointing; the sources' forwards {source_fwd / 1e9:.0f} GFLOP per token")
    print(f"fusion step / SFT step at 14B: {fusion_ratio:.3f} ({vocab_passes} fp32 passes over a {PIVOT.vocab:,} "
          f"vocabulary per position); measured at 135M: {fusion_over_sft}")
    print(f"one epoch of SFT at {mfu:.0%} MFU: {sft_h:.1f} GPU-h; fusion {sft_h * fusion_ratio:.1f} "
          f"(at most {sft_h * fusion_over_sft:.1f})")
    print(f"\n{'runs x epochs':>13s} {'cached: build + training':>25s} {'(slow build)':>13s} {'online distillation':>20s} "
          f"{'online / cached':>16s}")
    totals = []
    for runs, epochs in ((1, 1), (1, 3), (8, 1), (8, 3)):
        cached = cache_h + runs * epochs * sft_h * fusion_ratio
        slow = cache_h_slow + runs * epochs * sft_h * fusion_ratio
        online = runs * epochs * tokens * (step_flops + source_fwd) / assumed / 3600
        totals.append({"runs": runs, "epochs": epochs, "cached_gpu_h": cached, "cached_slow_build_gpu_h": slow,
                       "online_gpu_h": online})
        print(f"{f'{runs} x {epochs}':>13s} {cached:25.1f} {slow:13.1f} {online:20.1f} {online / cached:16.2f}")
    print(f"\nFSDP2, {PIVOT.name}, {seq} tokens per GPU per micro-batch (GB per GPU):")
    memory = {}
    for recompute in (True, False):
        for world in (1, 8, 64):
            parts = fsdp_bytes_per_gpu(PIVOT, world, seq, recompute)
            memory[f"{world}{'-ac' if recompute else ''}"] = {k: v / 1e9 for k, v in parts.items()}
            print(f"  {world:3d} GPUs, checkpointing {'on ' if recompute else 'off'}: "
                  + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in parts.items()) + f"; total {sum(parts.values()) / 1e9:.1f}")
    print(json.dumps({"tokens": tokens, "seq": seq, "mfu": mfu, "achieved_tflops": achieved / 1e12, "build": build,
                      "sft_gpu_h_per_epoch": sft_h, "fusion_over_sft": fusion_ratio, "totals": totals,
                      "pivot": asdict(PIVOT), "fsdp_gb_per_gpu": memory}))


if __name__ == "__main__":
    main()
