"""The models' ``compute=`` argument, shared by :class:`~dotattn.models.MiniLM` and
:class:`~dotattn.models.SmolLM`: where their projections run (attention is dotattn's either way)."""

from __future__ import annotations

from ..errors import AttentionValueError


def choose_compute(compute: str | None) -> str:
    """``"torch"`` or ``"numpy"`` as asked; None = torch where it is installed, else NumPy."""
    if compute is None:
        import importlib.util

        compute = "torch" if importlib.util.find_spec("torch") is not None else "numpy"
    if compute not in ("torch", "numpy"):
        raise AttentionValueError(f"compute must be None, 'torch' or 'numpy', got {compute!r}")
    return compute
