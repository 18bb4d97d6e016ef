"""Texts to token ids, the same way for serving and training: tokenizer loading, truncation length, clipping."""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

from transformers import AutoTokenizer

# Characters kept per text before tokenizing: far more than max_length tokens ever need, and it bounds
# the cost of a 1 MB text.
CHARS_PER_TOKEN_CAP = 24
# Model types whose position ids start after the padding index, so two positions are never usable.
_POSITION_OFFSET_TYPES = frozenset({"roberta", "xlm-roberta", "camembert"})
_FALLBACK_MAX_LENGTH = 512
_SURROGATE = re.compile("[\ud800-\udfff]")
_MIN_MAX_LENGTH = 8


def load_tokenizer(source: str, token: Optional[str] = None) -> Any:
    """The model's tokenizer; one without a pad token pads with its end-of-sequence (or unknown) token."""
    tokenizer = AutoTokenizer.from_pretrained(source, token=token)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def truncation_length(tokenizer: Any, config: Any, requested: int = 0) -> int:
    """Truncation length: ``requested`` (0 = no wish), capped by the model's position embeddings and the
    tokenizer's own limit; 512 when neither says anything."""
    limits = [requested] if requested else []
    positions = getattr(config, "max_position_embeddings", None)
    if positions:
        offset = 2 if getattr(config, "model_type", "") in _POSITION_OFFSET_TYPES else 0
        limits.append(positions - offset)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < 100_000:
        limits.append(tok_max)
    return max(_MIN_MAX_LENGTH, min(limits)) if limits else _FALLBACK_MAX_LENGTH


def clean(text: Any) -> str:
    """A text the tokenizer always takes: a string, valid UTF-8 (lone surrogates, which JSON can carry,
    become U+FFFD) and without NUL characters."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _SURROGATE.sub("\ufffd", text)
    return text.replace("\x00", " ")


def clip(texts: Sequence[str], length: int) -> list[str]:
    """Each text cleaned (see ``clean``) and cut to what ``length`` tokens can use (``CHARS_PER_TOKEN_CAP``
    characters per token)."""
    cap = length * CHARS_PER_TOKEN_CAP
    return [clean(t[:cap] if isinstance(t, str) else t) for t in texts]
