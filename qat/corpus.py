"""The shipped corpus: real English text that every CPython install carries.

``pydoc_data.topics`` holds the Python Language Reference's topics (about 465k characters, 110k
SmolLM2 tokens) as written by people, not generated. It is the offline default for training and
held-out evaluation; any other text, JSON or Parquet file or hub dataset goes through the data
module instead. Topics are joined in sorted key order so blocks are the same on every machine.
"""

from __future__ import annotations

import torch


def shipped_text() -> str:
    """The concatenated documentation topics of the running CPython, in sorted key order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def token_blocks(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """Tokenize ``text`` without special tokens and cut it into ``(n_blocks, seq_len)`` blocks (the tail dropped).

    Raises:
        ValueError: the text holds fewer than ``seq_len`` tokens.
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one block of seq_len={seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
