"""Tiny random Hugging Face causal LMs over tokenizers built offline, for fast tests.

    from tests.tiny import make_tiny_model
    folder = make_tiny_model(tmp_path / "src", arch="gemma3", seed=1)
    model = AutoModelForCausalLM.from_pretrained(folder); tokenizer = AutoTokenizer.from_pretrained(folder)

Each call trains a tokenizer with the `tokenizers` library on TEXT (no hub), builds a 2-layer, hidden-32
random model of the chosen architecture over it and saves both with `save_pretrained`. Deterministic: the
same arguments give the same tokenizer and the same weights. Under 2 s per model on one CPU core.

Architectures (defaults chosen so that tests cover the real sources' conventions):
- "llama":  byte-level BPE (GPT-2 style, like SmolLM2), no BOS added, tied embeddings.
- "qwen2":  byte-level BPE, no BOS added, UNTIED lm_head, attention biases (like Qwen2.5).
- "gemma3": SentencePiece-style BPE (Metaspace `▁`, byte fallback `<0xNN>`, like Gemma), `<bos>` added by the
            tokenizer, tied embeddings, one sliding-window (width 8) and one full-attention layer; pass
            `final_logit_softcapping=...` to exercise logit softcapping.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

TEXT = """\
def fibonacci(n):
    \"\"\"Return the n-th Fibonacci number.\"\"\"
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date.
The quick brown fox jumps over the lazy dog. Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich.
Prices rose 3.5% in 2024; the café's crème brûlée cost €7.
User: What is 12 * 7?
Assistant: 12 * 7 = 84.
"""

BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
METASPACE_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def byte_level_tokenizer(vocab: int = 384) -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE (Ġ for space), trained on TEXT; BOS/EOS `<|endoftext|>`, nothing added."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=BYTE_LEVEL_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token=None)


def metaspace_tokenizer(vocab: int = 320) -> PreTrainedTokenizerFast:
    """A SentencePiece-style BPE: `▁` for space, byte fallback to `<0xNN>` vocab entries, `<bos>` prepended."""
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=METASPACE_SPECIALS, show_progress=False)
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    trained.train_from_iterator([TEXT], trainer=trainer)
    vocab_map = trained.get_vocab()
    for byte in range(256):  # real byte-fallback entries are ordinary vocabulary, not added tokens
        vocab_map.setdefault(f"<0x{byte:02X}>", len(vocab_map))
    merges = [tuple(merge.split(" ", 1)) if isinstance(merge, str) else tuple(merge)
              for merge in json.loads(trained.to_str())["model"]["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab_map, merges=merges, unk_token="<unk>", byte_fallback=True,
                               fuse_unk=True))
    tok.add_special_tokens(METASPACE_SPECIALS)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    bos_id = vocab_map["<bos>"]
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", add_bos_token=True)


ARCH_TOKENIZER = {"llama": byte_level_tokenizer, "qwen2": byte_level_tokenizer, "gemma3": metaspace_tokenizer}


def tiny_config(arch: str, vocab_rows: int, tokenizer: PreTrainedTokenizerFast, **overrides):
    """A 2-layer, hidden-32 config of `arch` over `vocab_rows` embedding rows; `overrides` set any field."""
    common = dict(vocab_size=vocab_rows, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    if arch == "llama":
        return LlamaConfig(**{**common, "tie_word_embeddings": True, **overrides})
    if arch == "qwen2":
        return Qwen2Config(**{**common, "tie_word_embeddings": False, **overrides})
    if arch == "gemma3":
        gemma = dict(head_dim=8, query_pre_attn_scalar=8, sliding_window=8, tie_word_embeddings=True,
                     layer_types=["sliding_attention", "full_attention"])
        return Gemma3TextConfig(**{**common, **gemma, **overrides})
    raise ValueError(f"unknown tiny arch {arch!r}; use one of {sorted(ARCH_TOKENIZER)}")


def make_tiny_model(path: str | Path, arch: str = "llama", vocab: int | None = None, seed: int = 0,
                    extra_vocab_rows: int = 0, **config_overrides) -> Path:
    """Write a tiny random causal LM + its tokenizer to `path` (created) and return the folder.

    vocab: the tokenizer's BPE vocabulary target (defaults per tokenizer kind; the metaspace tokenizer adds 256
        byte tokens on top). extra_vocab_rows: padding rows beyond the tokenizer, as real models have
        (Qwen2.5: 151,936 rows for 151,665 tokens). seed: the weights' random seed.
    config_overrides: any config field, e.g. final_logit_softcapping=3.0 or tie_word_embeddings=False.
    """
    if arch not in ARCH_TOKENIZER:
        raise ValueError(f"unknown tiny arch {arch!r}; use one of {sorted(ARCH_TOKENIZER)}")
    tokenizer = ARCH_TOKENIZER[arch]() if vocab is None else ARCH_TOKENIZER[arch](vocab)
    config = tiny_config(arch, len(tokenizer) + extra_vocab_rows, tokenizer, **config_overrides)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)
    folder = Path(path)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_gguf(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random llama model with a byte-level BPE tokenizer as one float32 GGUF file at `path`.

    Loadable by `transformers` (`from_pretrained(folder, gguf_file=name)`), for tests of GGUF resolution and
    conversion. The weights are random (seeded), so only self-consistency can be checked, not quality.
    """
    import numpy as np
    from gguf import GGUFWriter, TokenType

    tokenizer = byte_level_tokenizer()
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(backend["model"]["vocab"].items(), key=lambda item: item[1])
    specials = set(BYTE_LEVEL_SPECIALS)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in backend["model"]["merges"]]
    hidden, ffn, layers, heads, kv_heads = 32, 64, 2, 4, 2
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.2).astype(np.float32)

    writer = GGUFWriter(str(path), "llama")
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(vocab))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([TokenType.CONTROL if token in specials else TokenType.NORMAL for token, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_add_bos_token(False)
    writer.add_tensor("token_embd.weight", weight(len(vocab), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    head_dim = hidden // heads
    for block in range(layers):
        prefix = f"blk.{block}."
        writer.add_tensor(prefix + "attn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(prefix + "attn_q.weight", weight(hidden, hidden))
        writer.add_tensor(prefix + "attn_k.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(prefix + "attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(prefix + "attn_output.weight", weight(hidden, hidden))
        writer.add_tensor(prefix + "ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        writer.add_tensor(prefix + "ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(prefix + "ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(prefix + "ffn_down.weight", weight(hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
