"""Explicit 16-lane (AVX-512) loops over a transposed float32 score tile ``ST (BK, BQ)``.

Numba's LLVM vectorizes the plain loops of :mod:`._cpu_primitives` with 8-lane (256-bit)
vectors only: LLVM prefers 256-bit vectors on AVX-512 Intel cores, and Numba offers no
per-function switch.  Vectors written out in the IR as ``<16 x float>`` are lowered to
512-bit registers all the same, so the hot passes over the score tile are written here as
LLVM IR: the exponent (0.49 ns/element in 8 lanes, a quarter of the forward's tile), fused
with the row sum that followed it as a pass of its own.  (The column maximum written so ran
no faster than the plain 8-lane loop: that pass is bound by reading the tile from L2.)

Each function takes the first ``nvec · 16`` columns of ``ST``; the caller runs its plain
loop on the rest.  ``ST``'s rows must be contiguous (``ST.strides[1] == 4``).  The
operations and their order are those of the plain loops (the same FMAs, the same
sequential sums), so the results are the same bits.
"""

from __future__ import annotations

import functools

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16
LOG2E = 1.4426950408889634  # log2(e): every kernel's (the lowest module of them owns it)
_F = ir.FloatType()
_I32 = ir.IntType(32)
_VF = ir.VectorType(_F, LANES)
_VI = ir.VectorType(_I32, LANES)
_VB = ir.VectorType(ir.IntType(1), LANES)

# exp2_fraction's coefficients (_cpu_primitives), highest degree first: the decode kernels'
# 2**x (_exp2_vector)
_EXP2_COEFFS = (
    1.5403530393381606e-4,
    1.3333558146428443e-3,
    9.618129107628477e-3,
    5.550410866482158e-2,
    0.2402265069591007,
    0.6931471805599453,
    1.0,
)
# exp2_unit's coefficients (_cpu_primitives), highest degree first: the tile passes' 2**x
# (_exp2_unit_vector)
EXP2_UNIT_COEFFS = (
    0.00015345800784416497,
    0.0013399932067841291,
    0.009618489071726799,
    0.05550328642129898,
    0.24022646248340607,
    0.6931471824645996,
    1.0,
)
# 2**x is 0 for x ≤ EXP2_ZERO_BELOW (and NaN x): the results kept are 2**n·2**f with n ≥ −125
# and 2**f ≥ 2**−½, normal, so that vscalefps never underflows (a microcode assist: the
# bfloat16 pass's masked tiles ran 12× slower, docs/performance.md)
EXP2_ZERO_BELOW = -125.5
# the exponent's clamp before the int conversion of the portable form: p·2**129 overflows for
# every p = 2**f ≥ 2**−½, as vscalefps's unclamped n does (at 128, an x in [128.5, 129) with a
# negative fraction gave a finite p·2**128 where vscalefps gives +inf)
EXP2_TOP = 129.0


def _splat(builder, value, vty=_VF):
    undef = ir.Constant(vty, ir.Undefined)
    first = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


def _fconst(value):
    import numpy as np

    return ir.Constant(_VF, [float(np.float32(value))] * LANES)


def _vector_ptr(builder, base_ptr, byte_offset):
    i8p = ir.IntType(8).as_pointer()
    raw = builder.gep(builder.bitcast(base_ptr, i8p), [byte_offset])
    return builder.bitcast(raw, _VF.as_pointer())


def _load(builder, ptr):
    return builder.load(ptr, align=4)


def _store(builder, value, ptr):
    builder.store(value, ptr, align=4)


def _intrinsic_fn(builder, name, nargs):
    return builder.module.declare_intrinsic(name, fnty=ir.FunctionType(_VF, [_VF] * nargs))


def _exp2_vector(builder, s, mul_v, sub_v):
    """``2**(s·mul − sub)`` for exponents ≤ 0, as the decode kernels' ``_exp_row_f32``
    (``x = n + f``, ``n`` = round(x), the Taylor polynomial of :data:`_EXP2_COEFFS` on
    ``f ∈ [−½, ½]``, ``n`` added to the exponent bits; 0 for ``x < −126.5`` and NaN)."""
    fma = _intrinsic_fn(builder, "llvm.fma.v16f32", 3)
    floor = _intrinsic_fn(builder, "llvm.floor.v16f32", 1)
    x = builder.call(fma, [s, mul_v, builder.fneg(sub_v)])
    lo = _fconst(-127.0)
    # max(x, −127) as the plain loop's vmaxps: NaN stays NaN (and gives 0 below)
    xc = builder.select(builder.fcmp_ordered(">", lo, x), lo, x)
    n = builder.call(floor, [builder.fadd(xc, _fconst(0.5))])
    e = builder.fptosi(n, _VI)
    f = builder.fsub(xc, n)
    p = _fconst(_EXP2_COEFFS[0])
    for c in _EXP2_COEFFS[1:]:
        p = builder.call(fma, [p, f, _fconst(c)])
    bits = builder.add(builder.bitcast(p, _VI), builder.shl(e, ir.Constant(_VI, [23] * LANES)))
    keep = builder.icmp_signed(">", e, ir.Constant(_VI, [-127] * LANES))
    return builder.select(keep, builder.bitcast(bits, _VF), ir.Constant(_VF, [0.0] * LANES))


# tanh's Taylor coefficients after x (x³ … x¹⁷: -1/3, 2/15, -17/315, …), highest degree first:
# :func:`_tanh_vector` below |x| = TANH_SERIES_BELOW, where the series' next term is < 0.05 ulp
TANH_SERIES_COEFFS = (
    6404582 / 10854718875,
    -929569 / 638512875,
    21844 / 6081075,
    -1382 / 155925,
    62 / 2835,
    -17 / 315,
    2 / 15,
    -1 / 3,
)
TANH_SERIES_BELOW = 0.55


def _tanh_vector(builder, x):
    """``tanh(x)`` of 16 float32 lanes within 2.3 ulp (NumPy's ``np.tanh`` in float32: 1.4;
    tests/kernels/test_cpu_decode_softcap.py sweeps it): below |x| = 0.55 the Taylor series,
    ``x + x³·P(x²)``; above, ``(1 − u)/(1 + u)`` with ``u = exp(−2|x|)`` by :func:`_exp2_vector`
    (its exponent ≤ 0; ±inf → ±1); the sign copied from ``x`` (``tanh(−0) = −0``); NaN stays NaN.
    Softcapped decode scores use it (``c·tanh(s/c)``): one call per 16 scores where libm's scalar
    ``tanhf`` per score made a softcapped call 2–2.8× slower than a plain one."""
    fma = _intrinsic_fn(builder, "llvm.fma.v16f32", 3)
    fabs = _intrinsic_fn(builder, "llvm.fabs.v16f32", 1)
    copysign = _intrinsic_fn(builder, "llvm.copysign.v16f32", 2)
    ax = builder.call(fabs, [x])
    y = builder.fmul(ax, ax)
    p = _fconst(TANH_SERIES_COEFFS[0])
    for c in TANH_SERIES_COEFFS[1:]:
        p = builder.call(fma, [p, y, _fconst(c)])
    series = builder.call(fma, [builder.fmul(ax, y), p, ax])
    one = _fconst(1.0)
    u = _exp2_vector(builder, ax, _fconst(-2.0 * LOG2E), _fconst(0.0))
    closed = builder.fdiv(builder.fsub(one, u), builder.fadd(one, u))
    r = builder.select(builder.fcmp_ordered("<", ax, _fconst(TANH_SERIES_BELOW)), series, closed)
    r = builder.call(copysign, [r, x])
    return builder.select(builder.fcmp_unordered("uno", x, x), x, r)


def target_features(context=None) -> str:
    """The LLVM features string of the compile target (Numba's target machine: the host, or
    NUMBA_CPU_NAME / NUMBA_CPU_FEATURES) of ``context`` (None: Numba's CPU target)."""
    if context is None:
        from numba.core.registry import cpu_target

        context = cpu_target.target_context
    return getattr(context.codegen(), "_tm_features", "") or ""


def target_has(feature: str, context=None) -> bool:
    """Whether the compile target surely has ``feature``: its features string's last mention of
    it is ``+``."""
    marks = [f[0] for f in target_features(context).split(",") if f[1:] == feature]
    return bool(marks) and marks[-1] == "+"


@functools.lru_cache(maxsize=None)
def has_scalef():
    """Whether Numba compiles for a CPU with AVX-512 F and DQ (``vscalefps``, ``vreduceps``)."""
    return target_has("avx512f") and target_has("avx512dq")


def _exp2_unit_vector(builder, s, mul_v, sub_v):
    """``2**(s·mul − sub)``, as :func:`_cpu_primitives._exp2_one` (the same bits): ``x = n + f``
    with ``n`` = ``x`` rounded to even and ``f = x − n ∈ [−½, ½]`` (exact), ``2**f`` by the
    polynomial of :data:`EXP2_UNIT_COEFFS`, times ``2**n``; 0 for ``x ≤ −125.5`` and NaN ``x``.

    With AVX-512: ``vreduceps`` gives ``f`` in one µop (round to nearest even; its subtraction
    is exact, so it is the plain loop's ``x − roundeven(x)``), ``n = x − f`` (exact), and
    ``vscalefps`` multiplies by ``2**n`` under a zeroing mask (``x > −125.5``): ≈ 11 vector
    operations against the 16 of the bit-add form (``_exp2_vector``).  Elsewhere the
    portable form of ``_exp2_one``: ``roundeven``, a subtraction, ``ldexp``, a select.
    """
    fma = _intrinsic_fn(builder, "llvm.fma.v16f32", 3)
    x = builder.call(fma, [s, mul_v, builder.fneg(sub_v)])
    zero = ir.Constant(_VF, [0.0] * LANES)
    keep = builder.fcmp_ordered(">", x, _fconst(EXP2_ZERO_BELOW))
    if has_scalef():
        i16 = ir.IntType(16)
        fnty = ir.FunctionType(_VF, [_VF, _I32, _VF, i16, _I32])
        reduce = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.mask.reduce.ps.512")
        # imm 8: keep 0 fraction bits, round to nearest even, no precision exception; 4: MXCSR
        f = builder.call(reduce, [x, ir.Constant(_I32, 8), zero, ir.Constant(i16, -1), ir.Constant(_I32, 4)])
        n = builder.fsub(x, f)
    else:
        # x clamped at EXP2_TOP first (one vminps: NaN, +inf and x ≥ 129 give 129): every x from
        # 128.5 on overflows to +inf either way and NaN is not kept, so no result changes, and
        # f is finite and n within the int conversion's range without checks of their own
        top = _fconst(EXP2_TOP)
        x = builder.select(builder.fcmp_ordered("<", x, top), x, top)
        n = builder.call(_intrinsic_fn(builder, "llvm.roundeven.v16f32", 1), [x])
        f = builder.fsub(x, n)
    p = _fconst(EXP2_UNIT_COEFFS[0])
    for c in EXP2_UNIT_COEFFS[1:]:
        p = builder.call(fma, [p, f, _fconst(c)])
    if has_scalef():
        fnty = ir.FunctionType(_VF, [_VF, _VF, _VF, i16, _I32])
        scalef = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.mask.scalef.ps.512")
        return builder.call(scalef, [p, n, zero, builder.bitcast(keep, i16), ir.Constant(_I32, 4)])
    return builder.select(keep, ir_times_pow2(builder, p, builder.fptosi(n, _VI), clamped=True), zero)


# where ir_times_pow2's exponent is clamped: 2**(129 − 1) is +inf's bit pattern, so every
# larger exponent still gives +inf, as ldexp does for the factors it takes
_POW2_TOP = 129


def ir_times_pow2(builder, p, e, clamped=False):
    """``p · 2**e`` for float32 ``p ∈ [½, 2)`` and int32 ``e ≥ −125`` (scalars, or vectors of
    both): the exp passes' ``ldexp`` of ``2**f`` by ``n`` (every caller selects 0 for a
    smaller ``e``), as ``(p + p) · 2**(e − 1)`` with the power built from its exponent bits.

    The same bits as ``ldexp`` there: ``p + p`` is exact, ``2**(e − 1)`` is a normal power of
    two, so the product is ``p · 2**e`` exactly (a normal number, since ``p · 2**e ≥ 2**−126``)
    or overflows to +inf as ``ldexp`` does.  ``llvm.ldexp`` is one ``vscalefps`` where the
    target has AVX-512; elsewhere LLVM calls libm's ``ldexpf`` lane by lane (an AVX2 Zen 3:
    5 ns an element, 60 % of a float32 forward tile; docs/performance.md), so there this form
    runs instead (:func:`ldexp_exp2`)."""
    ity, fty = e.type, p.type

    def const(ty, value):
        return ir.Constant(ty, [value] * ty.count) if isinstance(ty, ir.VectorType) else ir.Constant(ty, value)

    if not clamped:  # (``clamped``: the caller's e ≤ 129 already)
        top = const(ity, _POW2_TOP)
        e = builder.select(builder.icmp_signed("<", e, top), e, top)
    power = builder.bitcast(builder.shl(builder.add(e, const(ity, 126)), const(ity, 23)), fty)
    return builder.fmul(builder.fadd(p, p), power)


def ldexp_exp2(builder, p, e, context=None):
    """``p · 2**e`` as the exp passes take it (:func:`ir_times_pow2`'s operands): ``llvm.ldexp``
    (``vscalefps``/``vscalefss``) where the compile target has AVX-512 F, else
    :func:`ir_times_pow2` — the same bits."""
    if target_has("avx512f", context):
        name = f"llvm.ldexp.v{p.type.count}f32.v{p.type.count}i32" if isinstance(p.type, ir.VectorType) else "llvm.ldexp.f32.i32"
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(p.type, [p.type, e.type]), name)
        return builder.call(fn, [p, e])
    return ir_times_pow2(builder, p, e)


def _tile_args(context, builder, sig, args):
    st = context.make_array(sig.args[0])(context, builder, args[0])
    rows = builder.extract_value(st.shape, 0)
    row_stride = builder.extract_value(st.strides, 0)
    return st.data, rows, row_stride


def _is_f32_tile(ST):
    return isinstance(ST, types.Array) and ST.ndim == 2 and ST.dtype == types.float32


LINE = 64  # bytes of a cache line


def _prefetch_lines(builder, plan, first, count):
    """Prefetch (into L2: ``prefetcht1``) lines ``first … first + count − 1`` of the two byte
    ranges in ``plan`` (``int64[4]``: address and length of each; lines past both skipped)."""
    i64 = ir.IntType(64)
    fn = builder.module.declare_intrinsic(
        "llvm.prefetch", [ir.IntType(8).as_pointer()],
        ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer(), _I32, _I32, _I32]),
    )
    loads = [builder.load(builder.gep(plan, [ir.Constant(i64, k)])) for k in range(4)]
    a, na, b, nb = loads
    line = ir.Constant(i64, LINE)
    la = builder.sdiv(builder.add(na, ir.Constant(i64, LINE - 1)), line)
    lb = builder.sdiv(builder.add(nb, ir.Constant(i64, LINE - 1)), line)
    with cgutils.for_range(builder, count) as loop:
        k = builder.add(first, loop.index)
        in_a = builder.icmp_signed("<", k, la)
        in_b = builder.icmp_signed("<", k, builder.add(la, lb))
        with builder.if_then(in_b):
            addr = builder.select(in_a, builder.add(a, builder.mul(k, line)),
                                  builder.add(b, builder.mul(builder.sub(k, la), line)))
            ptr = builder.inttoptr(addr, ir.IntType(8).as_pointer())
            builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])


def _lines_per_visit(builder, plan, visits):
    """The plan's cache lines (both ranges) spread evenly over ``visits`` visits, rounded up."""
    i64 = ir.IntType(64)
    total = ir.Constant(i64, 0)
    for k in (1, 3):
        n = builder.load(builder.gep(plan, [ir.Constant(i64, k)]))
        total = builder.add(total, builder.sdiv(builder.add(n, ir.Constant(i64, LINE - 1)), ir.Constant(i64, LINE)))
    visits = builder.select(builder.icmp_signed(">", visits, ir.Constant(i64, 0)), visits, ir.Constant(i64, 1))
    return builder.sdiv(builder.add(total, builder.sub(visits, ir.Constant(i64, 1))), visits)


@intrinsic
def exp2_tile16(typingctx, ST, mul, sub, row_sum, nvec, add_sum, plan):
    """``ST[c, r] = 2**(ST[c, r]·mul − sub[r])`` for ``r < nvec·16``; with ``add_sum`` (a
    compile-time bool literal) also ``row_sum[r] += Σ_c ST[c, r]`` in the same pass; the
    byte ranges of ``plan`` prefetched meanwhile (as in :func:`exp2_max_tile16`).

    Row by row, as the plain loops: the tile streams from L2 in address order (a column
    strip at a time, 1 KiB apart, ran no faster); ``sub`` and ``row_sum`` stay in L1.
    """
    if not _is_f32_tile(ST) or not isinstance(add_sum, types.BooleanLiteral):
        return None
    sig = types.void(ST, mul, sub, row_sum, nvec, add_sum, plan)
    with_sum = add_sum.literal_value

    def codegen(context, builder, signature, args):
        data, rows, row_stride = _tile_args(context, builder, signature, args)
        mul_v = _splat(builder, context.cast(builder, args[1], signature.args[1], types.float32))
        sub_data = context.make_array(signature.args[2])(context, builder, args[2]).data
        sum_data = context.make_array(signature.args[3])(context, builder, args[3]).data
        nvec_i = context.cast(builder, args[4], signature.args[4], types.intp)
        plan_data = context.make_array(signature.args[6])(context, builder, args[6]).data
        per_row = _lines_per_visit(builder, plan_data, rows)
        with cgutils.for_range(builder, rows) as outer:
            _prefetch_lines(builder, plan_data, builder.mul(outer.index, per_row), per_row)
            row_off = builder.mul(outer.index, row_stride)
            with cgutils.for_range(builder, nvec_i) as inner:
                col_bytes = builder.mul(inner.index, ir.Constant(inner.index.type, LANES * 4))
                ptr = _vector_ptr(builder, data, builder.add(row_off, col_bytes))
                sub_v = _load(builder, _vector_ptr(builder, sub_data, col_bytes))
                p = _exp2_unit_vector(builder, _load(builder, ptr), mul_v, sub_v)
                _store(builder, p, ptr)
                if with_sum:
                    sum_ptr = _vector_ptr(builder, sum_data, col_bytes)
                    _store(builder, builder.fadd(_load(builder, sum_ptr), p), sum_ptr)
        return context.get_dummy_value()

    return sig, codegen


ROWS_PER_VISIT = 2  # tile rows per visit of the column vectors in exp2_max_tile16 (4 ran no faster)


@intrinsic
def exp2_max_tile16(typingctx, ST, mul, sub, tile_sum, tile_max, nvec, plan):
    """:func:`exp2_tile16` with the sum, and ``tile_max[r] = max(tile_max[r], max_c ST[c, r])``
    of the scores read (before they are overwritten) in the same pass: the forward's lazy
    rescaling (:func:`._cpu_primitives._exp2_sum_max`) exponentiates against the running
    shift and checks the tile's maximum afterwards, so the separate max pass over the tile
    goes.  NaN is sticky in ``tile_max`` (as :func:`._cpu_primitives._col_max`): a NaN score
    must reach the caller.

    ``plan`` (``int64[4]``: two byte ranges, address and length each, lengths 0 for none):
    memory the caller reads next — the forward's value tile for ``P·V`` and the next key
    tile — prefetched into L2 a few lines per visit, spread over the pass.  MKL's tile
    products ran 8–13 % slower on operands in L3 than in L2 (256 × 512 × 64, one thread),
    and this pass is compute-bound: the lines arrive while it works.
    """
    if not _is_f32_tile(ST):
        return None
    sig = types.void(ST, mul, sub, tile_sum, tile_max, nvec, plan)

    def codegen(context, builder, signature, args):
        data, rows, row_stride = _tile_args(context, builder, signature, args)
        mul_v = _splat(builder, context.cast(builder, args[1], signature.args[1], types.float32))
        sub_data = context.make_array(signature.args[2])(context, builder, args[2]).data
        sum_data = context.make_array(signature.args[3])(context, builder, args[3]).data
        max_data = context.make_array(signature.args[4])(context, builder, args[4]).data
        nvec_i = context.cast(builder, args[5], signature.args[5], types.intp)
        def rows_at(first, count):
            # ``count`` tile rows from ``first`` per visit of the column vectors: the running
            # max, the sum and the shift are loaded and stored once for them (the same
            # sequential sum, the same bits as one row at a time)
            with cgutils.for_range(builder, nvec_i) as inner:
                col_bytes = builder.mul(inner.index, ir.Constant(inner.index.type, LANES * 4))
                sub_v = _load(builder, _vector_ptr(builder, sub_data, col_bytes))
                max_ptr = _vector_ptr(builder, max_data, col_bytes)
                sum_ptr = _vector_ptr(builder, sum_data, col_bytes)
                vmax, vsum = _load(builder, max_ptr), _load(builder, sum_ptr)
                for j in range(count):
                    row = builder.add(first, ir.Constant(first.type, j))
                    ptr = _vector_ptr(builder, data, builder.add(builder.mul(row, row_stride), col_bytes))
                    s = _load(builder, ptr)
                    take = builder.or_(builder.fcmp_ordered(">", s, vmax), builder.fcmp_unordered("uno", s, s))
                    vmax = builder.select(take, s, vmax)
                    p = _exp2_unit_vector(builder, s, mul_v, sub_v)
                    _store(builder, p, ptr)
                    vsum = builder.fadd(vsum, p)
                _store(builder, vmax, max_ptr)
                _store(builder, vsum, sum_ptr)

        group = ir.Constant(rows.type, ROWS_PER_VISIT)
        groups = builder.sdiv(rows, group)
        plan = context.make_array(signature.args[6])(context, builder, args[6]).data
        per_visit = _lines_per_visit(builder, plan, groups)
        with cgutils.for_range(builder, groups) as outer:
            _prefetch_lines(builder, plan, builder.mul(outer.index, per_visit), per_visit)
            rows_at(builder.mul(outer.index, group), ROWS_PER_VISIT)
        done = builder.mul(groups, group)
        with cgutils.for_range(builder, builder.sub(rows, done)) as rest:
            rows_at(builder.add(done, rest.index), 1)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def fma(typingctx, a, b, c):
    """``a·b + c`` rounded once (``llvm.fma``; one instruction where the CPU has FMA), for
    float32 or float64 scalars of one type; LLVM vectorizes loops of it."""
    if not (isinstance(a, types.Float) and a == b == c):
        return None
    sig = a(a, b, c)

    def codegen(context, builder, signature, args):
        ty = context.get_value_type(signature.args[0])
        fn = builder.module.declare_intrinsic("llvm.fma", [ty], ir.FunctionType(ty, [ty] * 3))
        return builder.call(fn, args)

    return sig, codegen


# =================================================================================
# short dot products, accumulated in float64: C = A · Bᵀ
# =================================================================================

DOT_ROWS = 4  # micro-tile: 4 rows of A × 4 rows of B, 16 accumulators of 8 doubles (16 of 32 zmm)
# ... and where the target has 16 vector registers (AVX2: an accumulator of 8 doubles is two of
# them), 2 rows of A × 4 rows of B: 16 registers of accumulators, where 4 × 4 spilled 32 to
# the stack.  The same sums in the same order (each score's lanes and tree do not depend on
# the micro-tile), so the same bits.
DOT_ROWS_A_NARROW = 2
_DLANES = 8
_D = ir.DoubleType()
_VD = ir.VectorType(_D, _DLANES)
_VF8 = ir.VectorType(_F, _DLANES)
_VI8 = ir.VectorType(_I32, _DLANES)
_VB8 = ir.VectorType(ir.IntType(1), _DLANES)


def _reduce_lanes(builder, vectors, lanes):
    """``len(vectors)`` vectors of ``lanes`` partial sums → vectors whose lanes hold the sums of
    ``vectors[0]``, ``vectors[1]``, … in order (``lanes`` per vector).

    A tree: two vectors whose lanes hold groups of ``w`` partial sums become one whose groups
    have ``w/2`` lanes — each group's two halves, shuffled side by side, added.  The order of
    the additions is fixed (the same bits on every call)."""
    lane_ty = ir.VectorType(_I32, lanes)
    level = [(v, [k]) for k, v in enumerate(vectors)]  # (vector, the sums its groups hold)
    width = lanes
    while width > 1:
        half = width // 2
        nxt = []
        for (x, ix), (y, iy) in zip(level[0::2], level[1::2]):
            lo, hi = [], []
            for base, groups in ((0, len(ix)), (lanes, len(iy))):
                for g in range(groups):
                    first = base + g * width
                    lo += list(range(first, first + half))
                    hi += list(range(first + half, first + width))
            lo_v = builder.shuffle_vector(x, y, ir.Constant(lane_ty, lo))
            hi_v = builder.shuffle_vector(x, y, ir.Constant(lane_ty, hi))
            nxt.append((builder.fadd(lo_v, hi_v), ix + iy))
        level = nxt
        width = half
    order = [k for _, ks in level for k in ks]
    assert order == list(range(len(vectors)))
    return [v for v, _ in level]


def _is_f32_matrix(x):
    return isinstance(x, types.Array) and x.ndim == 2 and x.dtype == types.float32


@intrinsic
def dot_tile_f64(typingctx, A, B, C):
    """``C[i, j] = Σ_d A[i, d]·B[j, d]`` (``C = A·Bᵀ``) accumulated in float64, rounded once to
    float32: the score products of short problems (``_cpu_primitives._short_rows``).

    Why: a float32 GEMM's rounding error in a score grows with ``D`` (MKL's ``sgemm`` sums
    the products in one chain: 2.2× the error of NumPy's 16-lane sum at D 64, 2.6× at D 128),
    and at a large ``scale`` that error is the output's largest; on short rows a few rows
    decide the maximum error, and even an error distributed as NumPy's own broke the 2×-naive
    rule by chance (1.9× at causal L 24 D 128, scale 2.5).  Here every product is exact in
    float64 and the sum's error is far below the final rounding (docs/performance.md).

    ``A (M, D)``, ``B (N, D)``, ``C (M, N)``: float32 with contiguous rows (any row stride);
    columns from a multiple of 8 on are read by masked loads (zeros past ``D``).  Rows come
    4 × 4 at a time (rows past ``M``/``N`` are read again as the last row and not stored);
    within a score, lane ``l`` sums the products ``d ≡ l (mod 8)`` in order, then a fixed
    tree adds the lanes.
    """
    if not (_is_f32_matrix(A) and _is_f32_matrix(B) and _is_f32_matrix(C)):
        return None
    sig = types.void(A, B, C)

    def codegen(context, builder, signature, args):
        a_arr, b_arr, c_arr = (context.make_array(t)(context, builder, a) for t, a in zip(signature.args, args))
        M = builder.extract_value(a_arr.shape, 0)
        D = builder.extract_value(a_arr.shape, 1)
        N = builder.extract_value(b_arr.shape, 0)
        sa = builder.extract_value(a_arr.strides, 0)
        sb = builder.extract_value(b_arr.strides, 0)
        sc = builder.extract_value(c_arr.strides, 0)
        intp = M.type
        zero_i, one_i = ir.Constant(intp, 0), ir.Constant(intp, 1)
        chunk = ir.Constant(intp, _DLANES)
        rows_a = DOT_ROWS if target_has("avx512f", context) else DOT_ROWS_A_NARROW
        rows = ir.Constant(intp, DOT_ROWS)
        nfull = builder.sdiv(D, chunk)  # whole 8-column chunks
        tail = builder.sub(D, builder.mul(nfull, chunk))
        tail_v = _splat(builder, builder.trunc(tail, _I32), _VI8)
        tail_mask = builder.icmp_signed("<", ir.Constant(_VI8, list(range(_DLANES))), tail_v)
        masked_load = builder.module.declare_intrinsic(
            "llvm.masked.load.v8f32.p0v8f32", fnty=ir.FunctionType(_VF8, [_VF8.as_pointer(), _I32, _VB8, _VF8])
        )
        fma = builder.module.declare_intrinsic("llvm.fma.v8f64", fnty=ir.FunctionType(_VD, [_VD] * 3))
        zero_f = ir.Constant(_VF8, [0.0] * _DLANES)
        zero_d = ir.Constant(_VD, [0.0] * _DLANES)
        accs = [cgutils.alloca_once(builder, _VD) for _ in range(rows_a * DOT_ROWS)]
        i8p = ir.IntType(8).as_pointer()

        def ptr_at(data, byte_offset, ty):
            return builder.bitcast(builder.gep(builder.bitcast(data, i8p), [byte_offset]), ty.as_pointer())

        def row_offsets(first, count, n_rows, stride):
            last = builder.sub(n_rows, one_i)
            offs = []
            for k in range(count):
                row = builder.add(first, ir.Constant(intp, k))
                row = builder.select(builder.icmp_signed("<", row, n_rows), row, last)
                offs.append(builder.mul(row, stride))
            return offs

        def step(a_offs, b_offs, col_bytes, load):
            def widen(data, off):
                return builder.fpext(load(ptr_at(data, builder.add(off, col_bytes), _VF8)), _VD)

            a_v = [widen(a_arr.data, o) for o in a_offs]
            b_v = [widen(b_arr.data, o) for o in b_offs]
            for i in range(rows_a):
                for j in range(DOT_ROWS):
                    slot = accs[i * DOT_ROWS + j]
                    builder.store(builder.call(fma, [a_v[i], b_v[j], builder.load(slot)]), slot)

        m_blocks = builder.sdiv(builder.add(M, ir.Constant(intp, rows_a - 1)), ir.Constant(intp, rows_a))
        n_blocks = builder.sdiv(builder.add(N, ir.Constant(intp, DOT_ROWS - 1)), rows)
        with cgutils.for_range(builder, m_blocks) as ib:
            i0 = builder.mul(ib.index, ir.Constant(intp, rows_a))
            a_offs = row_offsets(i0, rows_a, M, sa)
            with cgutils.for_range(builder, n_blocks) as jb:
                j0 = builder.mul(jb.index, rows)
                b_offs = row_offsets(j0, DOT_ROWS, N, sb)
                for slot in accs:
                    builder.store(zero_d, slot)
                with cgutils.for_range(builder, nfull) as kc:
                    col_bytes = builder.mul(kc.index, ir.Constant(intp, _DLANES * 4))
                    step(a_offs, b_offs, col_bytes, lambda p: builder.load(p, align=4))
                with builder.if_then(builder.icmp_signed(">", tail, zero_i)):
                    col_bytes = builder.mul(nfull, ir.Constant(intp, _DLANES * 4))
                    step(a_offs, b_offs, col_bytes,
                         lambda p: builder.call(masked_load, [p, ir.Constant(_I32, 4), tail_mask, zero_f]))
                sums = _reduce_lanes(builder, [builder.load(slot) for slot in accs], _DLANES)
                for half, vec in enumerate(sums):  # vector ``half`` holds scores 8·half … 8·half + 7
                    rounded = builder.fptrunc(vec, _VF8)
                    for lane in range(_DLANES):
                        k = half * _DLANES + lane
                        i, j = divmod(k, DOT_ROWS)
                        row = builder.add(i0, ir.Constant(intp, i))
                        col = builder.add(j0, ir.Constant(intp, j))
                        inside = builder.and_(builder.icmp_signed("<", row, M), builder.icmp_signed("<", col, N))
                        with builder.if_then(inside, likely=True):
                            off = builder.add(builder.mul(row, sc), builder.mul(col, ir.Constant(intp, 4)))
                            builder.store(builder.extract_element(rounded, ir.Constant(_I32, lane)), ptr_at(c_arr.data, off, _F))
        return context.get_dummy_value()

    return sig, codegen
