"""Kernel building blocks of the ``cpu`` backend that do not depend on user functions.

Split from :mod:`dotattn.kernels._cpu_kernels` so that a copy of those kernels compiled for a
user's ``score_mod``/``mask_mod`` reuses these from the disk cache instead of compiling them
again.  Score blocks are transposed, ``ST (BK, BQ)``: see the column loops below.
"""

from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, overload
from numba.np.arrayobj import populate_array

from . import _cpu_amx
from ._cpu_amx import _BFloat
from ._cpu_cache import install_locator
from ._cpu_isa import GEMM_SYMBOL, SGEMM_SYMBOL, THREADS_SYMBOL
from ._cpu_options import FULL, PARTIAL, SKIP
from ._cpu_simd import EXP2_TOP, EXP2_ZERO_BELOW, LANES, LOG2E, dot_tile_f64, exp2_max_tile16, exp2_tile16, ldexp_exp2
from .dropout import splitmix64 as _splitmix64_py

install_locator()  # before any @njit(cache=True) below: the kernels cache beside the package

_JIT_CACHE = True
LN2 = 0.6931471805599453  # ln(2)
# Base-2 shifts from this size on (scores of a million and more) take the exp passes' pre-rounded
# form (_exp2_shifted_f32), and the backward leaves their LSE's rounding alone (cpu.lse_rounding_fix)
HUGE_SHIFT = 1048576.0

_splitmix64 = njit(cache=_JIT_CACHE, inline="always")(_splitmix64_py)


@njit(cache=_JIT_CACHE, _nrt=False, inline="always")
def _lse_natural(m, row_sum):
    """``(m + log2 row_sum)·ln 2`` in float64, rounded once when stored: in float32 the sum
    alone rounds at ulp(m)/2 (≈ 1e-6 for the base-2 max ≈ 25 of logits ≈ 17), an error every
    P the backward rebuilds from the LSE carries."""
    return (np.float64(m) + math.log2(np.float64(row_sum))) * LN2


# =================================================================================
# GEMMs on tiles: float32 by the Fortran sgemm bound to SGEMM_SYMBOL (MKL's, or SciPy's
# OpenBLAS: see _cpu_isa), float64 by NumPy's dot (dgemm); bfloat16 (as uint16 bits) by
# MKL's bfloat16 GEMM with float32 accumulation
# =================================================================================

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112  # CBLAS enums
_i32, _i64, _f32 = types.int32, types.int64, types.float32
# c = alpha·op(a)·op(b) + beta·c; pointers as int64 (x86-64 passes both in the same registers)
_mkl_gemm_bf16 = types.ExternalFunction(
    GEMM_SYMBOL, types.void(_i32, _i32, _i32, _i32, _i32, _i32, _f32, _i64, _i32, _i64, _i32, _f32, _i64, _i32)
)
_mkl_threads_local = types.ExternalFunction(THREADS_SYMBOL, _i32(_i32))
# Fortran sgemm(transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc): every argument
# by address (MKL's sgemm_ and OpenBLAS's ignore the hidden string lengths); called by
# _sgemm_by_address below


@njit(cache=_JIT_CACHE)
def _np_matmul(a, b, out):
    """``out = a · b`` by BLAS gemm (``a``/``b`` C- or F-ordered views of contiguous blocks).

    A function of its own, compiled and cached here once per layout pair, so the kernels
    (and their copies for user functions) link it instead of compiling NumPy's dot again.
    """
    np.dot(a, b, out=out)


@njit(cache=_JIT_CACHE, inline="always")
def _blas_layout(x):
    """``(NO_TRANS or TRANS, leading dimension)`` of a 2-D view whose rows or columns are contiguous."""
    rows, cols = x.shape
    s0, s1 = x.strides[0] // x.itemsize, x.strides[1] // x.itemsize
    if s1 == 1 and (rows == 1 or s0 >= cols):
        return NO_TRANS, max(s0, cols, 1)
    return TRANS, max(s1, rows, 1)


@njit(cache=_JIT_CACHE)
def _gemm_bf16(a, b, c, beta):
    """``c = a · b + beta·c``: ``a``, ``b`` bfloat16 bits (uint16 views), ``c`` float32 with contiguous rows."""
    ta, lda = _blas_layout(a)
    tb, ldb = _blas_layout(b)
    M, K = a.shape
    N = b.shape[1]
    ldc = max(c.strides[0] // 4, N, 1)
    one = np.float32(1.0)
    _mkl_gemm_bf16(ROW_MAJOR, ta, tb, M, N, K, one, a.ctypes.data, lda, b.ctypes.data, ldb, np.float32(beta), c.ctypes.data, ldc)


@intrinsic
def _sgemm_by_address(typingctx, transb, transa, n, m, k, ldb, lda, ldc, beta, b_ptr, a_ptr, c_ptr):
    """The bound Fortran ``sgemm`` with ``alpha = 1``, its scalar arguments in stack slots.

    Fortran takes every argument by address; scratch arrays for them (``np.empty`` twice
    per GEMM) cost two allocations per tile product, and each allocation updates the
    runtime's process-wide atomic counters — a cache line both kernel threads write.
    """
    sig = types.void(*([types.int32] * 8), types.float32, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        slots = []
        for value in args[:9]:
            slot = cgutils.alloca_once(builder, value.type)
            builder.store(value, slot)
            slots.append(builder.ptrtoint(slot, i64))
        one = cgutils.alloca_once(builder, ir.FloatType())
        builder.store(ir.Constant(ir.FloatType(), 1.0), one)
        tb, ta, n_, m_, k_, ldb_, lda_, ldc_, beta_ = slots
        fnty = ir.FunctionType(ir.VoidType(), [i64] * 13)
        fn = cgutils.get_or_insert_function(builder.module, fnty, SGEMM_SYMBOL)
        builder.call(fn, [tb, ta, n_, m_, k_, builder.ptrtoint(one, i64), args[9], ldb_, args[10], lda_, beta_, args[11], ldc_])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=_JIT_CACHE)
def _gemm_f32(a, b, c, beta):
    """``c = a · b + beta·c`` (float32; ``c`` with contiguous rows) by the bound Fortran sgemm.

    Column-major BLAS computes ``cᵀ = bᵀ · aᵀ``: a row-major operand, read as it lies, is its
    own transpose in column-major, so ``b`` goes first and a C-ordered operand is ``'N'``.
    """
    ta, lda = _blas_layout(a)
    tb, ldb = _blas_layout(b)
    M, K = a.shape
    N = b.shape[1]
    # 'N' or 'T' as the low byte of an int32
    _sgemm_by_address(
        np.int32(78 if tb == NO_TRANS else 84),
        np.int32(78 if ta == NO_TRANS else 84),
        np.int32(N), np.int32(M), np.int32(K),
        np.int32(ldb), np.int32(lda), np.int32(max(c.strides[0] // 4, N, 1)),
        np.float32(beta), b.ctypes.data, a.ctypes.data, c.ctypes.data,
    )


def _gemm(a, b, c, beta):
    """``c = a · b + beta·c`` on tiles of the general kernels (``beta`` 0 or 1).

    float32 by the bound sgemm and bfloat16 bits (float32 ``c``) by MKL, both accumulating in
    place; float64 by NumPy's dot.
    """
    raise NotImplementedError("compiled only")


@overload(_gemm, jit_options={"cache": _JIT_CACHE})
def _gemm_overload(a, b, c, beta):
    if a.dtype == types.uint16:
        return lambda a, b, c, beta: _gemm_bf16(a, b, c, beta)
    if a.dtype == types.float32:

        def impl_f32(a, b, c, beta):
            _gemm_f32(a, b, c, beta)

        return impl_f32

    def impl(a, b, c, beta):  # (NumPy's dot takes contiguous operands only)
        if beta == 0.0:
            _np_matmul(np.ascontiguousarray(a), np.ascontiguousarray(b), c)
        else:
            _add_into(c, np.dot(np.ascontiguousarray(a), np.ascontiguousarray(b)))

    return impl


def _matmul(a, b, out):
    """``out = a · b`` on tiles (float32/float64 operands, or bfloat16 bits with a float32 ``out``)."""
    raise NotImplementedError("compiled only")


@overload(_matmul, jit_options={"cache": _JIT_CACHE})
def _matmul_overload(a, b, out):
    if a.dtype == types.uint16:
        return lambda a, b, out: _gemm_bf16(a, b, out, 0.0)
    return lambda a, b, out: _np_matmul(a, b, out)


def _as_operand(x, buf):
    """``x`` as a GEMM operand of ``buf``'s dtype: ``x`` itself, or ``x`` rounded to bfloat16 into ``buf``."""
    raise NotImplementedError("compiled only")


@overload(_as_operand, jit_options={"cache": _JIT_CACHE})
def _as_operand_overload(x, buf):
    if buf.dtype == x.dtype:
        return lambda x, buf: x

    def impl(x, buf):
        _round_to_bf16(x, buf)
        return buf

    return impl


@njit(cache=_JIT_CACHE, inline="always")
def _bf16_bits(u):
    """The bfloat16 nearest to the float32 with bits ``u`` (ties to even), as uint16 bits.

    A NaN stays a NaN, quiet, with its sign: rounding its bits would carry a payload held
    only in the low half into the exponent (0x7F800001 → +inf) or wrap past the top
    (0x7FFFFFFF → −0.0, 0xFFFFFFFF → +0.0).  (ml_dtypes and the AMX conversion do the same.)
    """
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.uint16((u >> np.uint32(16)) | np.uint32(0x0040))
    return np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


@njit(cache=_JIT_CACHE)
def _round_to_bf16(x, out):
    """``out`` = float32 ``x`` rounded to the nearest bfloat16 (ties to even), as uint16 bits."""
    bits = x.reshape(x.size).view(np.uint32)
    flat = out.reshape(out.size)
    for i in range(bits.size):
        flat[i] = _bf16_bits(bits[i])


def _gemm_threads_begin(like):
    """Pin MKL to the calling thread (our threads run the tiles); returns what to restore."""
    raise NotImplementedError("compiled only")


@overload(_gemm_threads_begin, jit_options={"cache": _JIT_CACHE})
def _gemm_threads_begin_overload(like):
    if like.dtype == types.uint16 or like.dtype == types.float32:
        return lambda like: _mkl_threads_local(1)
    return lambda like: 0


def _gemm_threads_end(like, previous):
    raise NotImplementedError("compiled only")


@overload(_gemm_threads_end, jit_options={"cache": _JIT_CACHE})
def _gemm_threads_end_overload(like, previous):
    if like.dtype == types.uint16 or like.dtype == types.float32:

        def impl(like, previous):
            _mkl_threads_local(previous)

        return impl
    return lambda like, previous: None


# =================================================================================
# task scheduling between the kernels' threads
# =================================================================================


@intrinsic
def _take_task(typingctx, counter):
    """The next task index: ``counter[0]`` before an atomic increment (a shared work queue).

    Threads that take tasks as they finish keep busy when a tile class costs more than
    another (causal) or when the OS runs one thread less than the other (a loaded machine):
    a fixed deal waits for its slowest chunk.
    """
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None
    sig = types.int64(counter)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, [context.get_constant(types.intp, 0)])
        return builder.atomic_rmw("add", ptr, context.get_constant(types.int64, 1), "monotonic")

    return sig, codegen


@njit(cache=_JIT_CACHE, inline="always")
def _snake_chunk(t, nchunks):
    """The chunk of task ``t`` when tasks are dealt back and forth (0, 1, …, n−1, n−1, …, 0, …).

    A fixed deal, so per-chunk partial sums (the backward's dQ) come out the same every run;
    back and forth so that tasks whose cost falls steadily with ``t`` (causal key tiles)
    spread evenly: round-robin gave one of two threads 40 tiles of work to the other's 32.
    """
    lap, pos = t // nchunks, t % nchunks
    return pos if lap % 2 == 0 else nchunks - 1 - pos


# =================================================================================
# exp2 on a block: polynomial on the fraction, exponent added as an integer
# =================================================================================


# A prefetch plan with nothing in it (the exp passes' ``plan``: _cpu_simd.exp2_max_tile16).
_NO_PREFETCH = np.zeros(4, dtype=np.int64)


@njit(cache=_JIT_CACHE, inline="always")
def exp2_fraction(f):
    """``2**f`` for float32 ``f ∈ [−½, ½]``: the degree-6 Taylor polynomial of ``e**(f·ln2)``
    (relative error ≤ 2.2e-7 measured), in Horner form.  Inlined into the decode and small-call
    kernels' exp loops, which add the integer part of the exponent to the result's exponent
    bits themselves (the tiled kernels' passes use :func:`exp2_unit` and ``vscalefps``)."""
    p = np.float32(1.5403530393381606e-4)
    p = p * f + np.float32(1.3333558146428443e-3)
    p = p * f + np.float32(9.618129107628477e-3)
    p = p * f + np.float32(5.550410866482158e-2)
    p = p * f + np.float32(0.2402265069591007)
    p = p * f + np.float32(0.6931471805599453)
    return p * f + np.float32(1.0)


def _exp2_shifted(ST, N, mul, sub):
    """``ST[c, r] = 2**(ST[c, r]·mul − sub[r])`` in place, for exponents ≤ 0.

    −inf and NaN give 0, and so does every ``x ≤ −125.5`` (results below 2**−125.5).  float32:
    ``x = n + f`` with ``n`` = ``x`` rounded to even, ``f ∈ [−½, ½]`` exact; ``2**f`` by a
    degree-6 polynomial fitted to the relative error (:func:`exp2_unit`: ≤ 7.9e-8 measured,
    0.94 ulp, over x ∈ (−125.5, 0]), times ``2**n`` (``vreduceps`` and ``vscalefps`` on
    AVX-512: :func:`_cpu_simd._exp2_unit_vector`; :func:`_exp2_one`, the same bits, for the
    tails).  The scale-and-shift rides in the same pass.  ``N`` (int32 scratch shaped
    like ``ST``) is no longer used by float32 and kept for the callers' signature.  float64
    uses ``math.exp2`` per element (accuracy over speed).  Compiled per dtype by the overload below.
    """
    raise NotImplementedError("compiled only")


@njit(cache=_JIT_CACHE, fastmath={"contract", "afn", "nsz"})
def _exp2_shifted_f32(ST, N, mul, sub):
    # Rows shifted by a huge maximum (|sub| ≥ 2**20: scores of a million and more): the
    # product s·mul is rounded to the compute dtype in a pass of its own first, as the
    # maximum in ``sub`` was, so the maximum's exponent is exactly 0.  Fused into
    # s·mul − sub (FMA, or a float64 product), the product's rounding error — up to
    # ulp(sub)/2 — scales the whole row by 2**±error: a row of logits ≈ 1e20 came back as
    # 0 with LSE −inf.  Ordinary rows never take this pass.
    # The exponent loops are a function of their own, called with a constant-per-call
    # multiplier: with the multiplier a value merged from both branches inside one loop
    # nest, LLVM's code for the common case ran 1.5–2× slower (1.2 against 0.55–0.8
    # ns/element, same load) and rounded differently.
    BK, BQ = ST.shape
    huge = False
    for r in range(BQ):
        huge |= not abs(sub[r]) < np.float32(HUGE_SHIFT)
    if huge:
        for c in range(BK):
            row = ST[c]
            for r in range(BQ):
                row[r] = row[r] * mul  # stored: rounded
        _exp2_core_f32(ST, N, mul * np.float32(0.0) + np.float32(1.0), sub)
    else:
        _exp2_core_f32(ST, N, mul, sub)


@njit(cache=_JIT_CACHE, fastmath={"contract", "afn", "nsz"})
def _exp2_core_f32(ST, N, mul, sub):
    # Row views (not ST[c, r]) keep the inner loop a unit-stride 1-D loop: LLVM vectorizes it
    # (0.27 ns/element) where the 2-D indexed form stays scalar (1.9 ns/element).  The
    # int32 scratch ``N`` is unused (kept for the callers' signature).
    # Whole 16-column strips go to the 16-lane loop of _cpu_simd (LLVM vectorizes this one
    # 8 lanes wide only), same operations, same bits; this loop takes the rest.
    BK, BQ = ST.shape
    r0 = 0
    if ST.strides[1] == 4:
        r0 = (BQ // LANES) * LANES
        exp2_tile16(ST, mul, sub, sub, BQ // LANES, False, _NO_PREFETCH)
    for c in range(BK):
        row = ST[c]
        for r in range(r0, BQ):
            row[r] = _exp2_one(row[r], mul, sub[r])


@njit(cache=_JIT_CACHE, inline="always")
def exp2_unit(f):
    """``2**f`` for float32 ``f ∈ [−½, ½]``: degree 6, fitted to the relative error (≤ 1.9e-9 in
    exact arithmetic; ≤ 7.9e-8, 0.94 ulp, in float32 Horner with FMAs), ``exp2_unit(0) = 1``.
    The coefficients are ``_cpu_simd.EXP2_UNIT_COEFFS``."""
    p = np.float32(0.00015345800784416497)
    p = p * f + np.float32(0.0013399932067841291)
    p = p * f + np.float32(0.009618489071726799)
    p = p * f + np.float32(0.05550328642129898)
    p = p * f + np.float32(0.24022646248340607)
    p = p * f + np.float32(0.6931471824645996)
    return p * f + np.float32(1.0)


@njit(cache=_JIT_CACHE, fastmath={"contract", "afn", "nsz"}, inline="always")
def _exp2_one(s, mul, sub):
    # The plain-loop twin of _cpu_simd._exp2_unit_vector (the same bits, +inf included):
    # f = x − roundeven(x) is exact, as vreduceps's; ldexp is what vscalefps does with n for every x kept (x > −125.5:
    # results ≥ 2**−125.5, never subnormal).  x is clamped at EXP2_TOP (129) first: every x from
    # 128.5 on overflows to +inf either way (+inf too) and NaN is not kept, so no result changes,
    # f stays finite and n in the int conversion's range.  LLVM vectorizes loops of it (roundeven, ldexp:
    # vrndscaleps, vscalefps on AVX-512; the exponent's bits elsewhere).
    x = s * mul - sub
    top = np.float32(EXP2_TOP)
    xc = x if x < top else top
    n = _roundeven(xc)
    p = exp2_unit(xc - n)
    return _ldexp(p, np.int32(n)) if x > np.float32(EXP2_ZERO_BELOW) else np.float32(0.0)


# The exp passes sum a tile's P over blocks of SUM_KEYS keys apart, then add each block's sum
# to the row's: added one by one into a sum that already holds the row's largest P (≈ 1),
# each small P rounds at ulp(1)/2 and 567 keys of P ≈ 1e-3 in one tile left the sum 3.7e-6
# low — every output of the row 3× the naive softmax's error (Lq 196, Lk 567, D 31, the
# maximum at key 18; CI, 1 Dec).  In blocks the same row's sum is 1.4e-7 off.
SUM_KEYS = 32


@njit(cache=_JIT_CACHE, inline="always")
def _plan_share(plan, share, i, n):
    """Block ``i`` of ``n`` of ``plan``'s two byte ranges (whole cache lines), so that the
    blocks of one exp pass prefetch the plan once between them, spread as before."""
    for j in (0, 2):
        lines = (plan[j + 1] + 63) // 64
        first, last = lines * i // n, lines * (i + 1) // n
        share[j] = plan[j] + first * 64
        share[j + 1] = (last - first) * 64


@njit(cache=_JIT_CACHE, fastmath={"contract", "afn", "nsz"})
def _exp2_sum_blocks_f32(ST, mul, sub, sums, tile_max, with_max, plan):
    """``ST = 2^(ST·mul − sub)`` and ``sums[r] += Σ_c P`` in blocks of SUM_KEYS keys (each
    block summed from 0, then added), with ``with_max`` also ``tile_max[r] = max(tile_max[r],
    max_c S)`` of the scores read (NaN sticky); ``plan``'s memory prefetched meanwhile, spread
    over the blocks.  Whole 16-column strips go to the 16-lane loops of ``_cpu_simd``."""
    BK, BQ = ST.shape
    r0 = (BQ // LANES) * LANES if ST.strides[1] == 4 else 0
    part = np.empty(BQ, dtype=np.float32)
    share = np.empty(4, dtype=np.int64)
    nb = (BK + SUM_KEYS - 1) // SUM_KEYS
    for i in range(nb):
        c0, c1 = i * SUM_KEYS, min(BK, (i + 1) * SUM_KEYS)
        part[:] = 0.0
        if r0 > 0:
            _plan_share(plan, share, i, nb)
            if with_max:
                exp2_max_tile16(ST[c0:c1], mul, sub, part, tile_max, BQ // LANES, share)
            else:
                exp2_tile16(ST[c0:c1], mul, sub, part, BQ // LANES, True, share)
        for c in range(c0, c1):
            row = ST[c]
            for r in range(r0, BQ):
                s = row[r]
                if with_max:
                    tile_max[r] = s if (s > tile_max[r] or s != s) else tile_max[r]
                p = _exp2_one(s, mul, sub[r])
                row[r] = p
                part[r] += p
        for r in range(BQ):
            sums[r] += part[r]


@njit(cache=_JIT_CACHE)
def _exp2_sum_core_f32(ST, mul, sub, row_sum, plan=_NO_PREFETCH):
    """``_exp2_core_f32`` and ``row_sum[r] += Σ_c ST[c, r]`` in one pass (:func:`_exp2_sum_blocks_f32`)."""
    _exp2_sum_blocks_f32(ST, mul, sub, row_sum, row_sum, False, plan)  # (no max: row_sum stands in, unread)


# Lazy rescaling (the forward, float32, no dropout).  The running shift ``m`` need not be
# the running maximum: ``row_sum = Σ 2^(s·c2 − m)`` and ``acc = Σ 2^(s·c2 − m)·v`` hold for
# any ``m``, and only overflow asks for ``m`` near the maximum.  So a tile is exponentiated
# against the shift it finds, its column maximum taken in the same pass, and the shift kept
# when that maximum exceeds it by at most LAZY_LOG2 (P ≤ 2^LAZY_LOG2: no overflow, no
# precision lost, floats being relative): one pass over the tile instead of two.  A row
# whose maximum grew more (or holds NaN/+inf) sends the tile back to the exact two-pass
# step (FlashAttention-4 rescales only past a threshold in the same way).
LAZY_LOG2 = 8.0
# The bfloat16 forward on AMX checks the tile's row sums instead (its pass then needs no max,
# one vector operation of ≈ 10 a score): every P ≤ Σ P ≤ LAZY_SUM, so P ≤ 2^16 — still far
# from float32's overflow (row_sum ≤ Lk · 2^16) — and a NaN/+inf score makes the sum NaN/+inf.
LAZY_SUM = 65536.0


@njit(cache=_JIT_CACHE)
def _exp2_sum_max_f32(ST, mul, sub, tile_sum, tile_max, plan=_NO_PREFETCH):
    """``ST = 2^(ST·mul − sub)`` with ``tile_sum[r] = Σ_c P`` (in blocks of SUM_KEYS keys) and
    ``tile_max[r] = max_c S`` (NaN sticky) in one pass; the byte ranges of ``plan`` prefetched
    meanwhile (``exp2_max_tile16``)."""
    tile_sum[:] = 0.0
    tile_max[:] = -np.inf
    _exp2_sum_blocks_f32(ST, mul, sub, tile_sum, tile_max, True, plan)


def _lazy_ok(m, Pb, enabled):
    """Whether the forward may try :func:`_lazy_softmax` on the next tile: float32 compute
    (``Pb`` the float32 operand or bfloat16 bits), ``enabled`` (no dropout), and every running
    shift finite and in the fast exponent's range (rows that have seen no key yet, or hold
    NaN, take the exact step)."""
    raise NotImplementedError("compiled only")


@overload(_lazy_ok, jit_options={"cache": _JIT_CACHE})
def _lazy_ok_overload(m, Pb, enabled):
    if m.dtype != types.float32 or Pb.dtype not in (types.float32, types.uint16):
        return lambda m, Pb, enabled: False

    def impl(m, Pb, enabled):
        ok = enabled
        for r in range(m.shape[0]):
            ok &= abs(m[r]) < np.float32(HUGE_SHIFT)
        return ok

    return impl


def _lazy_softmax(ST, c2, m, tile_max, tile_sum, row_sum, Pb, pairs, plan):
    """The forward's one-pass softmax step against the running shift ``m`` (see LAZY_LOG2;
    only after :func:`_lazy_ok`): True when done (P in ``ST`` — float32 — or rounded into the
    bfloat16 operand ``Pb``, in key pairs with ``pairs``; ``row_sum`` updated, ``m`` and the
    accumulator unchanged), False when the tile needs the exact step — float32 overwrote
    ``ST`` then, which must be recomputed (:func:`_lazy_spoils_scores`); nothing else changed."""
    raise NotImplementedError("compiled only")


def _lazy_spoils_scores(Pb):
    """Whether a failed :func:`_lazy_softmax` left ``ST`` overwritten (float32; the bfloat16 pass only reads it)."""
    raise NotImplementedError("compiled only")


@overload(_lazy_spoils_scores, jit_options={"cache": _JIT_CACHE})
def _lazy_spoils_scores_overload(Pb):
    spoils = Pb.dtype != types.uint16
    return lambda Pb: spoils


@overload(_lazy_softmax, jit_options={"cache": _JIT_CACHE})
def _lazy_softmax_overload(ST, c2, m, tile_max, tile_sum, row_sum, Pb, pairs, plan):
    if ST.dtype != types.float32:  # never called: _lazy_ok is False
        return lambda ST, c2, m, tile_max, tile_sum, row_sum, Pb, pairs, plan: False

    def impl(ST, c2, m, tile_max, tile_sum, row_sum, Pb, pairs, plan):
        _lazy_pass(ST, c2, m, tile_max, tile_sum, Pb, pairs, plan)
        ok = True
        if pairs:  # the AMX pass takes no max (LAZY_SUM)
            for r in range(m.shape[0]):
                ok &= tile_sum[r] <= np.float32(LAZY_SUM)  # False for NaN and +inf
        else:
            for r in range(m.shape[0]):
                ok &= tile_max[r] * c2 <= m[r] + np.float32(LAZY_LOG2)  # False for NaN and +inf
        if not ok:
            return False
        for r in range(m.shape[0]):
            row_sum[r] += tile_sum[r]
        return True

    return impl


def _lazy_pass(ST, c2, m, tile_max, tile_sum, Pb, pairs, plan):
    raise NotImplementedError("compiled only")


@overload(_lazy_pass, jit_options={"cache": _JIT_CACHE})
def _lazy_pass_overload(ST, c2, m, tile_max, tile_sum, Pb, pairs, plan):
    if Pb.dtype == types.uint16:  # (the plan on AMX only: the pass in key pairs)
        return lambda ST, c2, m, tile_max, tile_sum, Pb, pairs, plan: _exp2_sum_max_bf16(
            ST, Pb, c2, m, tile_sum, tile_max, pairs, plan
        )
    return lambda ST, c2, m, tile_max, tile_sum, Pb, pairs, plan: _exp2_sum_max_f32(ST, c2, m, tile_sum, tile_max, plan)


@njit(cache=_JIT_CACHE)
def _exp2_shifted_f64(ST, N, mul, sub):
    BK, BQ = ST.shape
    for c in range(BK):
        for r in range(BQ):
            ST[c, r] = math.exp2(ST[c, r] * mul - sub[r])


@overload(_exp2_shifted, jit_options={"cache": _JIT_CACHE})
def _exp2_shifted_overload(ST, N, mul, sub):
    if ST.dtype == types.float64:
        return lambda ST, N, mul, sub: _exp2_shifted_f64(ST, N, mul, sub)
    return lambda ST, N, mul, sub: _exp2_shifted_f32(ST, N, mul, sub)


def _exp2_shifted_sum(ST, N, mul, sub, row_sum, plan):
    """:func:`_exp2_shifted`, then ``row_sum[r] += Σ_c ST[c, r]``: one pass over the tile for
    float32, which prefetches ``plan``'s memory meanwhile (``_cpu_simd.exp2_max_tile16``)."""
    raise NotImplementedError("compiled only")


@njit(cache=_JIT_CACHE)
def _exp2_shifted_sum_f32(ST, N, mul, sub, row_sum, plan):
    BK, BQ = ST.shape
    huge = False
    for r in range(BQ):
        huge |= not abs(sub[r]) < np.float32(HUGE_SHIFT)
    if huge:  # the rare pre-rounded pass of _exp2_shifted_f32, then the plain sum
        _exp2_shifted_f32(ST, N, mul, sub)
        _col_sum_into(ST, row_sum)
    else:
        _exp2_sum_core_f32(ST, mul, sub, row_sum, plan)


@overload(_exp2_shifted_sum, jit_options={"cache": _JIT_CACHE})
def _exp2_shifted_sum_overload(ST, N, mul, sub, row_sum, plan):
    if ST.dtype == types.float32:
        return lambda ST, N, mul, sub, row_sum, plan: _exp2_shifted_sum_f32(ST, N, mul, sub, row_sum, plan)

    def impl(ST, N, mul, sub, row_sum, plan):
        _exp2_shifted_f64(ST, N, mul, sub)
        _col_sum_into(ST, row_sum)

    return impl


# =================================================================================
# bfloat16 path: the softmax steps fused into one pass that writes P (or dS) as the
# bfloat16 GEMM operand.  A tile of the bfloat16 forward spent 51 µs in four passes over
# its float32 scores (max 4.6, exp 35.7, row sum 4.7, rounding 5.7) against 39 µs in the
# two AMX GEMMs (benchmarks/cpu_profile.py, 256 × 256, D 64): see docs/performance.md.
# =================================================================================


@intrinsic
def _wide_vectors(typingctx):
    """Let LLVM vectorize the calling function with 512-bit registers.

    LLVM tunes this CPU (as every AVX-512 Intel core since Skylake-SP) for 256-bit vectors
    ("prefer-vector-width" 256), so Numba's loops run on ymm registers although zmm ones are
    there.  This function attribute, set on the function being compiled (it emits no
    code), lifts that for one function: the block exp ran 17.0 → 13.1 µs a 256 × 256 tile,
    same bits.  Used on the bfloat16 path's passes only.
    """

    def codegen(context, builder, signature, args):
        attrs = builder.function.attributes
        # llvmlite's attribute set only knows keyword attributes; LLVM reads string ones too
        set.add(attrs, '"prefer-vector-width"="512"')
        set.add(attrs, '"min-legal-vector-width"="512"')
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def _to_bf16(typingctx, x):
    """float32 → bfloat16 bits (uint16), round to nearest even: ``fptrunc float to bfloat``,
    one ``vcvtneps2bf16`` per 16 lanes where the CPU has avx512_bf16."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], _BFloat()), ir.IntType(16))

    return sig, codegen


@intrinsic
def _from_bf16(typingctx, bits):
    """bfloat16 bits (uint16) → the float32 of the same value (exact)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(wide, ir.FloatType())

    return sig, codegen


@njit(cache=_JIT_CACHE, inline="always")
def _exp2_bf16_grade(x):
    """``2**x`` for float32 ``x ≤ 0`` (0 below 2**−125: what float32's path flushes too),
    relative error ≤ 7.8e-5: far below bfloat16's 2**−9 rounding of P.

    ``x = n + f``, ``n`` = ``x`` rounded to even, ``2**f`` by a degree-3 polynomial fitted to
    the relative error on ``[−½, ½]``, then ``ldexp`` (one ``vscalefps``).  Against a degree-4 polynomial with the exponent
    added by hand, this and the unrounded row sum below ran the fused pass 15.3 → 12.6 µs a
    256 × 256 tile (same process, three rounds, load 2): docs/performance.md.
    """
    xc = max(x, np.float32(-125.0))
    n = _roundeven(xc)
    f = xc - n
    p = np.float32(0.05508868396282196)
    p = p * f + np.float32(0.24260404706001282)
    p = p * f + np.float32(0.6932762265205383)
    p = p * f + np.float32(0.9999289512634277)
    # Results below 2**−125 are 0 by a select, not by the scaling's underflow: an underflowing
    # (or subnormal) vscalefps takes a microcode assist on Intel cores — a causal tile's masked
    # (−inf) half ran the pass 12× slower (162 against 14 µs, 290 µs all masked).
    return _ldexp(p, np.int32(n)) if x > np.float32(-125.0) else np.float32(0.0)


@intrinsic
def _roundeven(typingctx, x):
    """float32 ``x`` rounded to the nearest integer, ties to even (``vrndscaleps``)."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.roundeven.f32")
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def _ldexp(typingctx, x, n):
    """``x · 2**n`` (float32, int32) for the exp passes' operands, ``x ∈ [½, 2)`` and ``n ≥ −125``
    (the callers select 0 below): ``llvm.ldexp`` — one ``vscalefps`` per 16 lanes — where the
    compile target has AVX-512, else the same bits from the exponent's bits (LLVM would call
    libm's ``ldexpf`` per element there; :func:`_cpu_simd.ldexp_exp2`)."""
    sig = types.float32(types.float32, types.int32)

    def codegen(context, builder, signature, args):
        return ldexp_exp2(builder, args[0], args[1], context)

    return sig, codegen


@njit(cache=_JIT_CACHE, fastmath={"contract", "afn", "nsz"})
def _exp2_sum_bf16(ST, Pb, mul, sub, row_sum):
    """``Pb[c, r] = bf16(2**(ST[c, r]·mul − sub[r]))`` and ``row_sum[r] += Σ_c 2**(…)``, one pass.

    The row sum adds P before its rounding, as FlashAttention does (adding the rounded P
    cost two more vector operations a score, ≈ 1.3 µs a tile).  ``ST`` is only read.
    """
    _wide_vectors()
    BK, BQ = ST.shape
    for c in range(BK):
        row = _row(ST, c)
        prow = _row(Pb, c)
        for r in range(BQ):
            p = _exp2_bf16_grade(row[r] * mul - sub[r])
            row_sum[r] += p
            prow[r] = _to_bf16(p)


@njit(cache=_JIT_CACHE, fastmath={"contract", "afn", "nsz"})
def _exp2_bf16(ST, Pb, mul, sub):
    """``Pb[c, r] = bf16(2**(ST[c, r]·mul − sub[r]))``, one pass (the backward's P̃; ``ST`` only read)."""
    _wide_vectors()
    BK, BQ = ST.shape
    for c in range(BK):
        row = ST[c]
        prow = Pb[c]
        for r in range(BQ):
            prow[r] = _to_bf16(_exp2_bf16_grade(row[r] * mul - sub[r]))


@njit(cache=_JIT_CACHE, fastmath={"contract", "afn", "nsz"})
def _ds_bf16(Pb, dPT, delta):
    """``Pb ← bf16(P̃ ∘ (dPT − delta))`` in place: dS from the rounded P̃ that dV used, rounded.

    P̃ instead of the float32 P costs at most one more bfloat16 rounding of each dS element
    (the naive baseline rounds both P and dP − Δ), and spares the float32 P's store and reload.
    """
    _wide_vectors()
    for c in range(Pb.shape[0]):
        prow = Pb[c]
        drow = dPT[c]
        for r in range(Pb.shape[1]):
            prow[r] = _to_bf16(_from_bf16(prow[r]) * (drow[r] - delta[r]))


@njit(cache=_JIT_CACHE)
def _bf16_key_pairs(Pb, Dp):
    """bfloat16 rows ``Pb (BK, BQ)`` (rows of keys) in key pairs: ``Dp[c/2, r] = Pb[c, r] |
    Pb[c+1, r] << 16`` (uint32; bits moved, nothing rounded) — dS's pairs for ``dQᵀ += Kᵀ·dS``
    where dS was computed in float32 first (dropout, softcap, score_mod, dbias).  BK even."""
    _wide_vectors()
    BK, BQ = Pb.shape
    for c in range(0, BK, 2):
        p0 = Pb[c]
        p1 = Pb[c + 1]
        out = _row(Dp, c // 2)
        for r in range(BQ):
            out[r] = np.uint32(p0[r]) | (np.uint32(p1[r]) << np.uint32(16))


@njit(cache=_JIT_CACHE, fastmath={"nsz", "contract"})
def _col_max_bf16(ST, out):
    """:func:`_col_max` on 512-bit vectors (the same bits: a max is exact), rows by :func:`_row`."""
    _wide_vectors()
    BK, BQ = ST.shape
    out[:] = _row(ST, 0)
    for c in range(1, BK):
        row = _row(ST, c)
        for r in range(BQ):
            v = row[r]
            out[r] = v if (v > out[r] or v != v) else out[r]


@njit(cache=_JIT_CACHE)
def _exp2_sum_bf16_pairs(ST, Pb, mul, sub, row_sum, plan=_NO_PREFETCH):
    """:func:`_exp2_sum_bf16` writing P in key pairs for the AMX product (``_cpu_amx.values``):
    as uint32, ``Pb[c//2, r] = bf16(P[c, r]) | bf16(P[c+1, r]) << 16``, by
    ``_cpu_amx.exp2_pairs`` (512-bit vectors written out; a NaN score gives a NaN sum).
    BK even, BQ a multiple of 32 (the AMX path's tiles).  ``plan``'s lines prefetched (the
    forward's exact step: the next K/V tiles, as the lazy step)."""
    _exp2_pairs_tile(ST, Pb, mul, sub, row_sum, row_sum, False, plan)


@njit(cache=_JIT_CACHE, inline="always")
def _exp2_pairs_tile(ST, Pb, mul, sub, tile_sum, tile_max, want_max, plan):
    """``_cpu_amx.exp2_pairs`` over the tile's 32-query column blocks; ``plan``'s lines (the
    next K/V tiles: ``_cpu_kernels._plan_next_tiles``) prefetched into L2, a share per block."""
    BK, BQ = ST.shape
    lines = (plan[1] + 63) // 64 + (plan[3] + 63) // 64
    blocks = BQ // 32
    share = (lines + blocks - 1) // blocks if blocks > 0 else 0
    for j in range(0, BQ, 32):
        _cpu_amx.exp2_pairs(
            ST.ctypes.data + 4 * j, ST.strides[0], BK, Pb.ctypes.data + 4 * j, 2 * Pb.strides[0], mul,
            sub.ctypes.data + 4 * j, tile_sum.ctypes.data + 4 * j, tile_max.ctypes.data + 4 * j if want_max else 0,
            plan.ctypes.data, (j // 32) * share, share,
        )


@njit(cache=_JIT_CACHE, fastmath={"contract", "afn", "nsz"})
def _exp2_sum_max_bf16(ST, Pb, mul, sub, tile_sum, tile_max, pairs, plan=_NO_PREFETCH):
    """The bfloat16 forward's lazy step (see LAZY_LOG2): ``Pb = bf16(2**(ST·mul − sub))`` (in
    key pairs with ``pairs``, as :func:`_exp2_sum_bf16_pairs`), ``tile_sum[r] = Σ_c P`` and
    ``tile_max[r] = max_c ST`` (NaN sticky) in one pass — the tile max's own pass (5 µs of a
    256 × 256 tile) folded into the exponent's.  With ``pairs`` no max (``tile_max`` −inf:
    the caller checks the sums, LAZY_SUM).  ``ST`` is only read."""
    _wide_vectors()
    BK, BQ = ST.shape
    tile_sum[:] = 0.0
    tile_max[:] = -np.inf
    if pairs:  # 512-bit vectors written out, no max (LAZY_SUM), plan prefetched: docs/performance.md
        _exp2_pairs_tile(ST, Pb, mul, sub, tile_sum, tile_max, False, plan)
    else:
        for c in range(BK):
            row = _row(ST, c)
            prow = _row(Pb, c)
            for r in range(BQ):
                s0 = row[r]
                t = tile_max[r]
                tile_max[r] = s0 if (s0 > t or s0 != s0) else t
                p = _exp2_bf16_grade(s0 * mul - sub[r])
                tile_sum[r] += p
                prow[r] = _to_bf16(p)


@njit(cache=_JIT_CACHE)
def _round_to_bf16_pairs(ST, Pb):
    """float32 ``ST`` rounded to bfloat16 into ``Pb`` in key pairs (see :func:`_exp2_sum_bf16_pairs`;
    pair row ``i`` at ``2·i`` of ``Pb``'s rows, whatever their padding), by ``_cpu_amx.round_pairs``."""
    BK, BQ = ST.shape
    for j in range(0, BQ, 32):
        _cpu_amx.round_pairs(ST.ctypes.data + 4 * j, ST.strides[0], BK, Pb.ctypes.data + 4 * j, 2 * Pb.strides[0])


@njit(cache=_JIT_CACHE)
def _round_to_bf16_rows(x, out):
    """:func:`_round_to_bf16` for 2-D tiles with padded rows (the bfloat16 forward's, :func:`_tile_buffer`)."""
    for c in range(x.shape[0]):
        bits = _row(x, c).view(np.uint32)
        row = _row(out, c)
        for i in range(bits.size):
            row[i] = _bf16_bits(bits[i])


# =================================================================================
# the bfloat16 forward's tile products on AMX (_cpu_amx): which route, operand layouts
# =================================================================================


@njit(cache=_JIT_CACHE)
def _aligned_empty(rows, cols, like):
    """An uninitialized C-ordered ``(rows, cols)`` array of ``like``'s dtype at a 64-byte
    boundary: a tile row (64 bytes) split over two cache lines ran the AMX score product
    1.7× slower, and MKL's times moved by as much with the buffers' alignment."""
    n = rows * cols
    buf = np.empty(n + 64, dtype=like.dtype)
    skip = (-buf.ctypes.data) % 64 // buf.itemsize
    return buf[skip : skip + n].reshape((rows, cols))


@intrinsic
def _row(typingctx, arr, c):
    """Row ``c`` of a 2-D tile buffer as a C-contiguous 1-D view (sharing its memory).

    For the bfloat16 forward's padded buffers (:func:`_padded_empty`, Numba layout "A"): a
    plain ``ST[c]`` is typed "A" too, and LLVM then kept the row loops on it scalar (the
    first tile's max and rescale ran 3× slower).  Only for arrays whose rows are contiguous
    (every tile buffer here); a C-ordered array gives the same view as ``arr[c]``.
    """
    if not (isinstance(arr, types.Array) and arr.ndim == 2 and isinstance(c, types.Integer)):
        return None
    row_type = types.Array(arr.dtype, 1, "C")
    sig = row_type(arr, c)

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0])
        index = context.cast(builder, args[1], signature.args[1], types.intp)
        byte_offset = builder.mul(index, builder.extract_value(src.strides, 0))
        data = builder.bitcast(
            builder.gep(builder.bitcast(src.data, ir.IntType(8).as_pointer()), [byte_offset]), src.data.type
        )
        itemsize = context.get_constant(types.intp, context.get_abi_sizeof(context.get_data_type(arr.dtype)))
        view = context.make_array(row_type)(context, builder)
        populate_array(
            view, data=data, shape=cgutils.pack_array(builder, [builder.extract_value(src.shape, 1)]),
            strides=cgutils.pack_array(builder, [itemsize]), itemsize=itemsize, meminfo=src.meminfo, parent=src.parent,
        )
        return impl_ret_borrowed(context, builder, row_type, view._getvalue())

    return sig, codegen


@njit(cache=_JIT_CACHE)
def _padded_empty(rows, cols, like):
    """:func:`_aligned_empty` with each row a cache line longer than ``cols`` elements (a
    strided view, Numba layout "A"): see ``_cpu_amx.ROW_PAD``."""
    pad = _cpu_amx.ROW_PAD // like.itemsize
    return _aligned_empty(rows, cols + pad, like)[:, :cols]


def _tile_buffer(rows, cols, like, q):
    """A forward tile buffer ``(rows, cols)`` of ``like``'s dtype at a 64-byte boundary: with
    rows padded by a cache line for bfloat16 operands (``q`` uint16: :func:`_padded_empty`,
    whose row strides the AMX steps take as they are), contiguous otherwise."""
    raise NotImplementedError("compiled only")


@overload(_tile_buffer, jit_options={"cache": _JIT_CACHE})
def _tile_buffer_overload(rows, cols, like, q):
    if q.dtype == types.uint16:
        return lambda rows, cols, like, q: _padded_empty(rows, cols, like)
    return lambda rows, cols, like, q: _aligned_empty(rows, cols, like)


def _new_acc(BQ, Dv, T, like):
    """The forward's accumulator, ``(BQ, Dv)`` in ``T``'s dtype; for bfloat16 operands
    (``like`` uint16) kept transposed in memory (a transposed view of a padded ``(Dv, BQ)``,
    :func:`_padded_empty`; Numba layout "A", not "C": :func:`_transposed_acc`): the products
    compute ``accᵀ += Vᵀ·P``, whose B operand (P) the softmax writes as it lies."""
    raise NotImplementedError("compiled only")


@overload(_new_acc, jit_options={"cache": _JIT_CACHE})
def _new_acc_overload(BQ, Dv, T, like):
    if like.dtype == types.uint16:
        return lambda BQ, Dv, T, like: _padded_empty(Dv, BQ, T).T
    return lambda BQ, Dv, T, like: np.empty((BQ, Dv), dtype=T.dtype)


def _transposed_acc(acc):
    """Whether the forward's accumulator type ``acc`` is :func:`_new_acc`'s transposed one
    (any layout but C: F, or A when its rows are padded).  For overloads (a Numba type)."""
    return acc.layout != "C"


def _rescale_rows(acc, alpha):
    """``acc[r, :] *= alpha[r]``, vectorized along the accumulator's contiguous axis."""
    raise NotImplementedError("compiled only")


@overload(_rescale_rows, jit_options={"cache": _JIT_CACHE})
def _rescale_rows_overload(acc, alpha):
    if _transposed_acc(acc):

        def impl_t(acc, alpha):
            accT = acc.T
            for d in range(accT.shape[0]):
                row = _row(accT, d)
                for r in range(row.shape[0]):
                    row[r] *= alpha[r]

        return impl_t

    def impl(acc, alpha):
        for r in range(acc.shape[0]):
            acc_row = acc[r]  # row views keep the short inner loops vectorized
            a = alpha[r]
            for d in range(acc_row.shape[0]):
                acc_row[d] *= a

    return impl


def _load_q(Qs, Qv, q, b, h, i0, nr, amx):
    """The forward's query tile: packed straight from ``q`` into the AMX operand ``Qv`` when
    ``amx`` (``_cpu_amx.pack_q_rows``; ``Qs`` unused there), else loaded into ``Qs`` (rows past
    ``nr`` zero) and, for bfloat16, packed from it (:func:`_pack_q`)."""
    raise NotImplementedError("compiled only")


@overload(_load_q, jit_options={"cache": _JIT_CACHE})
def _load_q_overload(Qs, Qv, q, b, h, i0, nr, amx):
    if q.dtype == types.uint16:

        def impl(Qs, Qv, q, b, h, i0, nr, amx):
            if amx:
                _cpu_amx.pack_q_rows(q.view(np.uint32), b, h, i0, nr, Qv)
            else:
                Qs[:] = 0
                Qs[:nr] = q[b, h, i0 : i0 + nr]

        return impl

    def impl_other(Qs, Qv, q, b, h, i0, nr, amx):
        Qs[:] = 0
        Qs[:nr] = q[b, h, i0 : i0 + nr]

    return impl_other


def _pack_q(Qs, Qv, amx):
    """The query tile as the AMX score product's B operand (``_cpu_amx.pack_q``), when ``amx``."""
    raise NotImplementedError("compiled only")


@overload(_pack_q, jit_options={"cache": _JIT_CACHE})
def _pack_q_overload(Qs, Qv, amx):
    if Qs.dtype == types.uint16:

        def impl(Qs, Qv, amx):
            if amx:
                _cpu_amx.pack_q(Qs, Qv)

        return impl
    return lambda Qs, Qv, amx: None


# Score products of short problems accumulated in float64 (``_cpu_simd.dot_tile_f64``), not by
# the float32 GEMM.  A GEMM sums each score's D products in one chain; NumPy's BLAS — the
# tolerance rule's naive baseline — sums short products (M·N ≲ 1,150 scores, or one query
# row) in 16 lanes, with ≈ 2.2× less rounding error at D 64 (2.6× at D 128).  At a large
# ``scale`` that score error is the output's largest, and on short rows a few rows decide the
# maximum: causal L 11 D 64 at scale 3 missed the 2×-naive rule by 3.0×, L 24 D 128 by 3.7×
# (docs/performance-log.md, "float32 accuracy at a large scale").  Even a 16-lane float32 sum
# (NumPy's own error, different bits) missed it by chance (1.9×); float64 sums do not.  Up to
# this many scores per head (or one query row) they run: ≈ 2.5× the GEMM's time on such
# tiles, within the run-to-run noise of calls up to L 32 (ours 2048 ≥ NumPy's ≈ 1,150 for
# margin); longer rows sum in one chain on both sides.
F64_DOT_MAX_SCORES = 2048


@njit(cache=_JIT_CACHE, inline="always")
def _short_rows(Lq, Lk):
    """Whether a float32 call of ``Lq × Lk`` scores per head takes the float64 score products."""
    return Lq * Lk <= F64_DOT_MAX_SCORES or Lq == 1


def _dots(A, B, C, wide):
    """``C = A · Bᵀ`` (``A (M, D)``, ``B (N, D)``): float32 with ``wide`` by :func:`dot_tile_f64`
    (sums in float64; its operands' rows contiguous), else by :func:`_gemm`."""
    raise NotImplementedError("compiled only")


@overload(_dots, jit_options={"cache": _JIT_CACHE})
def _dots_overload(A, B, C, wide):
    if A.dtype == types.float32 and B.dtype == types.float32 and C.dtype == types.float32:

        def impl_f32(A, B, C, wide):
            if wide and A.strides[1] == 4 and B.strides[1] == 4 and C.strides[1] == 4:
                dot_tile_f64(A, B, C)
            else:
                _gemm(A, B.T, C, 0.0)

        return impl_f32
    return lambda A, B, C, wide: _gemm(A, B.T, C, 0.0)


def _qk(Kb, Qs, Qv, ST, amx, cfg, wide):
    """``ST = Kb · Qsᵀ``: on AMX from the packed ``Qv`` (``amx``), else by :func:`_dots`."""
    raise NotImplementedError("compiled only")


@overload(_qk, jit_options={"cache": _JIT_CACHE})
def _qk_overload(Kb, Qs, Qv, ST, amx, cfg, wide):
    if Kb.dtype == types.uint16:

        def impl(Kb, Qs, Qv, ST, amx, cfg, wide):
            if amx:
                BK, D = Kb.shape
                _cpu_amx.scores(
                    Kb.ctypes.data, Kb.strides[0], BK, D, Qv.ctypes.data, Qv.strides[0], ST.shape[1], ST.ctypes.data, ST.strides[0], cfg
                )
            else:
                _gemm(Kb, Qs.T, ST, 0.0)

        return impl
    return lambda Kb, Qs, Qv, ST, amx, cfg, wide: _dots(Kb, Qs, ST, wide)


def _pv(P, Vb, acc, amx, cfg, fresh=False):
    """``acc += P · Vb`` with ``P`` given transposed, ``(BK, BQ)`` — for bfloat16 operands in
    key pairs (``amx``: ``_cpu_amx.values_rows_outer`` up to Dv 128, else ``values``) or plain (MKL,
    ``accᵀ += Vᵀ·Pᵀ``).  ``fresh`` (a query tile's first key tile, taken on AMX only: see
    :func:`_fresh_acc`): ``acc = P · Vb``, acc not read."""
    raise NotImplementedError("compiled only")


@overload(_pv, jit_options={"cache": _JIT_CACHE})
def _pv_overload(P, Vb, acc, amx, cfg, fresh=False):
    if P.dtype == types.uint16:

        def impl(P, Vb, acc, amx, cfg, fresh=False):
            accT = acc.T
            VT = Vb.T
            if amx and VT.shape[0] <= _cpu_amx.ROWS_OUTER_MAX_DV:
                _cpu_amx.values_rows_outer(  # P's pair rows: two of its uint16 rows apart
                    VT.ctypes.data, VT.strides[0], VT.shape[0], VT.shape[1], P.ctypes.data, 2 * P.strides[0], P.shape[1],
                    accT.ctypes.data, accT.strides[0], cfg, fresh,
                )
            elif amx:
                _cpu_amx.values(
                    VT.ctypes.data, VT.strides[0], VT.shape[0], VT.shape[1], P.ctypes.data, 2 * P.strides[0], P.shape[1],
                    accT.ctypes.data, accT.strides[0], cfg, fresh,
                )
            else:
                _gemm(VT, P, accT, 1.0)

        return impl
    if P.dtype == types.float32:

        def impl_f32(P, Vb, acc, amx, cfg, fresh=False):
            if Vb.shape[1] >= PV_GEMM_MIN_DV:
                _gemm(P.T, Vb, acc, 1.0)
            else:
                _pv_narrow(P, Vb, acc)

        return impl_f32
    return lambda P, Vb, acc, amx, cfg, fresh=False: _gemm(P.T, Vb, acc, 1.0)


# MKL's sgemm (torch 2.13's, seen on an AMD Zen 5 without AMX, 3 Dec) adds a narrow product
# (N = Dv ≤ 8) into C one key at a time, so with beta = 1 every small P·v rounds against
# ulp(acc): a row of one weight ≈ 1 and 4095 weights ≈ 5e-8 came out 12–35× the naive error
# (through _gemm_f32 with C = 3: 3.6–3.8e-5 added where 5.2e-5 is true; N ≥ 16 exact).  Narrow
# values take _pv_narrow instead: each block of SUM_KEYS keys summed apart, as the exp passes
# sum P, then added to acc once.
PV_GEMM_MIN_DV = 16


@njit(cache=_JIT_CACHE, fastmath={"nsz", "contract"})
def _pv_narrow(P, Vb, acc):
    """``acc += P · Vb`` for float32 values narrower than PV_GEMM_MIN_DV, ``P (BK, BQ)`` given
    transposed: in blocks of SUM_KEYS keys, each summed into ``block`` before it meets acc."""
    BK, BQ = P.shape
    Dv = Vb.shape[1]
    block = np.empty((Dv, BQ), np.float32)
    for c0 in range(0, BK, SUM_KEYS):
        block[:] = 0.0
        for c in range(c0, min(BK, c0 + SUM_KEYS)):
            for d in range(Dv):
                vcd = Vb[c, d]
                for r in range(BQ):
                    block[d, r] += P[c, r] * vcd
        for r in range(BQ):
            for d in range(Dv):
                acc[r, d] += block[d, r]


def _fresh_acc(acc, amx):
    """Whether the forward's first :func:`_pv` of a query tile may start the accumulator from
    zero (``fresh``) instead of the kernel zeroing it first: the transposed bfloat16
    accumulator on AMX (the tile products then begin from tile zeros).  Else False."""
    raise NotImplementedError("compiled only")


@overload(_fresh_acc, jit_options={"cache": _JIT_CACHE})
def _fresh_acc_overload(acc, amx):
    if _transposed_acc(acc):
        return lambda acc, amx: amx
    return lambda acc, amx: False


def _pv_operand(ST, Pb, amx):
    """P (float32 in ``ST``) as :func:`_pv`'s operand: ``ST`` itself, or rounded to bfloat16 into ``Pb`` (in key pairs with ``amx``)."""
    raise NotImplementedError("compiled only")


@overload(_pv_operand, jit_options={"cache": _JIT_CACHE})
def _pv_operand_overload(ST, Pb, amx):
    if Pb.dtype == types.uint16:

        def impl(ST, Pb, amx):
            if amx:
                _round_to_bf16_pairs(ST, Pb)
            else:
                _round_to_bf16_rows(ST, Pb)
            return Pb

        return impl
    return lambda ST, Pb, amx: _as_operand(ST, Pb)


def _exp2_sum_operand(ST, c2, m_use, row_sum, Pb, fuse, amx, plan):
    """The forward's ``P = 2^(S·c2 − m_use)`` and ``row_sum += Σ P`` straight into the bfloat16
    operand ``Pb`` (``fuse``: no dropout to apply first; shifts in range; in key pairs with
    ``amx``, prefetching ``plan``'s lines as the lazy step does): True when done,
    False (nothing done) for every other case, which :func:`_exp2_shifted_sum` then takes."""
    raise NotImplementedError("compiled only")


@overload(_exp2_sum_operand, jit_options={"cache": _JIT_CACHE})
def _exp2_sum_operand_overload(ST, c2, m_use, row_sum, Pb, fuse, amx, plan):
    if Pb.dtype == types.uint16:

        def impl_bf16(ST, c2, m_use, row_sum, Pb, fuse, amx, plan):
            if fuse and _shift_ok(m_use):
                if amx:
                    _exp2_sum_bf16_pairs(ST, Pb, c2, m_use, row_sum, plan)
                else:
                    _exp2_sum_bf16(ST, Pb, c2, m_use, row_sum)
                return True
            return False

        return impl_bf16
    return lambda ST, c2, m_use, row_sum, Pb, fuse, amx, plan: False


def _exp2_operand(ST, N, c2, lse2, Pb, fuse):
    """The backward's ``P = 2^(S·c2 − lse2)``: True when it went straight into the bfloat16
    operand ``Pb`` (``fuse``, and shifts in range), False when ``ST`` holds it in the compute dtype."""
    raise NotImplementedError("compiled only")


@overload(_exp2_operand, jit_options={"cache": _JIT_CACHE})
def _exp2_operand_overload(ST, N, c2, lse2, Pb, fuse):
    if Pb.dtype == types.uint16:

        def impl_bf16(ST, N, c2, lse2, Pb, fuse):
            if fuse and _shift_ok(lse2):
                _exp2_bf16(ST, Pb, c2, lse2)
                return True
            _exp2_shifted(ST, N, c2, lse2)
            return False

        return impl_bf16

    def impl(ST, N, c2, lse2, Pb, fuse):
        _exp2_shifted(ST, N, c2, lse2)
        return False

    return impl


def _ds_operand(Pb, dPT, delta):
    """``Pb ← dS`` rounded, from the P̃ in ``Pb`` (bfloat16 operands; no other dtype reaches it)."""
    raise NotImplementedError("compiled only")


@overload(_ds_operand, jit_options={"cache": _JIT_CACHE})
def _ds_operand_overload(Pb, dPT, delta):
    if Pb.dtype == types.uint16:
        return lambda Pb, dPT, delta: _ds_bf16(Pb, dPT, delta)
    return lambda Pb, dPT, delta: None


def _ds_operand_pairs(Pb, dPT, delta, Dp):
    """:func:`_ds_operand` on the bfloat16 backward's AMX path: ``Pb ← dS`` rounded (the same
    bits) and dS in key pairs into ``Dp`` (``(BK/2, ≥BQ)`` uint32), one pass
    (``_cpu_amx.ds_pairs``; BQ a multiple of 16).  Other dtypes: nothing (never reached)."""
    raise NotImplementedError("compiled only")


@overload(_ds_operand_pairs, jit_options={"cache": _JIT_CACHE})
def _ds_operand_pairs_overload(Pb, dPT, delta, Dp):
    if Pb.dtype != types.uint16:
        return lambda Pb, dPT, delta, Dp: None

    def impl(Pb, dPT, delta, Dp):
        BK, BQ = Pb.shape
        _cpu_amx.ds_pairs(Pb.ctypes.data, Pb.strides[0], dPT.ctypes.data, dPT.strides[0], BK, BQ, delta.ctypes.data,
                          Dp.ctypes.data, Dp.strides[0])

    return impl


def _key_pairs(dS, Dp):
    """bfloat16 ``dS`` rows in key pairs into ``Dp`` (:func:`_bf16_key_pairs`); other dtypes: nothing."""
    raise NotImplementedError("compiled only")


@overload(_key_pairs, jit_options={"cache": _JIT_CACHE})
def _key_pairs_overload(dS, Dp):
    if dS.dtype != types.uint16:
        return lambda dS, Dp: None
    return lambda dS, Dp: _bf16_key_pairs(dS, Dp)


def _tile_max(ST, out, Pb):
    """``out[r] = max_c ST[c, r]`` (:func:`_col_max`; 512-bit vectors on the bfloat16 path)."""
    raise NotImplementedError("compiled only")


@overload(_tile_max, jit_options={"cache": _JIT_CACHE})
def _tile_max_overload(ST, out, Pb):
    if Pb.dtype == types.uint16:
        return lambda ST, out, Pb: _col_max_bf16(ST, out)
    return lambda ST, out, Pb: _col_max(ST, out)


@njit(cache=_JIT_CACHE)
def _shift_ok(sub):
    """No finite shift of 2**20 or more: those rows take the exact two-step path of
    :func:`_exp2_shifted_f32`.  (+inf, the backward's rows without a key, gives 0 either way.)"""
    ok = True
    for r in range(sub.shape[0]):
        ok &= abs(sub[r]) < np.float32(HUGE_SHIFT) or sub[r] == np.inf
    return ok


# =================================================================================
# block classes by the structural masks
# =================================================================================


@njit(cache=_JIT_CACHE, _nrt=False)  # no reference counting: see _cpu_kernels._tile_class
def _block_class(b, i0, nrows, j0, ncols, o):
    """SKIP, PARTIAL or FULL (as far as lengths, causal, window and segments tell) for rows ``[i0, i0+nrows)`` × keys ``[j0, j0+ncols)``.

    ``ncols`` counts the real keys of the block (the packed block may be padded to BK);
    a FULL block needs every packed column to be a visible key.
    """
    q_lens, kv_lens, causal, left, right = o.q_lens, o.kv_lens, o.causal, o.left, o.right
    qlen = q_lens[b]
    kvlen = kv_lens[b]
    nr = min(nrows, qlen - i0)
    nc = min(ncols, kvlen - j0)
    if nr <= 0 or nc <= 0:
        return SKIP
    full = nc == ncols
    off = kvlen - qlen + o.shift
    plo = i0 + off
    phi = i0 + nr - 1 + off
    jlast = j0 + nc - 1
    if causal == 1:
        if j0 > phi:
            return SKIP
        if jlast > plo:
            full = False
    elif causal == 2:
        if j0 > i0 + nr - 1 + o.top_left_offset:
            return SKIP
        if jlast > i0 + o.top_left_offset:
            full = False
    if left >= 0:
        if jlast < plo - left:
            return SKIP
        if j0 < phi - left:
            full = False
    if right >= 0:
        if j0 > phi + right:
            return SKIP
        if jlast > plo + right:
            full = False
    if o.has_seg:
        q_seg, kv_seg = o.q_seg, o.kv_seg
        qmin = q_seg[b, i0]
        qmax = qmin
        for r in range(i0, i0 + nr):
            s = q_seg[b, r]
            qmin = min(qmin, s)
            qmax = max(qmax, s)
        kmin = kv_seg[b, j0]
        kmax = kmin
        for c in range(j0, j0 + nc):
            s = kv_seg[b, c]
            kmin = min(kmin, s)
            kmax = max(kmax, s)
        if qmax < kmin or kmax < qmin:
            return SKIP
        if not (qmin == qmax and kmin == kmax and qmin == kmin):
            full = False
    return FULL if full else PARTIAL


# =================================================================================
# dropout
# =================================================================================


@njit(cache=_JIT_CACHE, inline="always")
def _dropout_keep(key, p, b, h, i, j, Hq, Lq, Lk):
    """Exactly :func:`dotattn.kernels.dropout.keep_block` for one element."""
    counter = ((np.uint64(b) * np.uint64(Hq) + np.uint64(h)) * np.uint64(Lq) + np.uint64(i)) * np.uint64(
        Lk
    ) + np.uint64(j)
    z = _splitmix64(counter ^ key)
    u = np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)
    return u >= p


# =================================================================================
# column loops over a transposed block ST (BK × BQ): row-wise reductions of S become
# element-wise operations between rows of ST, which LLVM vectorizes (a horizontal max
# does not vectorize in Numba's LLVM: 0.9 ns/element against 0.05)
# =================================================================================


@njit(cache=_JIT_CACHE, fastmath={"nsz", "contract"})
def _col_max(ST, out):
    """``out[r] = max_c ST[c, r]``, NaN when a column holds NaN.

    No "nnan" fast-math here: a NaN score (a NaN in q, a visible key or bias entry) must
    reach the caller, which turns its row into NaN (docs/semantics.md, non-finite inputs).
    """
    _col_max_body(ST, out)


@njit(cache=_JIT_CACHE, inline="always")
def _col_max_body(ST, out):
    BK, BQ = ST.shape
    out[:] = ST[0]
    for c in range(1, BK):
        row = ST[c]
        for r in range(BQ):
            v = row[r]
            out[r] = v if (v > out[r] or v != v) else out[r]


@njit(cache=_JIT_CACHE, fastmath={"nsz", "contract"})
def _col_sum_into(ST, out):
    """``out[r] += Σ_c ST[c, r]``."""
    BK, BQ = ST.shape
    for c in range(BK):
        row = ST[c]
        for r in range(BQ):
            out[r] += row[r]


@njit(cache=_JIT_CACHE, fastmath={"nsz", "contract"})
def _ds_block(ST, dPT, delta):
    """``ST[c, r] = ST[c, r] · (dPT[c, r] − delta[r])``: dS = P ∘ (dP − Δ), transposed."""
    for c in range(ST.shape[0]):
        row = ST[c]
        drow = dPT[c]
        for r in range(ST.shape[1]):
            row[r] = row[r] * (drow[r] - delta[r])


@njit(cache=_JIT_CACHE)
def _delta_from_tile(PT, dPT, delta, nr):
    """``delta[r] += Σ_c PT[c, r] · dPT[c, r] / Σ_c PT[c, r]`` for the tile's first ``nr`` rows
    (``delta`` holds −dlse, a gradient through the LSE, or 0: ``cpu.backward``), summed in
    float64 and rounded once: Δ from the backward's own P and dP (after dropout's
    mask), for rows whose every P is in this tile.  Δ = rowsum(dO ∘ O) from the forward's O is
    the same number in exact arithmetic; but where one key dominates a row at a large scale,
    dS = P ∘ (dP − Δ) cancels and its sum over the row, Δ·(1 − Σ P), is what dQ sees — the
    forward's O came through whole (dQ at 6.5× the naive error, Lq 1, Lk 48, D 64, scale 3),
    and so did ``_softmax_rows``' P summing to 1 + 1e-7.  Divided by the row's Σ P, Σ dS is 0
    for the P the products use (that case: 1.0e-5 → 1.0e-6, the naive 1.5e-6)."""
    for r in range(nr):
        acc, mass = 0.0, 0.0
        for c in range(PT.shape[0]):
            acc += np.float64(PT[c, r]) * np.float64(dPT[c, r])
            mass += np.float64(PT[c, r])
        if mass > 0.0:  # (a row without a visible key has P = 0: dS = 0 whatever Δ is)
            delta[r] = acc / mass + np.float64(delta[r])


@njit(cache=_JIT_CACHE, fastmath={"nsz", "contract"})
def _mul_into(dst, src):
    """``dst *= src`` element-wise (2-D, row views so it vectorizes)."""
    for c in range(dst.shape[0]):
        row = dst[c]
        srow = src[c]
        for r in range(dst.shape[1]):
            row[r] *= srow[r]


@njit(cache=_JIT_CACHE, fastmath={"nsz", "contract"})
def _add_into(dst, src):
    for i in range(dst.shape[0]):
        row = dst[i]
        srow = src[i]
        for j in range(dst.shape[1]):
            row[j] += srow[j]


@njit(cache=_JIT_CACHE)
def _dropout_block(ST, PdT, dPT, inv_keep, b, h, i0, nr, j0, o):
    """Apply the dropout mask: ``PdT = ST∘keep/(1−p)`` (or in place when PdT is ST) and the same on ``dPT``.

    The counters are those of head ``h + h0``, row ``i + row0``, key ``j + col0`` of the full
    ``Hq × Lq × Lk`` problem (``o.dropout_geom``), so a block of a larger call draws its part.
    """
    h0, row0, col0, Hq, Lq, Lk = o.dropout_geom
    key, p = o.dropout_key, o.dropout_p
    BK, BQ = ST.shape
    for c in range(BK):
        for r in range(BQ):
            if r < nr and _dropout_keep(key, p, b, h + h0, i0 + row0 + r, j0 + col0 + c, Hq, Lq, Lk):
                PdT[c, r] = ST[c, r] * inv_keep
                dPT[c, r] *= inv_keep
            else:
                PdT[c, r] = 0.0
                dPT[c, r] = 0.0
