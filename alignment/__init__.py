"""Cross-tokenizer alignment: tokenizers in, numpy index arrays out (pure; imports nothing else of ours).

surface   token_surface / surface_fingerprint / tokenizer_fingerprint: every token as its exact bytes.
positions token_byte_ends / align_positions / coverage / align_positions_dtw: which positions share a context.
vocab     build_vocab_map / VocabMap: source id -> pivot id, by a named strategy.
project   project_topk / chunk_logprobs: source top-k on pivot ids; source log-likelihood of shared chunks.
"""

from alignment.positions import (
    POSITION_STRATEGIES,
    ByteAccountingError,
    align_pieces,
    align_positions,
    align_positions_dtw,
    coverage,
    token_byte_ends,
)
from alignment.project import chunk_logprobs, project_topk
from alignment.surface import (
    BYTE_LEVEL,
    SENTENCEPIECE,
    TokenSurface,
    UnknownTokenizerConvention,
    surface_fingerprint,
    token_surface,
    tokenizer_fingerprint,
)
from alignment.vocab import FORMAT_VERSION, VOCAB_STRATEGIES, VocabMap, VocabMapError, build_vocab_map

__all__ = [
    "BYTE_LEVEL",
    "FORMAT_VERSION",
    "POSITION_STRATEGIES",
    "SENTENCEPIECE",
    "VOCAB_STRATEGIES",
    "ByteAccountingError",
    "TokenSurface",
    "UnknownTokenizerConvention",
    "VocabMap",
    "VocabMapError",
    "align_pieces",
    "align_positions",
    "align_positions_dtw",
    "build_vocab_map",
    "chunk_logprobs",
    "coverage",
    "project_topk",
    "surface_fingerprint",
    "token_byte_ends",
    "token_surface",
    "tokenizer_fingerprint",
]
