"""The texts that ship with the machine: a training corpus and an out-of-domain one.

``shipped``: the Python Language Reference's topics as CPython 3.11 carries them in
``pydoc_data.topics`` (about 465k characters, 110k SmolLM2 tokens), written by people, not
generated, joined in sorted key order. It is the offline default for training and held-out
evaluation. The package ships that text (``qat/data/pydoc_topics.txt``, under the PSF licence of
Python's documentation) rather than reading the running interpreter's copy: each CPython release
rewrites some topics (3.12's give the FP model a held-out perplexity of 17.12 where 3.11's give
17.44), and a result should not depend on which Python measured it.

``licenses``: the free-software licences that every Debian and Ubuntu system carries in
``/usr/share/common-licenses`` (package ``base-files``): GPL-3, Apache-2.0, MPL-2.0, GFDL-1.3,
LGPL-2.1, CC0-1.0, Artistic and BSD, in that order (about 126k characters, 28k SmolLM2 tokens).
English prose written by people, in a register (legal) and on subjects (rights, copying,
liability) that the Python documentation does not have: a run trained on ``shipped`` never saw
any of it, so its perplexity there measures what the quantized model kept of the language, not
what it learned of the training corpus. Near-duplicates (GPL-1/2, LGPL-2/3, GFDL-1.2, MPL-1.1)
are left out so no passage counts twice.

Any other text, JSON or Parquet file or hub dataset goes through the data module instead.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qat.errors import UserError

COMMON_LICENSES = Path("/usr/share/common-licenses")
LICENSES = ("GPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "LGPL-2.1", "CC0-1.0", "Artistic", "BSD")


SHIPPED_FILE = Path(__file__).resolve().parent / "data" / "pydoc_topics.txt"


def shipped_text() -> str:
    """CPython 3.11's documentation topics, joined in sorted key order (the same on every Python)."""
    return SHIPPED_FILE.read_text(encoding="utf-8")


def licenses_text(root: str | Path = COMMON_LICENSES) -> str:
    """The licences of ``LICENSES`` from Debian's ``/usr/share/common-licenses``, joined in that order.

    Raises:
        UserError: ``root`` or one of the licences is missing (not a Debian-based system):
            the message names the fix (another local text file as the out-of-domain source).

    Example:
        >>> licenses_text().startswith("                    GNU GENERAL PUBLIC LICENSE")  # doctest: +SKIP
        True
    """
    root = Path(root)
    missing = [name for name in LICENSES if not (root / name).is_file()]
    if missing:
        raise UserError(
            f"the out-of-domain text 'licenses' reads {', '.join(missing)} from {root} (Debian's package base-files), "
            "absent on this system: pass a local .txt file as the source instead (qat-train eval.ood=PATH)"
        )
    return "\n\n".join((root / name).read_text(encoding="utf-8").strip("\n") for name in LICENSES)


TEXTS = {"shipped": shipped_text, "licenses": licenses_text}  # the named sources of qat.lit.data


def token_blocks(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    """Tokenize ``text`` without special tokens and cut it into ``(n_blocks, seq_len)`` blocks (the tail dropped).

    Raises:
        UserError: the text holds fewer than ``seq_len`` tokens.
    """
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise UserError(f"the text has {len(ids)} tokens, fewer than one block of seq_len={seq_len}: "
                        "use a longer text or a smaller seq_len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
