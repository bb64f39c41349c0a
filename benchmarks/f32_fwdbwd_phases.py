"""Where a float32 forward+backward call's time goes on the split-AMX route: wall and CPU time
per phase (``bf16_fwdbwd_phases.py``'s timers — wall per phase and every thread's CPU time from
``/proc/self/task/*/schedstat``, so ``busy = CPU / wall`` says how many cores a phase kept busy
— around float32's steps instead of bfloat16's).

A torch call with ``requires_grad`` (as ``cpu_vs_sdpa_interleaved.py``'s fwd+bwd cases: the
tensors made once, outside the timed call) or the NumPy API (``dotattn.attention`` +
``attention_backward``).  Phases: the forward's checks (``_forward_largest``), its split
operands (``_with_split_operands``, K's pieces), its kernel; the backward's one pass over its
operands (``_query_side_pass``: checks, dO's LSE fix, Δ, q's and dO's pieces), the zeroed
``dq_parts``/dK/dV (``np.zeros``), its kernel, dQ's sum (``run_chunks: dq_from_transposed``);
``rest`` is the call less the outer phases (torch's autograd engine, conversions, the front
end's glue, the gradients out).  Run with the route pinned as the A/Bs are
(``DOTATTN_F32_PRODUCTS=amx5``) and with glibc's malloc mode pinned
(``MALLOC_MMAP_THRESHOLD_=33554432``: docs/performance.md, "The slow mode is glibc's malloc").

    flock /tmp/bench.lock env MALLOC_MMAP_THRESHOLD_=33554432 PYTHONPATH=src .venv/bin/python \
        benchmarks/f32_fwdbwd_phases.py [--H 4 --D 128] [--rounds 9] [--numpy] [--causal] [--forward]

It is ``bf16_fwdbwd_phases.py`` with ``--dtype float32`` as its default (one script, two entries).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bf16_fwdbwd_phases import main  # noqa: E402

if __name__ == "__main__":
    main(dtype="float32")
