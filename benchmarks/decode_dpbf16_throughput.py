"""Throughput of ``vdpbf16ps`` (AVX512-BF16) against float32 FMAs on this CPU (issue 9 §2: the
bfloat16 decode scores on the dot-product instruction, measured and not kept; docs/decoding-log.md,
"bfloat16 scores on `vdpbf16ps`").

A Numba loop of 12 independent accumulator chains, each step one instruction per chain, ten
million steps: ``fma`` = ``llvm.fma.v16f32`` (16 multiply-adds), ``dp`` =
``llvm.x86.avx512bf16.dpbf16ps.512`` (32 bfloat16 products summed in pairs into 16 float32
lanes), ``mix`` = half and half, ``mix4`` = one chain in four ``dp``.  Prints ns per
instruction; a ``mix`` time that is the mean of the two pure ones means the two kinds share
the same execution ports (they do not overlap).  One thread, a few seconds; on a shared
machine run it under ``flock /tmp/bench.lock``:

    PYTHONPATH=src python benchmarks/decode_dpbf16_throughput.py
"""

from __future__ import annotations

import time

import llvmlite.binding as ll
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_V16F = ir.VectorType(ir.FloatType(), 16)


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no such type; only its name is needed)."""

    def _to_string(self):
        return "bfloat"


_V32BF = ir.VectorType(_BFloat(), 32)
CHAINS = 12
STEPS = 10_000_000


def _loop(kind: str):
    @intrinsic
    def loop(typingctx, n, out):
        def codegen(context, builder, signature, args):
            outd = context.make_array(signature.args[1])(context, builder, args[1]).data
            vptr = builder.bitcast(outd, _V16F.as_pointer())
            a16 = builder.load(vptr, align=4)
            pairs = builder.bitcast(a16, _V32BF)
            fma = builder.module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(_V16F, [_V16F] * 3))
            dp = builder.module.declare_intrinsic(
                "llvm.x86.avx512bf16.dpbf16ps.512", fnty=ir.FunctionType(_V16F, [_V16F, _V32BF, _V32BF]))
            accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16F, [0.0] * 16)) for _ in range(CHAINS)]
            with cgutils.for_range(builder, args[0]):
                for i, a in enumerate(accs):
                    use_dp = kind == "dp" or (kind == "mix" and i % 2 == 0) or (kind == "mix4" and i % 4 == 0)
                    if use_dp:
                        builder.store(builder.call(dp, [builder.load(a), pairs, pairs]), a)
                    else:
                        builder.store(builder.call(fma, [a16, a16, builder.load(a)]), a)
            total = builder.load(accs[0])
            for a in accs[1:]:
                total = builder.fadd(total, builder.load(a))
            builder.store(total, vptr, align=4)  # keeps the chains alive
            return context.get_dummy_value()

        return types.void(n, out), codegen

    @njit
    def run(n, out):
        loop(n, out)

    return run


def main() -> None:
    features = ll.get_host_cpu_features()
    if not features.get("avx512bf16", False):
        raise SystemExit("this CPU has no avx512_bf16")
    out = np.full(16, 1e-3, dtype=np.float32)
    kinds = ("fma", "dp", "mix", "mix4")
    runs = {k: _loop(k) for k in kinds}
    for k in kinds:
        runs[k](10, out)  # compile
    for _ in range(2):
        cells = []
        for k in kinds:
            t0 = time.perf_counter()
            runs[k](STEPS, out)
            cells.append(f"{k} {(time.perf_counter() - t0) / (STEPS * CHAINS) * 1e9:.3f}")
        print("ns per instruction:", "  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
