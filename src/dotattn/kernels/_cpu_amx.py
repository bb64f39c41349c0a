"""The bfloat16 forward's two tile products on Intel AMX, written here instead of called in MKL.

MKL's ``cblas_gemm_bf16bf16f32`` (the bfloat16 path's GEMM, :mod:`._cpu_isa`) repacks both
operands on every call: per 256 × 256 tile at D 64 it took 15–17 µs for ``Sᵀ = K·Qᵀ`` and
14–16 µs for ``acc += P·V`` — more than half of a tile, while the AMX unit itself needs
≈ 2.7 µs for each (512 ``tdpbf16ps`` of 16 × 16 × 32 at ≈ 5.2 ns).  Here the operands are laid
out once so that the tile unit reads them as they lie:

* ``Sᵀ = K·Qᵀ``: A = the K tile as packed (rows of D bfloat16); B = Qᵀ in the unit's pair
  layout ("VNNI": row ``k/2`` holds, per query, the pair ``(q[k], q[k+1])``) — which is Q's
  bits read as uint32 and transposed: :func:`pack_q`, once per query tile.
* ``accᵀ += Vᵀ·P``: A = Vᵀ (the forward packs V transposed, once per call); B = P in pairs
  of keys, which the softmax pass writes directly (``_cpu_primitives._exp2_sum_bf16``
  with ``vnni``); the accumulator is kept transposed, ``(Dv, BQ)``.

Every address the tile unit touches is 64-byte aligned (the kernels' buffers, the packed
K/V): a tile row split across two cache lines ran the score product 1.7× slower.

The instructions are LLVM's AMX intrinsics; the functions using them carry the
``amx-tile,amx-bf16`` target features themselves, so they compile on every x86 CPU and run
only where :func:`dotattn.kernels._cpu_isa.amx_tiles` said yes (which also asked the OS for
the AMX register state).  Operands: bfloat16 bits as uint16/uint32 arrays; sizes multiples
of 32 (``cpu.prepare`` takes this path only then).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._cpu_cache import install_locator

install_locator()  # before any @njit(cache=True) below: the kernels cache beside the package

_JIT_CACHE = True
_i8, _i64 = ir.IntType(8), ir.IntType(64)
_ptr = _i8.as_pointer()


def _amx_function(context, builder):
    """Give the function being compiled the AMX target features (on top of the host's)."""
    features = getattr(context.codegen(), "_tm_features", "") or ""
    extra = "+amx-tile,+amx-bf16"
    set.add(builder.function.attributes, f'"target-features"="{features},{extra}"' if features else f'"target-features"="{extra}"')


def _call(builder, name, argtypes, args):
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), argtypes), name)
    builder.call(fn, args)


@intrinsic
def _tile_config(typingctx, address):
    """``ldtilecfg``: the 64-byte configuration at ``address``."""

    def codegen(context, builder, signature, args):
        _amx_function(context, builder)
        _call(builder, "llvm.x86.ldtilecfg", [_ptr], [builder.inttoptr(args[0], _ptr)])
        return context.get_dummy_value()

    return types.void(types.int64), codegen


@intrinsic
def _tile_release(typingctx):
    def codegen(context, builder, signature, args):
        _amx_function(context, builder)
        _call(builder, "llvm.x86.tilerelease", [], [])
        return context.get_dummy_value()

    return types.void(), codegen


def _tile_op(name, tile):
    """``tileloadd``/``tilestored`` of tile register ``tile`` (an immediate) at (address, row stride in bytes)."""

    @intrinsic
    def op(typingctx, address, stride):
        def codegen(context, builder, signature, args):
            _amx_function(context, builder)
            _call(builder, name, [_i8, _ptr, _i64], [ir.Constant(_i8, tile), builder.inttoptr(args[0], _ptr), args[1]])
            return context.get_dummy_value()

        return types.void(types.int64, types.int64), codegen

    return op


def _tile_zero(tile):
    @intrinsic
    def op(typingctx):
        def codegen(context, builder, signature, args):
            _amx_function(context, builder)
            _call(builder, "llvm.x86.tilezero", [_i8], [ir.Constant(_i8, tile)])
            return context.get_dummy_value()

        return types.void(), codegen

    return op


def _dot(c, a, b):
    """``tdpbf16ps``: tile ``c`` (16 × 16 float32) += tile ``a`` (16 × 32 bf16) · tile ``b`` (16 pairs × 16)."""

    @intrinsic
    def op(typingctx):
        def codegen(context, builder, signature, args):
            _amx_function(context, builder)
            _call(builder, "llvm.x86.tdpbf16ps", [_i8] * 3, [ir.Constant(_i8, t) for t in (c, a, b)])
            return context.get_dummy_value()

        return types.void(), codegen

    return op


_load = [_tile_op("llvm.x86.tileloadd64", t) for t in range(8)]
_store = [_tile_op("llvm.x86.tilestored64", t) for t in range(4)]
_load0, _load1, _load2, _load3, _load4, _load5, _load6, _load7 = _load
_store0, _store1, _store2, _store3 = _store
_zero0, _zero1, _zero2, _zero3 = (_tile_zero(t) for t in range(4))
# 2 × 2 blocking: C tiles 0–3, A tiles 4, 5 (two row blocks), B tiles 6, 7 (two column blocks)
_dot046, _dot147, _dot256, _dot357 = _dot(0, 4, 6), _dot(1, 4, 7), _dot(2, 5, 6), _dot(3, 5, 7)
# D = 64, Q resident: C tiles 0, 1 (two column blocks), A tiles 2, 3 (the two 32-wide halves
# of 16 keys), B tiles 4, 5 (columns j, both halves) and 6, 7 (columns j + 16)
_dot024, _dot036, _dot125, _dot137 = _dot(0, 2, 4), _dot(0, 3, 5), _dot(1, 2, 6), _dot(1, 3, 7)


@njit(cache=_JIT_CACHE)
def tile_config():
    """The configuration every product here uses: palette 1, tiles 0–7 of 16 rows × 64 bytes."""
    cfg = np.zeros(64, dtype=np.uint8)
    cfg[0] = 1
    for t in range(8):
        cfg[16 + 2 * t] = 64
        cfg[48 + t] = 16
    return cfg


@njit(cache=_JIT_CACHE)
def pack_q(Qs, Qv):
    """``Qv (D/2, BQ)`` uint32 = Q's bits as pairs, transposed: the B operand of ``K·Qᵀ``."""
    BQ, D = Qs.shape
    Q32 = Qs.reshape(BQ * D).view(np.uint32)
    half = D // 2
    if half <= 32:  # query by query: 2.8 µs a 256-row tile at D 64 (16 queries at a time: 6.0)
        for n in range(BQ):
            for k in range(half):
                Qv[k, n] = Q32[n * half + k]
        return
    # 16 queries at a time: query by query, the 1 KiB-strided writes to D/2 rows aliased in L1
    # at D 128 (54 µs a 256-row tile against 32, same process)
    for n0 in range(0, BQ, 16):
        for k in range(half):
            qrow = Qv[k]
            for n in range(n0, min(n0 + 16, BQ)):
                qrow[n] = Q32[n * half + k]


@njit(cache=_JIT_CACHE, nogil=True)
def scores(k_addr, k_ld, BK, D, q_addr, BQ, s_addr, s_ld, cfg):
    """``Sᵀ (BK, BQ) = K · Qᵀ`` in float32: K rows at ``k_addr`` (``k_ld`` bytes apart), Q as
    :func:`pack_q` made it (``(D/2, BQ)`` uint32, rows ``4·BQ`` bytes), Sᵀ rows ``s_ld`` bytes
    apart.  BK, BQ and D multiples of 32.

    At D = 64 the four B tiles of a 32-query column block stay loaded while all key rows
    pass (half the tile loads of the 2 × 2 scheme): 9.4–10.6 µs a 256 × 256 tile against
    14–15 µs 2 × 2 and 16–26 µs for MKL (same process, load 1–1.5).
    """
    _tile_config(cfg.ctypes.data)
    q_ld = BQ * 4
    if D == 64:
        for j in range(0, BQ, 32):
            _load4(q_addr + j * 4, q_ld)
            _load5(q_addr + 16 * q_ld + j * 4, q_ld)
            _load6(q_addr + (j + 16) * 4, q_ld)
            _load7(q_addr + 16 * q_ld + (j + 16) * 4, q_ld)
            for i in range(0, BK, 16):
                _zero0()
                _zero1()
                _load2(k_addr + i * k_ld, k_ld)
                _load3(k_addr + i * k_ld + 64, k_ld)
                _dot024()
                _dot036()
                _dot125()
                _dot137()
                c = s_addr + i * s_ld + j * 4
                _store0(c, s_ld)
                _store1(c + 64, s_ld)
    else:
        for i in range(0, BK, 32):
            for j in range(0, BQ, 32):
                _zero0()
                _zero1()
                _zero2()
                _zero3()
                for kk in range(0, D, 32):
                    _load4(k_addr + i * k_ld + kk * 2, k_ld)
                    _load5(k_addr + (i + 16) * k_ld + kk * 2, k_ld)
                    _load6(q_addr + (kk // 2) * q_ld + j * 4, q_ld)
                    _load7(q_addr + (kk // 2) * q_ld + (j + 16) * 4, q_ld)
                    _dot046()
                    _dot147()
                    _dot256()
                    _dot357()
                c = s_addr + i * s_ld + j * 4
                _store0(c, s_ld)
                _store1(c + 64, s_ld)
                _store2(c + 16 * s_ld, s_ld)
                _store3(c + 16 * s_ld + 64, s_ld)
    _tile_release()


@njit(cache=_JIT_CACHE, nogil=True)
def values(v_addr, v_ld, Dv, BK, p_addr, BQ, c_addr, c_ld, cfg):
    """``accᵀ (Dv, BQ) += Vᵀ · P`` in float32: Vᵀ rows at ``v_addr`` (``v_ld`` bytes apart, BK
    keys each), P in key pairs (``(BK/2, BQ)`` uint32, rows ``4·BQ`` bytes), accᵀ rows ``c_ld``
    bytes apart.  Dv, BK and BQ multiples of 32."""
    _tile_config(cfg.ctypes.data)
    p_ld = BQ * 4
    for i in range(0, Dv, 32):
        for j in range(0, BQ, 32):
            c = c_addr + i * c_ld + j * 4
            _load0(c, c_ld)
            _load1(c + 64, c_ld)
            _load2(c + 16 * c_ld, c_ld)
            _load3(c + 16 * c_ld + 64, c_ld)
            for kk in range(0, BK, 32):
                _load4(v_addr + i * v_ld + kk * 2, v_ld)
                _load5(v_addr + (i + 16) * v_ld + kk * 2, v_ld)
                _load6(p_addr + (kk // 2) * p_ld + j * 4, p_ld)
                _load7(p_addr + (kk // 2) * p_ld + (j + 16) * 4, p_ld)
                _dot046()
                _dot147()
                _dot256()
                _dot357()
            _store0(c, c_ld)
            _store1(c + 64, c_ld)
            _store2(c + 16 * c_ld, c_ld)
            _store3(c + 16 * c_ld + 64, c_ld)
    _tile_release()

