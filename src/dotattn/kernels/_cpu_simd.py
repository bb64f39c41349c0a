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

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LANES = 16
_F = ir.FloatType()
_I32 = ir.IntType(32)
_VF = ir.VectorType(_F, LANES)
_VI = ir.VectorType(_I32, LANES)
_VB = ir.VectorType(ir.IntType(1), LANES)

# exp2_fraction's coefficients (_cpu_primitives), highest degree first
_EXP2_COEFFS = (
    1.5403530393381606e-4,
    1.3333558146428443e-3,
    9.618129107628477e-3,
    5.550410866482158e-2,
    0.2402265069591007,
    0.6931471805599453,
    1.0,
)


def _splat(builder, value, vty=_VF):
    undef = ir.Constant(vty, ir.Undefined)
    first = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, undef, ir.Constant(_VI, [0] * LANES))


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
    """``2**(s·mul − sub)`` for exponents ≤ 0, as :func:`_cpu_primitives._exp2_core_f32`."""
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


def _tile_args(context, builder, sig, args):
    st = context.make_array(sig.args[0])(context, builder, args[0])
    rows = builder.extract_value(st.shape, 0)
    row_stride = builder.extract_value(st.strides, 0)
    return st.data, rows, row_stride


def _is_f32_tile(ST):
    return isinstance(ST, types.Array) and ST.ndim == 2 and ST.dtype == types.float32


@intrinsic
def exp2_tile16(typingctx, ST, mul, sub, row_sum, nvec, add_sum):
    """``ST[c, r] = 2**(ST[c, r]·mul − sub[r])`` for ``r < nvec·16``; with ``add_sum`` (a
    compile-time bool literal) also ``row_sum[r] += Σ_c ST[c, r]`` in the same pass.

    Row by row, as the plain loops: the tile streams from L2 in address order (a column
    strip at a time, 1 KiB apart, ran no faster); ``sub`` and ``row_sum`` stay in L1.
    """
    if not _is_f32_tile(ST) or not isinstance(add_sum, types.BooleanLiteral):
        return None
    sig = types.void(ST, mul, sub, row_sum, nvec, add_sum)
    with_sum = add_sum.literal_value

    def codegen(context, builder, signature, args):
        data, rows, row_stride = _tile_args(context, builder, signature, args)
        mul_v = _splat(builder, context.cast(builder, args[1], signature.args[1], types.float32))
        sub_data = context.make_array(signature.args[2])(context, builder, args[2]).data
        sum_data = context.make_array(signature.args[3])(context, builder, args[3]).data
        nvec_i = context.cast(builder, args[4], signature.args[4], types.intp)
        with cgutils.for_range(builder, rows) as outer:
            row_off = builder.mul(outer.index, row_stride)
            with cgutils.for_range(builder, nvec_i) as inner:
                col_bytes = builder.mul(inner.index, ir.Constant(inner.index.type, LANES * 4))
                ptr = _vector_ptr(builder, data, builder.add(row_off, col_bytes))
                sub_v = _load(builder, _vector_ptr(builder, sub_data, col_bytes))
                p = _exp2_vector(builder, _load(builder, ptr), mul_v, sub_v)
                _store(builder, p, ptr)
                if with_sum:
                    sum_ptr = _vector_ptr(builder, sum_data, col_bytes)
                    _store(builder, builder.fadd(_load(builder, sum_ptr), p), sum_ptr)
        return context.get_dummy_value()

    return sig, codegen


ROWS_PER_VISIT = 2  # tile rows per visit of the column vectors in exp2_max_tile16 (4 ran no faster)


@intrinsic
def exp2_max_tile16(typingctx, ST, mul, sub, tile_sum, tile_max, nvec):
    """:func:`exp2_tile16` with the sum, and ``tile_max[r] = max(tile_max[r], max_c ST[c, r])``
    of the scores read (before they are overwritten) in the same pass: the forward's lazy
    rescaling (:func:`._cpu_primitives._exp2_sum_max`) exponentiates against the running
    shift and checks the tile's maximum afterwards, so the separate max pass over the tile
    goes.  NaN is sticky in ``tile_max`` (as :func:`._cpu_primitives._col_max`): a NaN score
    must reach the caller.
    """
    if not _is_f32_tile(ST):
        return None
    sig = types.void(ST, mul, sub, tile_sum, tile_max, nvec)

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
                    p = _exp2_vector(builder, s, mul_v, sub_v)
                    _store(builder, p, ptr)
                    vsum = builder.fadd(vsum, p)
                _store(builder, vmax, max_ptr)
                _store(builder, vsum, sum_ptr)

        group = ir.Constant(rows.type, ROWS_PER_VISIT)
        groups = builder.sdiv(rows, group)
        with cgutils.for_range(builder, groups) as outer:
            rows_at(builder.mul(outer.index, group), ROWS_PER_VISIT)
        done = builder.mul(groups, group)
        with cgutils.for_range(builder, builder.sub(rows, done)) as rest:
            rows_at(builder.add(done, rest.index), 1)
        return context.get_dummy_value()

    return sig, codegen
