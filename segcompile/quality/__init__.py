"""Quality of a model under segmented execution, against full attention: perplexity on long real
text by distance band (``measure_perplexity``), passkey retrieval by length and depth
(``measure_passkey``), on texts every machine has (``texts``). ``segcompile eval`` runs them
from the command line."""

from .passkey import (
    PasskeyPrompt,
    PasskeyResult,
    PasskeyTrial,
    build_prompt,
    measure_passkey,
    passkey_prompts,
    score_trial,
)
from .perplexity import BANDS, PerplexityResult, band_of, band_token_counts, measure_perplexity, token_nll
from .scoring import EvalError, greedy_tokens, is_segmented, last_logits, position_logits
from .texts import ByteTokenizer, Document, TextSequence, documents, split_of, token_sequences

__all__ = [
    "BANDS",
    "ByteTokenizer",
    "Document",
    "EvalError",
    "PasskeyPrompt",
    "PasskeyResult",
    "PasskeyTrial",
    "PerplexityResult",
    "TextSequence",
    "band_of",
    "band_token_counts",
    "build_prompt",
    "documents",
    "greedy_tokens",
    "is_segmented",
    "last_logits",
    "measure_passkey",
    "measure_perplexity",
    "passkey_prompts",
    "position_logits",
    "score_trial",
    "split_of",
    "token_nll",
    "token_sequences",
]
