"""Compiled entries that run another kernel load that kernel's own entry first.

Numba compiles a jitted kernel called from another jitted function (the partners' entry
``_cpu_model_ops.chunks_caller`` running ``swiglu``) into the caller's object as a weak
(``linkonce_odr``) copy, and optimizes the caller's module again with that copy in it.  Under
``fastmath`` flags that allow reassociation, that second optimization may order the kernel's
arithmetic differently from the kernel's own entry: SwiGLU's copy inside ``chunks_caller``
differed from ``swiglu`` by one ulp in 985 of 6,240 outputs.  Which code a process runs
depended on its history.  The JIT links a caller loaded *after* the kernel's own entry to that
entry (a weak copy gives way to a definition already there), and a caller loaded *first* to its
own copy.  So SmolLM's prompt pass on the partner threads gave the bits of the pool only when
a pass on the pool had come first in the process (else logits up to 6.8e-5 apart; found by a
test order on 7 Dec 2026).

:func:`load_callee_first` fixes the order: whenever one of a caller's signatures is loaded or
compiled, the kernel's own entry for the matching signature is loaded first, so every path
(the kernel called from Python, from the partners' entries, from Numba's team) runs the same
machine code in every process.  ``tests/reliability/test_entry_order.py`` runs the callers first
in fresh processes and compares their bits with the kernels' own.
"""

from __future__ import annotations

from typing import Callable

from numba.core import sigutils


def load_callee_first(caller, callee_for: Callable[[tuple], tuple | None]) -> None:
    """Wrap ``caller.compile`` (a Numba dispatcher's: called once for each signature not loaded
    yet, by a call from Python, by the typing of a jitted caller, or by ``dotattn precompile``)
    so that ``callee.compile(callee_args)`` runs before it, where ``callee_for(args)`` gives
    ``(callee, callee_args)`` for the caller's argument types (None: nothing to load first)."""
    if getattr(caller, "_loads_callee_first", False):
        return
    compile_own = caller.compile

    def compile(sig):
        args, _ = sigutils.normalize_signature(sig)
        if tuple(args) not in caller.overloads:
            try:
                first = callee_for(tuple(args))
            except (AttributeError, IndexError, TypeError):
                first = None  # arguments of another form: the caller's own typing names the error
            if first is not None:
                callee, callee_args = first
                callee.compile(tuple(callee_args))
        return compile_own(sig)

    compile.__doc__ = compile_own.__doc__
    caller.compile = compile
    caller._loads_callee_first = True
