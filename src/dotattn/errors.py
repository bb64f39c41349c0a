"""The library's exceptions: one base, subclassing the built-in type a caller would expect."""

from __future__ import annotations


class DotAttnError(Exception):
    """Base class of every error dotattn raises on purpose."""


class AttentionTypeError(DotAttnError, TypeError):
    """An argument has the wrong type or dtype."""


class AttentionValueError(DotAttnError, ValueError):
    """An argument has the right type but a wrong shape or value."""


class UnsupportedCallError(DotAttnError, ValueError):
    """No backend (or not the forced one) can take this call; the message lists why."""


class ImportOrderError(DotAttnError, RuntimeError):
    """Two libraries already loaded would abort the process if the call went ahead; the message says the fix."""


class AttentionMemoryError(DotAttnError, MemoryError):
    """A buffer dotattn allocates for the caller (a ``KVCache``'s) does not fit in memory; the
    message names the sizes and the arguments that set them."""
