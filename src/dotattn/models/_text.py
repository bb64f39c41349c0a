"""Text arguments of the models (prompts, messages, sentences), checked before a tokenizer
sees them: the ``tokenizers`` library refuses text that is not Unicode with a TypeError that
names neither the argument nor the place."""

from __future__ import annotations

from ..errors import AttentionValueError


def check_text(name: str, text: str) -> str:
    """``text`` as given, refused where it holds a lone surrogate (U+D800–U+DFFF alone: not
    Unicode text, e.g. bytes decoded with ``errors='surrogateescape'``), which the tokenizer
    refused with "TypeError: TextInputSequence must be str" about a str."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AttentionValueError(
            f"{name} holds a lone surrogate {exc.object[exc.start]!r} at index {exc.start}, which is not "
            "Unicode text; decode the bytes with errors='replace' (or fix their encoding) first"
        ) from None
    return text
