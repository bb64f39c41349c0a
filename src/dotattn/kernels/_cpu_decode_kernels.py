"""Numba kernels of split-KV decoding ("flash decoding") for the ``cpu`` backend.

Flash decoding (Dao, Haziza, Massa & Sizov, 2023) on top of the online softmax (Milakov &
Gimelshein, 2018): each sequence's visible keys are cut into chunks of ``SPLIT`` positions,
``[c·SPLIT, (c+1)·SPLIT)``; one work item = (sequence, K/V head, chunk) computes the chunk's
partial output and LSE for every query row of that K/V head (the GQA group folded into the
rows, so each K/V row is read once); items run on all cores; then the parts of each
(sequence, K/V head) are merged in chunk order with the math of
:func:`dotattn.merge_attention_states` (``src/dotattn/merge.py``), inlined here.  Nothing in
an item depends on the batch, the capacity or the page layout, hence bitwise invariance.

The cache is read in place through a flat 1-D view plus element strides (page, head, slot).
float32 calls run the chunk as 16-lane loops written in LLVM IR (section below; head dims
that are not multiples of 16 — SmolLM2's 64 and the common 128 are — with a masked last
piece): S = Q·Kᵀ 16 keys at a time,
P·V with register accumulators, 16-bit rows widened in registers, rows found through the
chunk's row offsets (any layout, same bits) and asked for ahead of use.  Float caches with
more than SIMD_MAX_ROWS_FLOAT folded rows (where a register-blocked GEMM wins) and float64
calls go to BLAS (a chunk of consecutive rows in place, other chunks gathered into one
contiguous block first); a 16-bit cache always computes in float32, so always on the 16-lane
loops (where the chunk allows, scores, an online softmax and P·V in one pass per block of 16
keys: FUSED16; float32 caches too, FUSED32).  Every ``P·V`` sums in blocks of keys (PV_SUM_KEYS,
PV_GEMM_KEYS), so that an attention sink's term does not swallow the small ones.  Only
positions below each sequence's length are read.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from ._cpu_cache import install_locator
from ._cpu_sync import ENTERED, _fetch_add, _fetch_add_acq_rel, _store_release, finish_partners, partner_done
from ._entry_order import load_callee_first
from ._cpu_primitives import _np_matmul, exp2_fraction
from ._cpu_simd import LOG2E, _exp2_vector, _intrinsic_fn, _tanh_vector, target_has

install_locator()  # before any @njit(cache=True) below: the kernels cache beside the package

import os as _os
_JIT_CACHE = _os.environ.get("DOTATTN_DECODE_NOCACHE") is None
LN2 = 0.6931471805599453  # ln(2)
KIND_FLOAT, KIND_BF16, KIND_F16 = 0, 1, 2
# a bfloat16 cache read with a bfloat16 q (cpu_decode.bf16_dot): the kernels' entries take q
# unscaled (its values exact bfloat16) and the scale apart; the scores of the 16-lane loop are
# ``scale · (q·k)`` by ``vdpbf16ps`` (_scores_dot16).  Items turn it back into KIND_BF16.
KIND_BF16_DOT = 3
ROLE_SHARED, ROLE_FRONT, ROLE_BACK = 0, 1, 2  # which item a run_items ticket means
# 16-bit caches: how many key rows ahead the row-by-row loops ask for the cache lines
PREFETCH_ROWS = 16
# the 16-lane scores loop asks for the key rows PREFETCH_K_AHEAD blocks of 16 ahead (llvm.prefetch
# locality: 3 = L1, 2 = L2, 0 = not at all) and for the block's value rows (into L2)
PREFETCH_K_AHEAD, PREFETCH_K_LOCALITY, PREFETCH_V = 1, 3, True
# PREFETCH_NEXT_K: the thread's next work item is asked for (into L2) while an item runs — only
# for calls with at least PREFETCH_NEXT_MIN_BYTES of K/V: on smaller ones, cache-resident when
# called again and again, the requests cost more than they bring (SmolLM2's shape at 4k, 6 MB,
# L3-resident, one thread: 0.46 → 0.49 ms).  First (commit 4a6faa0) its key rows, spread over the
# P·V passes, while the scores pass streamed this item's values: B1 32k pool float16 8.63 → 7.94
# ms, bfloat16 8.36 → 7.92, float32 13.21 → 12.58 (decode_ab.py, load 1.2–1.4).
# NEXT_SCHEME: the *whole* next item — its key rows by the scores pass (in place of this block's
# values), its value rows by the P·V passes (in place of its keys) — so an item computes from L2
# while memory fetches the next one.  A software request holds one of the core's ≈ 16 L1 fill
# buffers until its line arrives, so a core streams at most ≈ 16 lines per memory latency
# (10.4–11.1 GB/s measured at B1 32k, one thread, every dtype; 8.6–9.2 from DRAM at B8 32k): both
# passes are bound by that, and the scores pass's requests go one line per row beside each 16-lane
# piece's FMAs (a burst per block: slower).  decode_ab.py one thread, load 1.3 (00:42, 1 Dec):
# B1 32k float16 13.88 → 12.94 ms, bfloat16 13.01 → 12.04; float32 the same; B8 32k float16
# 122.3 → 116.2 (docs/decoding-log.md, "The next work item asked for whole").
# The bytes counted are the whole call's K/V (every sequence's; a sequence's own before 1 Dec
# 18:50): what stays in the last-level cache between calls is the call's footprint, and on this
# host a process gets ≈ 16–32 MB of it (NumPy's sum: 16 MiB at 23–25 GB/s, 64 MiB at 8–9), so
# B8 4k's 128 MiB (16 MiB a sequence) streams from DRAM: B8 4k both cores float16 10.77 → 10.09 ms,
# bfloat16 10.72 → 9.65, float32 16.11 → 14.18; one thread float16 17.08 → 15.99, bfloat16
# 17.41 → 16.20 (same bits; docs/decoding-log.md, "16-bit decode at B8 and 32k").  B1 4k
# (16 MiB, partly cache-resident) stays under it: with the scheme it was 0.94–1.02×.
# With AVX-512 the threshold is 24 MiB: on the Zen 4 (32 MiB L3) B1 4k float32 (32 MiB of K/V)
# streamed at half speed without the scheme — bench regime 1.49–1.52 → 0.71–0.72 ms, one thread
# 4.64 → 2.19 (same bits; docs/decoding-log.md, "The next item asked for at 32 MiB on the
# Zen 4") — and 16 MiB calls were level with it; on the AMX host of 2 Dec (480 MiB L3, of which a
# process got ≈ 32–48) the call was level with an 8 MiB threshold (0.949 against 0.928 ms).  The
# AVX2 Zen 3 ran that call slower with it (1.05 → 1.30 ms): 64 MiB there.  Hints only: the same
# bits either way (tests/decoding/test_cpu_next_item.py).
PREFETCH_NEXT_K = True
PREFETCH_NEXT_MIN_BYTES = (24 << 20) if target_has("avx512f") else (64 << 20)
NEXT_SCHEME = True


# =================================================================================
# float16 → float32
# =================================================================================


@intrinsic
def _half_to_float(typingctx, x):
    """The float32 value of float16 bits ``x`` (uint16): one ``fpext half → float``.

    Numba has no float16 on CPU; LLVM has, and vectorizes the conversion (F16C /
    AVX-512: 8–16 values per instruction, exact, inf/NaN/subnormals included).  Other
    argument types are plain casts (the kernel's branches for float caches compile them but
    never run them).
    """
    sig = types.float32(x)

    def codegen(context, builder, signature, args):
        (value,) = args
        if signature.args[0] == types.uint16:
            return builder.fpext(builder.bitcast(value, ir.HalfType()), ir.FloatType())
        return context.cast(builder, value, signature.args[0], types.float32)

    return sig, codegen


@intrinsic
def _float_to_half_bits(typingctx, x):
    """The float16 bits (uint16) of float32 ``x`` rounded to nearest even: one ``fptrunc float →
    half`` (F16C / AVX-512: ``vcvtps2ph``), overflow to ±inf, subnormals exact."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        (value,) = args
        return builder.bitcast(builder.fptrunc(value, ir.HalfType()), ir.IntType(16))

    return sig, codegen


@njit(cache=_JIT_CACHE, nogil=True)
def half_from_float(src, dst):
    """``dst`` (float16 bits, uint16) = ``src`` (float32) as NumPy's ``astype(np.float16)`` gives
    it, bit for bit: round to nearest even, overflow to ±inf, and a NaN as NumPy's own
    conversion writes it (sign, the significand's top 10 bits, at least one of them set) —
    ``vcvtps2ph`` would quiet a signaling one.  The decode output of a float16 call: NumPy's cast
    has no vector loop here and took 21.6 µs for B1's 4,096 values (warm; this loop ≈ 1).
    ``src`` and ``dst`` are flat, of one length."""
    bits = src.view(np.uint32)
    for i in range(src.shape[0]):
        x = src[i]
        if x != x:
            b = bits[i]
            h = np.uint16(0x7C00 | ((b & np.uint32(0x007FFFFF)) >> np.uint32(13)))
            if h == np.uint16(0x7C00):
                h = np.uint16(0x7C01)
            dst[i] = h | np.uint16((b >> np.uint32(16)) & np.uint32(0x8000))
        else:
            dst[i] = _float_to_half_bits(x)


@njit(cache=_JIT_CACHE, nogil=True)
def float_from_half_scaled(src, scale, dst):
    """``dst`` (float32) = ``src`` (float16 bits, uint16) · ``scale`` (float32): NumPy's
    ``np.multiply(q, scale, dtype=np.float32)`` of a float16 q, bit for bit (the conversion is
    exact, one float32 rounding of the product) — the decode call's scaled q, whose NumPy cast
    took 14 µs for B1's 4,096 values (warm).  Flat arrays of one length."""
    for i in range(src.shape[0]):
        dst[i] = _half_to_float(src[i]) * scale


@intrinsic
def _prefetch(typingctx, arr, index):
    """Ask the CPU to start loading ``arr[index]``'s cache line (``llvm.prefetch``: a hint
    that never faults, so an index past the end is harmless)."""
    sig = types.void(arr, index)

    def codegen(context, builder, signature, args):
        ary_t = signature.args[0]
        ary = context.make_array(ary_t)(context, builder, args[0])
        ptr = builder.gep(ary.data, [args[1]])
        i8p = ir.IntType(8).as_pointer()
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(
            ir.VoidType(), [i8p, ir.IntType(32), ir.IntType(32), ir.IntType(32)]))
        builder.call(fn, [builder.bitcast(ptr, i8p), ir.Constant(ir.IntType(32), 0),
                          ir.Constant(ir.IntType(32), 3), ir.Constant(ir.IntType(32), 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=_JIT_CACHE, inline="always")
def _prefetch_row(flat, st, table, b, hk, pg, slot, width):
    """Start loading the cache row at (page ``pg``, ``slot``) of K/V head ``hk``."""
    u = np.uint64(table[b, pg] * st[0] + hk * st[1] + slot * st[2])
    for line in range(0, width, 64 // flat.itemsize):  # one hint per 64-byte line
        _prefetch(flat, u + np.uint64(line))


# =================================================================================
# 16-lane loops written as LLVM IR: scores and P·V of a chunk read through row offsets
# =================================================================================
#
# A decode chunk is small work on a stream of rows: R (the folded GQA group, 3 for SmolLM2,
# 4 for the issue's shape) query rows against ≤ SPLIT key rows.  BLAS's small-matrix GEMM
# spent ≈ 34 ns per (key, head) at SmolLM's shape on data already in L2 — as long as reading
# the rows from DRAM — and the row-by-row Numba loops of 16-bit caches were compute-bound
# (59–69 ns per key).  Numba's LLVM vectorizes plain loops with 8 lanes only (_cpu_simd.py),
# so these two loops are written with <16 x float> vectors:
#
# * scores, 16 keys at a time: one vector accumulator per (query row, key) of a register block
#   of 4 rows × 4 keys (2 × 8, 1 × 16) (Σ over D in 16-lane pieces, FMAs in order), then the
#   block's 16 accumulators are summed across lanes in one transposing tree (15 adds, 30
#   two-source shuffles), giving its 16 scores as one vector; 16-bit rows are widened in
#   registers (float16: fpext; bfloat16: a shift);
# * P·V, four query rows × four 16-lane pieces of the output at a time, accumulators in
#   registers, every key's weight broadcast (p = 0 included: the caller checks the output
#   and redoes a chunk whose output is not finite key by key, skipping p = 0 — the NaN
#   policy of the BLAS route).
#
# Rows are found through a per-chunk array of element offsets (one per key, computed from the
# page table), so every layout — contiguous, paged, "blhd" — runs the same arithmetic on the
# same values: the same bits wherever the sequence sits.

_LANES = 16
_IRF = ir.FloatType()
_IRI16 = ir.IntType(16)
_IRI32 = ir.IntType(32)
_IRI64 = ir.IntType(64)
_V16F = ir.VectorType(_IRF, _LANES)
_V16H = ir.VectorType(ir.HalfType(), _LANES)
_V16I16 = ir.VectorType(_IRI16, _LANES)
_V16I32 = ir.VectorType(_IRI32, _LANES)


def _ir_i64(context, builder, value, typ):
    return context.cast(builder, value, typ, types.int64)


def _ir_vec_load(builder, data, index, variant):
    """The 16 elements at ``data[index:]`` as <16 x float> (``variant``: "f32", "bf16", "f16")."""
    if variant == "f32":
        ptr = builder.bitcast(builder.gep(data, [index]), _V16F.as_pointer())
        return builder.load(ptr, align=4)
    ptr = builder.bitcast(builder.gep(data, [index]), _V16I16.as_pointer())
    raw = builder.load(ptr, align=2)
    if variant == "f16":
        return builder.fpext(builder.bitcast(raw, _V16H), _V16F)
    wide = builder.shl(builder.zext(raw, _V16I32), ir.Constant(_V16I32, [16] * _LANES))
    return builder.bitcast(wide, _V16F)


class _BFloat(ir.Type):
    """LLVM's ``bfloat`` (llvmlite has no such type; only its name is needed here)."""

    def _to_string(self):
        return "bfloat"


_V32BF = ir.VectorType(_BFloat(), 2 * _LANES)


def _ir_pairs_load(builder, data, index):
    """The 32 bfloat16 values at ``data[index:]`` (uint16 bits) as ``<32 x bfloat>``."""
    ptr = builder.bitcast(builder.gep(data, [index]), _V32BF.as_pointer())
    return builder.load(ptr, align=2)


def _ir_dpbf16(builder):
    """``vdpbf16ps``: ``acc[i] + a[2i+1]·b[2i+1] + a[2i]·b[2i]`` in float32 (the products of two
    bfloat16 values are exact in float32; inputs and results below 2^-126 count as 0)."""
    return builder.module.declare_intrinsic(
        "llvm.x86.avx512bf16.dpbf16ps.512", fnty=ir.FunctionType(_V16F, [_V16F, _V32BF, _V32BF]))


def _bf16_dot_function(context, builder):
    """Let the function being compiled (the ``_scores_dot`` overload) hold ``vdpbf16ps``.

    LLVM lowers ``llvm.x86.avx512bf16.dpbf16ps.512`` only for a target with avx512bf16; on
    another (an AVX2-only Zen 3, ``znver3``) it aborts the whole process ("Do not know how to
    split the result of this operator!") although cpu_decode.BF16_DOT never calls the path
    there.  Where the compile target lacks the feature, the function gets the AVX-512 target
    features itself, as _cpu_amx's functions do: it compiles on any x86 host, and LLVM does
    not inline a callee with more features than its caller, so the instructions stay in this
    function, which runs only where BF16_DOT said yes.  Chosen over an emulation in plain IR
    (bfloat16 shifted up, two exact products added in the instruction's order) because that
    would be a second arithmetic path no CPU ever runs, and whose bits (the instruction's
    flushing of denormals) could not be checked against the instruction here.  Where the
    target has avx512bf16 nothing changes: the same IR and machine code as before."""
    if not target_has("avx512bf16", context):
        from ._cpu_amx import _AVX512, _amx_function

        _amx_function(context, builder, _AVX512)


def _ir_fma(builder):
    return builder.module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(_V16F, [_V16F] * 3))


def _ir_splat(builder, value):
    undef = ir.Constant(_V16F, ir.Undefined)
    first = builder.insert_element(undef, value, ir.Constant(_IRI32, 0))
    return builder.shuffle_vector(first, undef, ir.Constant(_V16I32, [0] * _LANES))


def _ir_lane_sums(builder, vecs, lanes=_LANES):
    """``[Σ lanes of vecs[k] for k < lanes]`` as one vector (lane k ← vecs[k]): a transposing
    tree — each level adds the two halves of every lane group of a pair of vectors, halving the
    groups (``lanes`` vectors of ``lanes`` floats, 16 or 8)."""
    ity = ir.VectorType(_IRI32, lanes)
    labels = [[k] * lanes for k in range(len(vecs))]
    vecs = list(vecs)
    g = lanes
    while g > 1:
        half = g // 2
        first = [gi * g + j for gi in range(lanes // g) for j in range(half)]
        second = [gi * g + half + j for gi in range(lanes // g) for j in range(half)]
        nv, nl = [], []
        for i in range(0, len(vecs), 2):
            a, b = vecs[i], vecs[i + 1]
            xi = first + [lanes + j for j in first]
            yi = second + [lanes + j for j in second]
            x = builder.shuffle_vector(a, b, ir.Constant(ity, xi))
            y = builder.shuffle_vector(a, b, ir.Constant(ity, yi))
            nv.append(builder.fadd(x, y))
            la, lb = labels[i], labels[i + 1]
            nl.append([la[j] for j in first] + [lb[j] for j in first])
        vecs, labels = nv, nl
        g = half
    (last,), (lab,) = vecs, labels
    order = [lab.index(k) for k in range(lanes)]
    return builder.shuffle_vector(last, ir.Constant(last.type, ir.Undefined), ir.Constant(ity, order))


def _ir_variants(context, builder, flat_type, kind, emit):
    """Run ``emit(variant)`` for the cache's element type: float32, or (a runtime branch on the
    kind) bfloat16 / float16 bits."""
    if flat_type.dtype == types.float32:
        emit("f32")
        return
    is_f16 = builder.icmp_signed("==", kind, ir.Constant(_IRI64, KIND_F16))
    with builder.if_else(is_f16) as (then, otherwise):
        with then:
            emit("f16")
        with otherwise:
            emit("bf16")


def _simd_types_ok(q, flat, offs, out):
    return (
        isinstance(q, types.Array) and q.dtype == types.float32 and q.ndim == 1
        and isinstance(flat, types.Array) and flat.ndim == 1 and flat.dtype in (types.float32, types.uint16)
        and isinstance(offs, types.Array) and offs.dtype == types.int64
        and isinstance(out, types.Array) and out.dtype == types.float32
    )


def _ir_prefetch_rows(builder, data, bases, width, itemsize, locality):
    """Ask for the cache lines of the rows at ``data[base:base + width]`` (``llvm.prefetch``: a
    hint that never faults)."""
    i8p = ir.IntType(8).as_pointer()
    fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(
        ir.VoidType(), [i8p, _IRI32, _IRI32, _IRI32]))
    per_line = ir.Constant(_IRI64, 64 // itemsize)
    lines = builder.sdiv(builder.add(width, ir.Constant(_IRI64, 64 // itemsize - 1)), per_line)
    with cgutils.for_range(builder, lines) as line:
        step = builder.mul(line.index, per_line)
        for base in bases:
            ptr = builder.bitcast(builder.gep(data, [builder.add(base, step)]), i8p)
            builder.call(fn, [ptr, ir.Constant(_IRI32, 0), ir.Constant(_IRI32, locality), ir.Constant(_IRI32, 1)])


# S = Q·Kᵀ of a block of 16 keys as register blocks of (rows × keys) = (1 × 16), (2 × 8) or
# (4 × 4): every key row is loaded (16-bit rows widened) once per block of rows, straight from
# the cache, and each block's 16 accumulators are summed across lanes by one transposing tree
# (before: the 16 rows copied widened into an L1 buffer, then one tree per query row).  Each
# score is the same sum in the same order as before (FMAs over D's pieces in order, then the
# tree, whose shape does not depend on a vector's place in it): the same bits.  Cache-resident
# (B1, Hkv 8, 256 keys, D 128, Hq/Hkv 4; /tmp-style min of alternating calls, load 2.5), per key
# and K/V head: float16 44 → 36 ns, bfloat16 39 → 37, float32 67 → 58.


# The scores' register block where the compile target lacks AVX-512 (docs/decoding-log.md, "Register
# blocks for AVX2"): the 16 accumulators of 16 lanes of AVX-512's blocks are 32 ymm there, kept
# on the stack.  Instead: passes over D of at most SCORES_NARROW_ACCS accumulators of 8 lanes (one
# ymm each; 4 rows × 2 keys, 3 × 2, 2 × 4, 1 × 8), all the block's rows first (q read by the FMAs
# from L1, each key piece widened once a pass), a run-time loop over the block's keys (one copy
# of the pass per row count: the 16-bit decode kernel compiles in 150 s here, 564 s with a copy
# per key group), each pass asking for its own keys' request rows; the accumulators stored by
# index, then one 8-lane tree per row and 8 keys (half the shuffles of the 16-lane trees).  Lane
# j of an accumulator sums the products at d ≡ j (mod 8) in D's order: other bits than the
# 16-lane sums of AVX-512 targets, the same for a key wherever it sits (its pass and tree do not
# depend on its place in the block, nor on the row count).  _fused16 alone, 256 keys in L2, ns a
# key (medians of 9 × 200 calls alternated, Zen 3, 4 Dec), float16 / bfloat16: 16 accumulators of
# 16 lanes (fe8e755's first form) R 4 83 / 76; 4 of 16 lanes R 4 46 / 51, R 3 43 / 44, R 8 89 / 100;
# 8 of 8 lanes R 4 41 / 42, R 3 33 / 33, R 8 78 / 80.
SCORES_NARROW_ACCS = 8
# the narrow blocks (these, PV_NARROW_TILE's): None — where the compile target lacks avx512f;
# True / False forces them either way (tests compile both on one machine: the P·V tiles give the
# same bits, the scores' 8-lane sums their own)
NARROW_TILES = None


def _narrow(context):
    """Whether this compile uses the narrow register blocks (NARROW_TILES)."""
    return (not target_has("avx512f", context)) if NARROW_TILES is None else bool(NARROW_TILES)


def _scores_keys_per_pass(rows, narrow):
    """Keys per pass over D of a register block of ``rows`` (≤ 4) query rows where ``narrow``
    (SCORES_NARROW_ACCS accumulators, all the rows first); None: the whole block in one pass."""
    if not narrow:
        return None
    keys = 1
    while 2 * keys * rows <= SCORES_NARROW_ACCS and 2 * keys <= _LANES:  # a power of two: the passes tile the 16 keys
        keys *= 2
    return keys


class _Request(NamedTuple):
    """Software requests (``llvm.prefetch``) beside a scores pass's FMAs: the lines of ``rows``
    (row offsets into ``array``, ``width`` elements each) into the cache level ``locality``
    says; ``in_order``: in address order (:func:`_ir_requests_in_order`) rather than line ``j``
    of every row beside piece ``j``."""

    array: Any
    rows: list
    width: Any
    locality: int
    in_order: bool = False


def _ir_line_in_order(builder, slot, width, itemsize):
    """Request slot ``slot`` in address order over rows of ``width`` elements taken in turn:
    ``(row, offset)`` — the row's index among them (``slot // L``, ``L`` 64-byte lines a row)
    and the element offset of its line (``(slot mod L)`` lines).  The one mapping the scores'
    requests (:func:`_ir_requests_in_order`) and the P·V passes' value lines share
    (:data:`REQUESTS_IN_ADDRESS_ORDER`)."""
    per_line = ir.Constant(_IRI64, 64 // itemsize)
    lines = builder.sdiv(builder.add(width, ir.Constant(_IRI64, 64 // itemsize - 1)), per_line)
    return builder.sdiv(slot, lines), builder.mul(builder.srem(slot, lines), per_line)


def _ir_requests_in_order(builder, pfn, parr, prows, pwidth, locality, piece, itemsize):
    """Piece ``piece``'s share of the requests for ``rows`` = ``len(prows)`` rows of ``pwidth``
    elements, in address order: slot ``e`` of the piece asks for line ``piece·rows + e`` of
    the rows' lines taken in turn (:func:`_ir_line_in_order`) — the same lines as one line of
    each row beside each piece, asked for in another order."""
    nrows = len(prows)
    for e in range(nrows):
        i = builder.add(builder.mul(piece, ir.Constant(_IRI64, nrows)), ir.Constant(_IRI64, e))
        r, loff = _ir_line_in_order(builder, i, pwidth, itemsize)
        row = prows[0]
        for k in range(1, nrows):
            row = builder.select(builder.icmp_signed("==", r, ir.Constant(_IRI64, k)), prows[k], row)
        with builder.if_then(builder.icmp_signed("<", r, ir.Constant(_IRI64, nrows))):
            ptr = builder.bitcast(builder.gep(parr, [builder.add(row, loff)]), ir.IntType(8).as_pointer())
            builder.call(pfn, [ptr, ir.Constant(_IRI32, 0), ir.Constant(_IRI32, locality), ir.Constant(_IRI32, 1)])


def _ir_scores_pass(builder, variant, fd, qd, qrows, keys, accs, d_step, nvec, tail, fma, requests, itemsize, lanes=_LANES):
    """One pass over D of a register block: ``accs[i][k]`` (allocas) ← q row ``i`` (at ``qrows[i]``)
    · the key row at ``keys[k]``, FMAs over D's pieces in order (the masked ``tail`` piece last);
    ``requests``: :class:`_Request` s, line ``j`` of each row asked for beside piece ``j``'s FMAs;
    with ``in_order``, the rows' lines in address order instead (the pass's rows are adjacent in
    the item: piece ``j`` asks for lines ``j·rows`` to ``j·rows + rows − 1`` of the rows' run,
    :data:`REQUESTS_IN_ADDRESS_ORDER`).  ``lanes`` 8: 8-lane accumulators, each 16-lane piece's
    two halves added in turn (``fma``: ``llvm.fma.v8f32``)."""
    i8p = ir.IntType(8).as_pointer()
    pfn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [i8p, _IRI32, _IRI32, _IRI32]))
    zero = ir.Constant(ir.VectorType(_IRF, lanes), [0.0] * lanes)
    for row in accs:
        for a in row:
            builder.store(zero, a)
    halves = [ir.Constant(ir.VectorType(_IRI32, 8), list(range(h, h + 8))) for h in (0, 8)]

    def split(v):
        if lanes == _LANES:
            return [v]
        return [builder.shuffle_vector(v, ir.Constant(_V16F, ir.Undefined), h) for h in halves]

    def fmas(d0, load_q, load_k):
        qvs = [split(load_q(builder.add(qrow, d0))) for qrow in qrows]
        for k, key in enumerate(keys):
            kvs = split(load_k(builder.add(key, d0)))
            for i, qv in enumerate(qvs):
                a = accs[i][k]
                for qh, kh in zip(qv, kvs):
                    args = [builder.load(a), qh, kh] if variant == "dot" else [qh, kh, builder.load(a)]
                    builder.store(builder.call(fma, args), a)

    with cgutils.for_range(builder, nvec) as piece:
        d0 = builder.mul(piece.index, d_step)
        for parr, prows, pwidth, locality, in_order in requests:
            if in_order:
                _ir_requests_in_order(builder, pfn, parr, prows, pwidth, locality, piece.index, itemsize)
                continue
            loff = builder.mul(piece.index, ir.Constant(_IRI64, 64 // itemsize))
            with builder.if_then(builder.icmp_signed("<", loff, pwidth)):
                for prow in prows:
                    ptr = builder.bitcast(builder.gep(parr, [builder.add(prow, loff)]), i8p)
                    builder.call(pfn, [ptr, ir.Constant(_IRI32, 0), ir.Constant(_IRI32, locality), ir.Constant(_IRI32, 1)])
        if variant == "dot":  # 32 bfloat16 pairs of q and k per instruction
            fmas(d0, lambda i: _ir_pairs_load(builder, qd, i), lambda i: _ir_pairs_load(builder, fd, i))
        else:
            fmas(d0, lambda i: _ir_vec_load(builder, qd, i, "f32"), lambda i: _ir_vec_load(builder, fd, i, variant))
    if tail is not None and variant != "dot":
        with builder.if_then(builder.icmp_signed(">", tail, ir.Constant(_IRI64, 0))):
            mask = builder.icmp_signed("<", ir.Constant(_V16I32, list(range(_LANES))),
                                       _ir_splat_i32(builder, builder.trunc(tail, _IRI32)))
            fmas(builder.mul(nvec, d_step), lambda i: _ir_vec_load_masked(builder, qd, i, "f32", mask),
                 lambda i: _ir_vec_load_masked(builder, fd, i, variant, mask))


def _ir_scores_store(builder, sd, vecs, rows_c, kg, r0, ns_, key0, scale, lanes=_LANES):
    """Sum the lanes of a register block's accumulators (``vecs[i·kg + k]``: row ``r0 + i``, key
    ``key0 + k``; rows past ``rows_c`` zeros; ``lanes`` of them, of ``lanes`` floats) by one
    transposing tree and store the scores."""
    total = _ir_lane_sums(builder, vecs, lanes)  # lane i·kg + k: row r0 + i, key key0 + k
    if scale is not None:
        total = builder.fmul(total, scale)
    vty = ir.VectorType(_IRF, kg)
    for i in range(rows_c):
        part = total if kg == lanes else builder.shuffle_vector(
            total, ir.Constant(total.type, ir.Undefined), ir.Constant(ir.VectorType(_IRI32, kg), [i * kg + k for k in range(kg)]))
        dst = builder.add(builder.mul(builder.add(r0, ir.Constant(_IRI64, i)), ns_), key0)
        builder.store(part, builder.bitcast(builder.gep(sd, [dst]), vty.as_pointer()), align=4)


def _ir_scores_blocked(builder, variant, fd, qd, sd, bases, t0, R_, D_, ns_, nvec, fma, accs, pf, itemsize, scale=None, tail=None,
                       narrow=False):
    """The scores of one block of 16 keys; ``pf``: :class:`_Request` s of 16 rows
    each, rows asked for meanwhile, line ``j`` of each key group's rows beside piece ``j``'s
    FMAs (in a burst per block before: B8 4k one thread, alternating, load 2.3–2.9: float16
    15.13 → 13.81 ms with the next item's rows interleaved first and then the next key block's
    too, bfloat16 14.62 → 14.02, float32 25.41 → 24.51; B1 32k within 1 %).

    ``variant == "dot"``: ``qd`` holds q's bfloat16 bits (uint16), a piece is 32 elements
    (``nvec = D / 32``), ``fma`` is ``vdpbf16ps`` (:func:`_ir_dpbf16`), and the block's scores
    are multiplied by the vector ``scale``.

    ``tail``: ``D − 16·nvec`` (D not a multiple of 16): after the whole pieces, one more piece
    of q and k read through a mask (lanes past D neither read nor summed: zeros).

    ``narrow``: each register block in passes of :func:`_scores_keys_per_pass` keys with 8-lane
    accumulators, a run-time loop over the block's 16 keys (each pass asks for its own keys'
    request rows), the accumulators kept by index, then one 8-lane tree per row and 8 keys."""
    d_step = ir.Constant(_IRI64, 2 * _LANES if variant == "dot" else _LANES)
    zero = ir.Constant(_V16F, [0.0] * _LANES)
    c4 = ir.Constant(_IRI64, 4)
    # vdpbf16ps runs only where the target has AVX-512 (its function gets AVX-512's features
    # wherever it is compiled: _bf16_dot_function): the wide blocks
    narrow = narrow and variant != "dot"
    if narrow:
        # the block's key rows and request rows by index, and the accumulators of 4 rows × 16 keys
        key_arr = cgutils.alloca_once(builder, _IRI64, size=_LANES)
        req_arrs = [cgutils.alloca_once(builder, _IRI64, size=_LANES) for _ in pf]
        v8 = ir.VectorType(_IRF, 8)
        acc_arr = cgutils.alloca_once(builder, v8, size=4 * _LANES)
        accs8 = [cgutils.alloca_once(builder, v8) for _ in range(SCORES_NARROW_ACCS)]
        fma8 = builder.module.declare_intrinsic("llvm.fma.v8f32", fnty=ir.FunctionType(v8, [v8] * 3))
        for arr, rows in [(key_arr, bases)] + [(arr, req.rows) for arr, req in zip(req_arrs, pf)]:
            for k, row in enumerate(rows):
                builder.store(row, builder.gep(arr, [ir.Constant(_IRI64, k)]))
    nrg = builder.sdiv(builder.add(R_, ir.Constant(_IRI64, 3)), c4)
    with cgutils.for_range(builder, nrg) as rg:
        r0 = builder.mul(rg.index, c4)
        rows = builder.sub(R_, r0)
        rows = builder.select(builder.icmp_signed("<", rows, c4), rows, c4)
        after = builder.append_basic_block("sc_after")
        switch = builder.switch(rows, after)
        for rows_c in range(1, 5):
            block = builder.append_basic_block(f"sc_rows_{rows_c}")
            switch.add_case(ir.Constant(_IRI64, rows_c), block)
            builder.position_at_end(block)
            rp = 1 if rows_c == 1 else (2 if rows_c == 2 else 4)  # rows padded: 16 = rp · keys
            kg = _LANES // rp
            qrows = [builder.mul(builder.add(r0, ir.Constant(_IRI64, i)), D_) for i in range(rows_c)]
            ki = _scores_keys_per_pass(rows_c, narrow)
            if ki is None:
                for g in range(_LANES // kg):
                    block_accs = [[accs[i * kg + k] for k in range(kg)] for i in range(rows_c)]
                    _ir_scores_pass(builder, variant, fd, qd, qrows, bases[g * kg: (g + 1) * kg], block_accs, d_step, nvec, tail, fma,
                                    [req._replace(rows=req.rows[g * kg: (g + 1) * kg]) for req in pf], itemsize)
                    vecs = [builder.load(accs[i * kg + k]) if i < rows_c else zero for i in range(rp) for k in range(kg)]
                    _ir_scores_store(builder, sd, vecs, rows_c, kg, r0, ns_, builder.add(t0, ir.Constant(_IRI64, g * kg)), scale)
            else:
                # 8-lane accumulators, a run-time loop over the block's keys ki at a time; lane j of
                # (row i, key k) sums q·k's products at d ≡ j (mod 8) in D's order, then one 8-lane
                # tree per row and 8 keys
                with cgutils.for_range(builder, ir.Constant(_IRI64, _LANES // ki)) as kp:
                    k0 = builder.mul(kp.index, ir.Constant(_IRI64, ki))
                    at = [builder.add(k0, ir.Constant(_IRI64, k)) for k in range(ki)]
                    keys = [builder.load(builder.gep(key_arr, [k])) for k in at]
                    requests = [req._replace(rows=[builder.load(builder.gep(arr, [k])) for k in at])
                                for arr, req in zip(req_arrs, pf)]
                    pass_accs = [[accs8[i * ki + k] for k in range(ki)] for i in range(rows_c)]
                    _ir_scores_pass(builder, variant, fd, qd, qrows, keys, pass_accs, d_step, nvec, tail, fma8, requests, itemsize, 8)
                    for i in range(rows_c):
                        for k in range(ki):
                            slot = builder.add(ir.Constant(_IRI64, i * _LANES), at[k])
                            builder.store(builder.load(pass_accs[i][k]), builder.gep(acc_arr, [slot]))
                with cgutils.for_range(builder, ir.Constant(_IRI64, 2 * rows_c)) as job:  # (row, 8 keys)
                    i = builder.sdiv(job.index, ir.Constant(_IRI64, 2))
                    key0 = builder.mul(builder.srem(job.index, ir.Constant(_IRI64, 2)), ir.Constant(_IRI64, 8))
                    first = builder.add(builder.mul(i, ir.Constant(_IRI64, _LANES)), key0)
                    vecs = [builder.load(builder.gep(acc_arr, [builder.add(first, ir.Constant(_IRI64, k))])) for k in range(8)]
                    _ir_scores_store(builder, sd, vecs, 1, 8, builder.add(r0, i), ns_, builder.add(t0, key0), scale, 8)
            builder.branch(after)
        builder.position_at_end(after)


@intrinsic
def _scores16(typingctx, q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, pk, npf):
    """``s[r·ns + t] = q[r·D : (r+1)·D] · row(offs[t])`` for ``r < R``, ``t < ceil16(n)`` (keys
    past ``n`` repeat key ``n − 1``: ``ns`` ≥ ceil16(n) pads each score row); D not a multiple
    of 16: the last piece masked.

    While a block of 16 keys is used, the next block's key rows are asked for (into L1) and
    the block's value rows (``vflat`` at ``voffs``, ``Dv`` wide, into L2) for the P·V pass
    that follows: a chunk read from DRAM then streams with the compute instead of after it.
    The block's scores are computed in register blocks of rows × keys
    (:func:`_ir_scores_blocked`), the key rows read in place.

    With ``npf`` > 0 (NEXT_SCHEME) the block asks instead for the next item's key rows at
    ``pk[t0 : t0 + 16]`` (clamped to ``npf``; ``D`` wide, into L2), a line per row beside each
    16-lane piece's FMAs: this item's values were asked for by the previous one.
    """
    if not _simd_types_ok(q, flat, offs, s) or vflat != flat or voffs != offs or pk != offs:
        return None
    return types.void(q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, pk, npf), _scores_codegen(False)


@intrinsic
def _scores_dot16(typingctx, qp, R, D, flat, qscale, offs, n, s, ns, vflat, voffs, Dv, pk, npf):
    """:func:`_scores16` of a bfloat16 cache ``flat`` and a bfloat16 q (``qp``: its bits, uint16,
    unscaled): ``s[r·ns + t] = qscale · (q_r · row(offs[t]))``, ``D % 32 == 0``, each dot product
    by ``vdpbf16ps`` — 32 bfloat16 pairs of q and k per instruction into float32 accumulators
    (exact products; no widening of k), where :func:`_scores16` widened k to float32 and ran two
    FMAs with the pre-scaled float32 q.  The same prefetches, register blocks and lane-sum tree;
    the blocked layout and the fixed order keep a key's score the same bits wherever it sits."""
    if not (
        isinstance(qp, types.Array) and qp.dtype == types.uint16 and qp.ndim == 1
        and isinstance(flat, types.Array) and flat.ndim == 1 and flat.dtype == types.uint16
        and isinstance(offs, types.Array) and offs.dtype == types.int64
        and isinstance(s, types.Array) and s.dtype == types.float32
        and vflat == flat and voffs == offs and pk == offs
    ):
        return None
    return types.void(qp, R, D, flat, qscale, offs, n, s, ns, vflat, voffs, Dv, pk, npf), _scores_codegen(True)


def _scores_codegen(dot):
    """The code of :func:`_scores16` (``dot`` False: arg 4 the kind) or :func:`_scores_dot16`
    (``dot`` True: arg 4 the scale)."""

    def codegen(context, builder, signature, args):
        at = signature.args
        qd = context.make_array(at[0])(context, builder, args[0]).data
        fd = context.make_array(at[3])(context, builder, args[3]).data
        od = context.make_array(at[5])(context, builder, args[5]).data
        sd = context.make_array(at[7])(context, builder, args[7]).data
        vfd = context.make_array(at[9])(context, builder, args[9]).data
        vod = context.make_array(at[10])(context, builder, args[10]).data
        pkd = context.make_array(at[12])(context, builder, args[12]).data
        itemsize = 4 if at[3].dtype == types.float32 else 2
        R_, D_, n_, ns_, Dv_, npf_ = (_ir_i64(context, builder, args[i], at[i]) for i in (1, 2, 6, 8, 11, 13))
        c16 = ir.Constant(_IRI64, _LANES)
        nblk = builder.sdiv(builder.add(n_, ir.Constant(_IRI64, _LANES - 1)), c16)
        nvec = builder.sdiv(D_, ir.Constant(_IRI64, 2 * _LANES if dot else _LANES))  # whole pieces
        tail = None if dot else builder.sub(D_, builder.mul(nvec, ir.Constant(_IRI64, _LANES)))
        last = builder.sub(n_, ir.Constant(_IRI64, 1))
        if dot:
            _bf16_dot_function(context, builder)
        fma = _ir_dpbf16(builder) if dot else _ir_fma(builder)
        scale = None
        if dot:
            scale = _ir_splat(builder, context.cast(builder, args[4], at[4], types.float32))
        accs = [cgutils.alloca_once(builder, _V16F) for _ in range(_LANES)]

        def emit(variant):
            with cgutils.for_range(builder, nblk) as blk:
                t0 = builder.mul(blk.index, c16)
                bases, ahead, vbases = [], [], []
                for k in range(_LANES):
                    t = builder.add(t0, ir.Constant(_IRI64, k))
                    t = builder.select(builder.icmp_signed("<", t, n_), t, last)
                    bases.append(builder.load(builder.gep(od, [t])))
                    vbases.append(builder.load(builder.gep(vod, [t])))
                    t = builder.add(t0, ir.Constant(_IRI64, _LANES * PREFETCH_K_AHEAD + k))
                    t = builder.select(builder.icmp_signed("<", t, n_), t, last)
                    ahead.append(builder.load(builder.gep(od, [t])))
                # the next item's key rows of this block's 16 positions (clamped), or where none
                # are asked for (npf = 0: small sequences, the last item) this block's value rows
                has = builder.icmp_signed(">", npf_, ir.Constant(_IRI64, 0))
                nlast = builder.sub(npf_, ir.Constant(_IRI64, 1))
                rows_pf = []
                for k in range(_LANES):
                    t = builder.add(t0, ir.Constant(_IRI64, k))
                    t = builder.select(builder.icmp_signed("<", t, npf_), t, nlast)
                    t = builder.select(has, t, ir.Constant(_IRI64, 0))
                    rows_pf.append(builder.select(has, builder.load(builder.gep(pkd, [t])), vbases[k]))
                pf = []  # requests for 16 rows each
                if PREFETCH_V:
                    pf.append(_Request(builder.select(has, fd, vfd), rows_pf, builder.select(has, D_, Dv_), 2))
                if PREFETCH_K_LOCALITY:
                    pf.append(_Request(fd, ahead, D_, PREFETCH_K_LOCALITY))
                _ir_scores_blocked(builder, variant, fd, qd, sd, bases, t0, R_, D_, ns_, nvec, fma, accs, pf, itemsize, scale, tail,
                                   _narrow(context))

        if dot:
            emit("dot")
        else:
            _ir_variants(context, builder, at[3], _ir_i64(context, builder, args[4], at[4]), emit)
        return context.get_dummy_value()

    return codegen


# P·V sums PV_SUM_KEYS keys at a time — in registers (the 16-lane loops), in a block buffer (the
# row-by-row loops, the NaN policy's redo loops) — then adds them to the output row in memory:
# FMAs key by key into an accumulator already holding the largest P's value row lose every
# small P·v under half an ulp of it.  A row with one weight ≈ 1 (an attention sink) and 4,095
# weights ≈ 5e-8 came out 3.6× the naive error summed over the whole chunk (1 Dec); in blocks
# of 64 keys, a sink at a block's first key among weights just under half an ulp of it and
# near-constant values, at 64–200 keys (where NumPy's naive gemv is most exact), still 1.83×
# the rule's tolerance, 32 keys 1.08×, 16 keys ≤ 0.77× (the flush: 16 loads, adds and stores
# per 16 keys at D 128; B1 4k one thread 1.3–2.7 % slower than 64, docs/decoding-log.md,
# "Accuracy: attention sinks").
PV_SUM_KEYS = 16
# float32 BLAS P·V (_pv_gemm) runs one GEMM per PV_GEMM_KEYS keys (sgemm adds key by key too;
# over a whole 256-key chunk a D 24 sink row came out 1.6× the tolerance, 64 keys 1.13×, 32
# keys ≤ 0.96× on the rows above): a BLAS call each, and 16 keys cost D 24 another 16 %.
PV_GEMM_KEYS = 32


def _ir_masked(builder, vty, store=False):
    """``llvm.masked.load`` / ``llvm.masked.store`` of ``vty`` (<16 x float> or <16 x i16>):
    lanes off the mask are neither read nor written (a tail piece past a row's end)."""
    suffix = f"v16{'f32' if vty == _V16F else 'i16'}"
    mask = ir.VectorType(ir.IntType(1), _LANES)
    if store:
        return builder.module.declare_intrinsic(
            f"llvm.masked.store.{suffix}.p0{suffix}", fnty=ir.FunctionType(ir.VoidType(), [vty, vty.as_pointer(), _IRI32, mask]))
    return builder.module.declare_intrinsic(
        f"llvm.masked.load.{suffix}.p0{suffix}", fnty=ir.FunctionType(vty, [vty.as_pointer(), _IRI32, mask, vty]))


def _ir_vec_load_masked(builder, data, index, variant, mask):
    """:func:`_ir_vec_load` of the lanes in ``mask`` (zeros elsewhere; nothing read there)."""
    if variant == "f32":
        ptr = builder.bitcast(builder.gep(data, [index]), _V16F.as_pointer())
        return builder.call(_ir_masked(builder, _V16F), [ptr, ir.Constant(_IRI32, 4), mask, ir.Constant(_V16F, [0.0] * _LANES)])
    ptr = builder.bitcast(builder.gep(data, [index]), _V16I16.as_pointer())
    raw = builder.call(_ir_masked(builder, _V16I16), [ptr, ir.Constant(_IRI32, 2), mask, ir.Constant(_V16I16, [0] * _LANES)])
    if variant == "f16":
        return builder.fpext(builder.bitcast(raw, _V16H), _V16F)
    wide = builder.shl(builder.zext(raw, _V16I32), ir.Constant(_V16I32, [16] * _LANES))
    return builder.bitcast(wide, _V16F)


@intrinsic
def _pv16(typingctx, p, ns, R, n, flat, kind, offs, Dv, o, kflat, pk, npf, D):
    """``o[r·Dv + d] = Σ_{t<n} p[r·ns + t] · row(offs[t])[d]`` for ``r < R`` (``o`` overwritten;
    every weight used, p = 0 included).  Meanwhile the key rows ``kflat`` at ``pk[:npf]`` (``D``
    wide: the next item's) are asked for into L2: pass ``j`` of the ``np`` passes (row groups ×
    output pieces) asks for rows ``t ≡ j (mod np)``, ``t < min(n, npf)``.

    ``Dv`` a multiple of 16: whole 16-lane pieces; otherwise (head dims 24, 40, 72 …) the same
    loops in a second copy whose pieces are read and written through masks — the last piece's
    lanes past ``Dv`` are never read (the next row, an unused slot, the array's end) nor written
    (the next output row)."""
    if not _simd_types_ok(p, flat, offs, o) or kflat != flat or pk != offs:
        return None
    sig = types.void(p, ns, R, n, flat, kind, offs, Dv, o, kflat, pk, npf, D)

    def codegen(context, builder, signature, args):
        at = signature.args
        pd = context.make_array(at[0])(context, builder, args[0]).data
        fd = context.make_array(at[4])(context, builder, args[4]).data
        od = context.make_array(at[6])(context, builder, args[6]).data
        outd = context.make_array(at[8])(context, builder, args[8]).data
        kfd = context.make_array(at[9])(context, builder, args[9]).data
        pkd = context.make_array(at[10])(context, builder, args[10]).data
        ns_, R_, n_, kind_, Dv_, npf_, D_ = (_ir_i64(context, builder, args[i], at[i]) for i in (1, 2, 3, 5, 7, 11, 12))
        itemsize = 4 if at[4].dtype == types.float32 else 2
        narrow = _narrow(context)
        c16 = ir.Constant(_IRI64, _LANES)
        nvec = builder.sdiv(builder.add(Dv_, ir.Constant(_IRI64, _LANES - 1)), c16)  # pieces, the last maybe partial
        has_tail = builder.icmp_signed("!=", builder.srem(Dv_, c16), ir.Constant(_IRI64, 0))
        fma = _ir_fma(builder)
        accs = [[cgutils.alloca_once(builder, _V16F) for _ in range(4)] for _ in range(4)]
        zero = ir.Constant(_V16F, [0.0] * _LANES)
        block = ir.Constant(_IRI64, PV_SUM_KEYS)
        lanes = ir.Constant(_V16I32, list(range(_LANES)))

        def out_ptr(r0, v0, i, j):
            orow = builder.mul(builder.add(r0, ir.Constant(_IRI64, i)), Dv_)
            dst = builder.add(orow, builder.mul(builder.add(v0, ir.Constant(_IRI64, j)), c16))
            return builder.bitcast(builder.gep(outd, [dst]), _V16F.as_pointer())

        def out_load(ptr, mask):
            if mask is None:
                return builder.load(ptr, align=4)
            return builder.call(_ir_masked(builder, _V16F), [ptr, ir.Constant(_IRI32, 4), mask, zero])

        def out_store(value, ptr, mask):
            if mask is None:
                builder.store(value, ptr, align=4)
            else:
                builder.call(_ir_masked(builder, _V16F, store=True), [value, ptr, ir.Constant(_IRI32, 4), mask])

        def flush(r0, v0, rows, nv, masks):
            # the block's sums join the output's (see PV_SUM_KEYS), the accumulators restart
            for i in range(rows):
                for j in range(nv):
                    ptr = out_ptr(r0, v0, i, j)
                    out_store(builder.fadd(out_load(ptr, masks[j]), builder.load(accs[i][j])), ptr, masks[j])
                    builder.store(zero, accs[i][j])

        def emit_pass(variant, r0, v0, rows, nv, masked):
            masks = [None] * nv
            if masked:  # lanes below Dv − 16·(piece): all of a whole piece, the tail's first ones
                for j in range(nv):
                    left = builder.sub(Dv_, builder.mul(builder.add(v0, ir.Constant(_IRI64, j)), c16))
                    left = builder.trunc(builder.select(builder.icmp_signed("<", left, c16), left, c16), _IRI32)
                    masks[j] = builder.icmp_signed("<", lanes, _ir_splat_i32(builder, left))
            for i in range(rows):
                for j in range(nv):
                    builder.store(zero, accs[i][j])
                    out_store(zero, out_ptr(r0, v0, i, j), masks[j])
            prow = [builder.mul(builder.add(r0, ir.Constant(_IRI64, i)), ns_) for i in range(rows)]
            # this pass's share of the next item's key rows: t ≡ its index (mod the pass count)
            # (row groups of 4; this group's pieces a pass — every group's where rows are full)
            c4_ = ir.Constant(_IRI64, 4)
            per_ = ir.Constant(_IRI64, _pv_pieces_per_pass(rows, narrow))
            nvg_ = builder.sdiv(builder.add(nvec, builder.sub(per_, ir.Constant(_IRI64, 1))), per_)
            npass = builder.mul(builder.sdiv(builder.add(R_, ir.Constant(_IRI64, 3)), c4_), nvg_)
            jpass = builder.add(builder.mul(builder.sdiv(r0, c4_), nvg_), builder.sdiv(v0, per_))
            # the next key of this pass's share: a running key, not key mod npass (a division per
            # key and pass)
            mine_at = cgutils.alloca_once(builder, _IRI64)
            builder.store(jpass, mine_at)
            with cgutils.for_range(builder, n_) as key:
                if PREFETCH_NEXT_K:
                    mine = builder.icmp_signed("==", key.index, builder.load(mine_at))
                    with builder.if_then(mine):
                        builder.store(builder.add(key.index, npass), mine_at)
                        with builder.if_then(builder.icmp_signed("<", key.index, npf_)):
                            _ir_prefetch_rows(builder, kfd, [builder.load(builder.gep(pkd, [key.index]))], D_, itemsize, 2)
                base = builder.add(builder.load(builder.gep(od, [key.index])), builder.mul(v0, c16))
                if masked:
                    vals = [_ir_vec_load_masked(builder, fd, builder.add(base, ir.Constant(_IRI64, 16 * j)), variant, masks[j])
                            for j in range(nv)]
                else:
                    vals = [_ir_vec_load(builder, fd, builder.add(base, ir.Constant(_IRI64, 16 * j)), variant) for j in range(nv)]
                for i in range(rows):
                    w = _ir_splat(builder, builder.load(builder.gep(pd, [builder.add(prow[i], key.index)])))
                    for j in range(nv):
                        builder.store(builder.call(fma, [w, vals[j], builder.load(accs[i][j])]), accs[i][j])
                last = builder.icmp_signed("==", builder.urem(key.index, block), ir.Constant(_IRI64, PV_SUM_KEYS - 1))
                with builder.if_then(last):
                    flush(r0, v0, rows, nv, masks)
            flush(r0, v0, rows, nv, masks)

        def emit_groups(variant, masked):
            _ir_pv_groups(builder, R_, nvec, "pv",
                          lambda r0, v0, rows_c, nv_c: emit_pass(variant, r0, v0, rows_c, nv_c, masked), narrow)

        def emit(variant):
            # whole pieces (Dv % 16 == 0: the common head dims, unmasked code) or a masked copy
            with builder.if_else(has_tail) as (tail_case, whole_case):
                with tail_case:
                    emit_groups(variant, True)
                with whole_case:
                    emit_groups(variant, False)

        _ir_variants(context, builder, at[4], kind_, emit)
        return context.get_dummy_value()

    return sig, codegen


# =================================================================================
# the fused 16-bit chunk: scores, online softmax and P·V per block of 16 keys
# =================================================================================
#
# FUSED16: a 16-bit cache's chunk (float32 compute, every row seeing every key of the chunk, Dv a
# multiple of 16; a softcap and ALiBi applied to the block's scores as they are loaded — 4 Dec:
# the three passes' scalar tanh made a softcapped call 2–3× slower) runs one pass over its keys,
# 16 at a time: the block's scores (:func:`_ir_scores_blocked`), the online softmax update per row (running max ``m``; when
# a block's max is larger, ``O``, the row sum's lane sums are rescaled by ``exp(m_old − m_new)``),
# ``P = exp(S − m)`` for the block, then the block's ``P·V`` (the block's sum in registers, added
# to ``O``: PV_SUM_KEYS's blocks) — the block's keys and values used while in L1.  With NEXT_SCHEME
# the next item's key rows are asked for (into L2) beside the scores' FMAs, its value rows by the
# P·V part; on smaller calls the next block's key rows (into L1) and value rows (into L2).  Only
# the chunk's data decide the arithmetic: the same bits wherever the sequence sits (not the bits
# of the three passes below); a chunk whose output is not finite is redone on those passes (the
# NaN policy's redo).  decode_ab.py, Hq 32 Hkv 8 D 128, old/new medians (1 Dec, 21:35–21:38,
# load 1.0–1.4): B1 32k float16 alone 16.63 → 15.85 ms, pool 10.71 → 10.28, bfloat16 alone 22.68
# → 20.47, pool 10.83 → 10.73, float16 paged pool 11.82 → 9.66; B8 32k pool float16 95.6 → 90.6,
# bfloat16 95.7 → 84.4 (docs/decoding-log.md, "A fused pass for 16-bit caches").
FUSED16 = True
# FUSED32: the same pass for float32 caches (up to SIMD_MAX_ROWS_FLOAT rows; the rows read as
# they are, a request per 16-lane piece); float32 bits change (the online softmax's order), errors
# against float64 the same (B1 4k max 2.7e-8 against 3.1e-8).  decode_ab.py against the three
# passes (1 Dec, 23:25–23:42, load 0.9–2.7): B1 4k pool 1.594 → 1.519 / 1.186 → 1.154 ms, paged
# 1.575 → 1.528, B1 32k alone 34.87 → 33.92; B1 4k alone, B1 32k pool, B8 4k, B8 32k within
# ±1.7 % (docs/decoding-log.md, "B1 4k decode: where a call's time goes").
FUSED32 = True
# where the next item's value rows are asked for: by the P·V part (a pass's lines beside its own
# loads), else beside the scores' FMAs with its key rows (B1 32k float16: 1.08–1.10× slower)
FUSED_NEXT_V_IN_PV = True
# the next block's key and value rows: llvm.prefetch locality (3 = L1, 2 = L2, 0 = not asked for);
# FUSED_K_SMALL_ONLY: the keys only where no next item is asked for.  Every request for the next
# block at 32k cost 1–3 % (the next item's hold the fill buffers; this item's rows are in L2)
FUSED_K_LOCALITY, FUSED_V_LOCALITY = 3, 0
FUSED_K_SMALL_ONLY = True
# the block's max by a tree of compares (NaN ignored: a NaN score poisons the row through the
# check vector); llvm.vector.reduce.fmax (NaN-aware) made a cache-resident item ≈ 9 % slower
FUSED_MAX_TREE = True
# float32 caches in calls without a next item asked for (under PREFETCH_NEXT_MIN_BYTES: B1 4k,
# 33.5 MB in L3): the scores pass asks for the key rows FUSED_AHEAD_KEYS ahead into L1
# (FUSED_K_LOCALITY) and for no value rows (FUSED_SMALL_V_LOCALITY 0; the value rows 16 keys ahead
# into L2 before, as 16-bit caches still do: 16, 2) — the hardware streamer brings them to P·V.
# decode_ab.py B1 4k float32 against main (2 Dec, 02:24–02:39, load 0.8–1.3, 301 rounds): pool
# 1.354 → 1.258 ms, alone 2.202 → 2.027 (docs/decoding-log.md, "B1 4k float32: no requests for the
# next block's values").  Other settings tried there: K ahead 4 / 16 / 32 (V none) 1–4 % behind 8;
# the V rows 0 keys ahead into L1 or L2, or 16 ahead into L1, no gain; no requests at all slower.
# That was an AVX-512 Zen 5; on the AVX2 Zen 3 (4 Dec, 23:01, decode_ab.py B1 4k float32, 41
# rounds, load 0.9) the value rows asked for into L2 FUSED_AHEAD_KEYS ahead were faster: pool
# 2.81 → 2.43 ms, alone 3.53 → 3.10, paged pool 1.83 → 1.63 (into L1: 2.48, 3.07, 1.68; the keys 16
# ahead instead: no gain).  FUSED_SMALL_V_LOCALITY None: by the compile target, 0 where it has
# AVX-512 and 2 where not (the two machines measured; same bits either way).
FUSED_AHEAD_KEYS = 8
FUSED_SMALL_V_LOCALITY = None
FUSED_SMALL_V_AHEAD = None  # keys ahead for the value rows (None: FUSED_AHEAD_KEYS)
# the next item's requests in address order (:func:`_ir_requests_in_order`, and the P·V passes'
# value lines likewise): a pass asks for the lines of its keys' next rows one row after the other,
# instead of line j of every row beside piece j.  With AVX2's narrow tiles the P·V passes read one
# piece of each of the block's 16 value rows, so their requests went down the next block in 512-byte
# strides, 8 times over.  decode_ab.py float32 pool, the AVX2 Zen 3 (5 Dec, 09:00–09:17, 41 rounds,
# load 1.2–1.4), ms against the old order: B8 4k 11.88 against 12.92, B1 32k 12.59 against 13.98
# (the value lines alone in order: 12.75 and 13.73); same bits (docs/decoding-log.md, "The next
# item's requests in address order").  None: where the target has the narrow tiles (measured there
# only); True / False forces it.
REQUESTS_IN_ADDRESS_ORDER = None
FUSED_STATS = 48  # floats of a row's state: the row sum's lane totals, a block's lane sums, a check


@intrinsic
def _fused16(typingctx, q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, o, m, st, pk, pv, npf, cap, ab, alibi):
    """One pass over a 16-bit (or float32: FUSED32) chunk's ``n`` keys (see FUSED16): ``o (R·Dv)``, zeros on entry, gets
    the unnormalized ``Σ exp(s − m_r)·v``, ``m[r]`` (−inf on entry) the row's max, ``st[r·FUSED_STATS:]`` the row
    sum's lane totals (16), a block's lane sums (16, to add to them) and a check vector (NaN where
    a score was NaN or ±inf).  ``s`` (``R·ns``) is scratch: each block's scores, then its P.
    ``cap`` > 0: the scores are softcapped first, ``cap·tanh(s/cap)`` (:func:`_softcap16`'s
    arithmetic; the check sees the capped scores, as the three passes' masks do); ``alibi``: then
    row r's key t gets ``− ab[r]·|ab[R + r] − t|`` (its slope, and its position less the chunk's
    first: one rounding, an FMA, as the three passes' float64 product and difference)."""
    if not (
        _simd_types_ok(q, flat, offs, s)
        and vflat == flat and voffs == offs and pk == offs and pv == offs
        and o == s and m == s and st == s and ab == s
    ):
        return None
    sig = types.void(q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, o, m, st, pk, pv, npf, cap, ab, alibi)

    def codegen(context, builder, signature, args):
        at = signature.args

        def data(i):
            return context.make_array(at[i])(context, builder, args[i]).data

        qd, fd, od, sd, vfd, vod, outd, md, std, pkd, pvd = (data(i) for i in (0, 3, 5, 7, 9, 10, 12, 13, 14, 15, 16))
        R_, D_, kind_, n_, ns_, Dv_, npf_ = (_ir_i64(context, builder, args[i], at[i]) for i in (1, 2, 4, 6, 8, 11, 17))
        cap_ = context.cast(builder, args[18], at[18], types.float32)
        has_cap = builder.fcmp_ordered(">", cap_, ir.Constant(_IRF, 0.0))
        capv = _ir_splat(builder, cap_)
        capped = cgutils.alloca_once(builder, _V16F)
        abd = data(19)
        has_alibi = builder.icmp_signed("!=", _ir_i64(context, builder, args[20], at[20]), ir.Constant(_IRI64, 0))
        lanes_f = ir.Constant(_V16F, [float(i) for i in range(_LANES)])
        itemsize = 4 if at[3].dtype == types.float32 else 2
        narrow = _narrow(context)
        # the next block's rows where no next item is asked for: float32 as FUSED_AHEAD_KEYS etc. say
        small_v_locality = FUSED_SMALL_V_LOCALITY
        if small_v_locality is None:
            small_v_locality = 0 if target_has("avx512f", context) else 2
        ahead, small_v_locality, v_ahead = (FUSED_AHEAD_KEYS, small_v_locality, FUSED_SMALL_V_AHEAD) if itemsize == 4 else (16, 2, None)
        in_order = narrow if REQUESTS_IN_ADDRESS_ORDER is None else REQUESTS_IN_ADDRESS_ORDER
        c0 = ir.Constant(_IRI64, 0)
        c1 = ir.Constant(_IRI64, 1)
        c16 = ir.Constant(_IRI64, _LANES)
        nblk = builder.sdiv(builder.add(n_, ir.Constant(_IRI64, _LANES - 1)), c16)
        nvec = builder.sdiv(D_, c16)
        tail = builder.sub(D_, builder.mul(nvec, c16))
        nvv = builder.sdiv(Dv_, c16)  # Dv's pieces (a multiple of 16)
        last = builder.sub(n_, c1)
        fma = _ir_fma(builder)
        accs = [cgutils.alloca_once(builder, _V16F) for _ in range(_LANES)]
        pacc = [[cgutils.alloca_once(builder, _V16F) for _ in range(4)] for _ in range(4)]
        zero = ir.Constant(_V16F, [0.0] * _LANES)
        ninf = ir.Constant(_V16F, [float("-inf")] * _LANES)
        one = ir.Constant(_V16F, [1.0] * _LANES)
        log2e = ir.Constant(_V16F, [float(np.float32(LOG2E))] * _LANES)
        lanes = ir.Constant(_V16I32, list(range(_LANES)))
        i8p = ir.IntType(8).as_pointer()
        pfn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [i8p, _IRI32, _IRI32, _IRI32]))
        vmax = builder.module.declare_intrinsic("llvm.vector.reduce.fmax.v16f32", fnty=ir.FunctionType(_IRF, [_V16F]))
        has = builder.icmp_signed(">", npf_, c0)
        nlast = builder.sub(npf_, c1)
        sum_block = ir.Constant(_IRI64, SUM_VECTORS)

        def vptr(base, index):
            return builder.bitcast(builder.gep(base, [index]), _V16F.as_pointer())

        def row_of(arr, t, bound, lastv):
            t = builder.select(builder.icmp_signed("<", t, bound), t, lastv)
            return builder.load(builder.gep(arr, [t]))

        def next_row(arr, t):  # the next item's row at position t (clamped; 0 where there is none)
            t = builder.select(builder.icmp_signed("<", t, npf_), t, nlast)
            return builder.load(builder.gep(arr, [builder.select(has, t, c0)]))

        def softmax_update(t0, cnt, blast):
            # per row: the block's max, the rescale when it is larger, P = exp(S − m), lane sums
            valid = builder.icmp_signed("<", lanes, _ir_splat_i32(builder, builder.trunc(cnt, _IRI32)))
            with cgutils.for_range(builder, R_) as row:
                r = row.index
                sp = vptr(sd, builder.add(builder.mul(r, ns_), t0))
                # a softcap: c·tanh(s/c) (_softcap16's arithmetic), before the masks' −inf
                builder.store(builder.load(sp, align=4), capped)
                with builder.if_then(has_cap):
                    raw = builder.load(capped)
                    builder.store(builder.fmul(capv, _tanh_vector(builder, builder.fdiv(raw, capv))), capped)
                with builder.if_then(has_alibi):  # − slope·|position − key| (exact distances)
                    slope = _ir_splat(builder, builder.load(builder.gep(abd, [r])))
                    rel = _ir_splat(builder, builder.load(builder.gep(abd, [builder.add(R_, r)])))
                    keys = builder.fadd(_ir_splat(builder, builder.sitofp(t0, _IRF)), lanes_f)
                    dist = builder.call(_intrinsic_fn(builder, "llvm.fabs.v16f32", 1), [builder.fsub(rel, keys)])
                    builder.store(builder.call(fma, [builder.fneg(slope), dist, builder.load(capped)]), capped)
                sv = builder.select(valid, builder.load(capped), ninf)
                sbase = builder.mul(r, ir.Constant(_IRI64, FUSED_STATS))
                tot_p, part_p, chk_p = (vptr(std, builder.add(sbase, ir.Constant(_IRI64, k))) for k in (0, 16, 32))
                # NaN exactly where a (visible) score is NaN or ±inf: s·0
                builder.store(builder.fadd(builder.load(chk_p, align=4), builder.select(valid, builder.fmul(sv, zero), zero)), chk_p, align=4)
                if FUSED_MAX_TREE:
                    x = sv
                    for half in (8, 4, 2, 1):
                        y = builder.shuffle_vector(x, ir.Constant(_V16F, ir.Undefined), ir.Constant(
                            _V16I32, [(i + half) % _LANES for i in range(_LANES)]))
                        x = builder.select(builder.fcmp_ordered(">", y, x), y, x)
                    bm = builder.extract_element(x, ir.Constant(_IRI32, 0))
                else:
                    bm = builder.call(vmax, [sv])
                mp = builder.gep(md, [r])
                mo = builder.load(mp)
                with builder.if_then(builder.fcmp_ordered(">", bm, mo), likely=False):
                    # a larger max: O, the lane sums ×= exp(m_old − m_new) (0 for m_old = −inf)
                    builder.store(bm, mp)
                    alpha = _exp2_vector(builder, builder.fmul(builder.fsub(_ir_splat(builder, mo), _ir_splat(builder, bm)), log2e), one, zero)
                    builder.store(builder.fmul(builder.load(tot_p, align=4), alpha), tot_p, align=4)
                    builder.store(builder.fmul(builder.load(part_p, align=4), alpha), part_p, align=4)
                    orow = builder.mul(r, Dv_)
                    with cgutils.for_range(builder, nvv) as piece:
                        op = vptr(outd, builder.add(orow, builder.mul(piece.index, c16)))
                        builder.store(builder.fmul(builder.load(op, align=4), alpha), op, align=4)
                mv = _ir_splat(builder, builder.load(mp))
                p = _exp2_vector(builder, builder.fmul(builder.fsub(sv, mv), log2e), one, zero)
                builder.store(p, sp, align=4)
                builder.store(builder.fadd(builder.load(part_p, align=4), p), part_p, align=4)
                with builder.if_then(blast):  # every SUM_VECTORS blocks the lane sums join the totals
                    builder.store(builder.fadd(builder.load(tot_p, align=4), builder.load(part_p, align=4)), tot_p, align=4)
                    builder.store(zero, part_p, align=4)

        def pv_pass(variant, t0, cnt, r0, v0, rows, nv):
            for i in range(rows):
                for j in range(nv):
                    builder.store(zero, pacc[i][j])
            prow = [builder.add(builder.mul(builder.add(r0, ir.Constant(_IRI64, i)), ns_), t0) for i in range(rows)]
            # the next item's value rows, the lines starting in this pass's pieces (first row group
            # only; with AVX2's one-piece passes of a 16-bit row, every other pass has none — each
            # pass asked for its piece's line before, twice a line, in the hot loop)
            first_rg = builder.icmp_signed("==", r0, c0)
            per_line = 64 // itemsize
            line0 = builder.mul(builder.sdiv(builder.add(builder.mul(v0, c16), ir.Constant(_IRI64, per_line - 1)),
                                             ir.Constant(_IRI64, per_line)), ir.Constant(_IRI64, per_line))
            pass_end = builder.mul(builder.add(v0, ir.Constant(_IRI64, nv)), c16)
            nlines = -(-nv * _LANES // per_line)  # at most this many lines start in nv pieces
            lines_on = [builder.icmp_signed("<", builder.add(line0, ir.Constant(_IRI64, j * per_line)), pass_end) for j in range(nlines)]
            pf_on = builder.and_(has, first_rg) if FUSED_NEXT_V_IN_PV else None
            with cgutils.for_range(builder, cnt) as key:
                t = builder.add(t0, key.index)
                if FUSED_NEXT_V_IN_PV:
                    with builder.if_then(pf_on):
                        if in_order and nlines == 1:
                            # in address order: the pass that holds line l of the rows asks,
                            # key by key, for lines l·cnt … l·cnt + cnt − 1 of the block's next rows
                            # taken in turn (REQUESTS_IN_ADDRESS_ORDER)
                            i = builder.add(builder.mul(builder.sdiv(line0, ir.Constant(_IRI64, per_line)), cnt), key.index)
                            vrow, at0 = _ir_line_in_order(builder, i, Dv_, itemsize)
                            prow_v = row_of(pvd, builder.add(t0, vrow), npf_, nlast)
                        else:
                            prow_v = row_of(pvd, t, npf_, nlast)
                            at0 = line0
                        for j in range(nlines):
                            with builder.if_then(lines_on[j]):
                                at = builder.add(prow_v, builder.add(at0, ir.Constant(_IRI64, j * per_line)))
                                ptr = builder.bitcast(builder.gep(vfd, [at]), i8p)
                                builder.call(pfn, [ptr, ir.Constant(_IRI32, 0), ir.Constant(_IRI32, 2), ir.Constant(_IRI32, 1)])
                base = builder.add(builder.load(builder.gep(vod, [t])), builder.mul(v0, c16))
                vals = [_ir_vec_load(builder, vfd, builder.add(base, ir.Constant(_IRI64, 16 * j)), variant) for j in range(nv)]
                for i in range(rows):
                    w = _ir_splat(builder, builder.load(builder.gep(sd, [builder.add(prow[i], key.index)])))
                    for j in range(nv):
                        builder.store(builder.call(fma, [w, vals[j], builder.load(pacc[i][j])]), pacc[i][j])
            for i in range(rows):  # the block's sums join O (PV_SUM_KEYS)
                orow = builder.mul(builder.add(r0, ir.Constant(_IRI64, i)), Dv_)
                for j in range(nv):
                    op = vptr(outd, builder.add(orow, builder.mul(builder.add(v0, ir.Constant(_IRI64, j)), c16)))
                    builder.store(builder.fadd(builder.load(op, align=4), builder.load(pacc[i][j])), op, align=4)

        def pv_block(variant, t0, cnt):
            _ir_pv_groups(builder, R_, nvv, "fpv",
                          lambda r0, v0, rows_c, nv_c: pv_pass(variant, t0, cnt, r0, v0, rows_c, nv_c), narrow)

        def scores(variant, t0, nxt):
            # nxt: whether this copy of the block loop runs with a next item asked for (emit):
            # only that case's request rows are built
            bases, kahead, vahead, npk, npv = [], [], [], [], []
            for k in range(_LANES):
                t = builder.add(t0, ir.Constant(_IRI64, k))
                bases.append(row_of(od, t, n_, last))
                ta = builder.add(t, ir.Constant(_IRI64, ahead))
                if not nxt or FUSED_V_LOCALITY or not FUSED_K_SMALL_ONLY:  # (rows _fused_requests reads)
                    kahead.append(row_of(od, ta, n_, last))
                    tv = ta if v_ahead is None else builder.add(t, ir.Constant(_IRI64, v_ahead))
                    vahead.append(row_of(vod, tv, n_, last))
                if nxt:
                    npk.append(next_row(pkd, t))
                    if not FUSED_NEXT_V_IN_PV:
                        npv.append(next_row(pvd, t))
            pf = _fused_requests(nxt, fd, vfd, D_, Dv_, npk, npv, kahead, vahead, small_v_locality, in_order)
            _ir_scores_blocked(builder, variant, fd, qd, sd, bases, t0, R_, D_, ns_, nvec, fma, accs, pf, itemsize, None, tail, narrow)

        def emit_blocks(variant, nxt):
            with cgutils.for_range(builder, nblk) as blk:
                t0 = builder.mul(blk.index, c16)
                cnt = builder.sub(n_, t0)
                cnt = builder.select(builder.icmp_signed("<", cnt, c16), cnt, c16)
                scores(variant, t0, nxt)
                blast = builder.icmp_signed("==", builder.srem(blk.index, sum_block), ir.Constant(_IRI64, SUM_VECTORS - 1))
                softmax_update(t0, cnt, blast)
                pv_block(variant, t0, cnt)

        def emit(variant):
            # one copy of the block loop per case, with a next item asked for
            # (PREFETCH_NEXT_MIN_BYTES) and without, each building only its own requests' row
            # offsets: one loop that tested ``has`` per block and selected between both sets (16
            # row offsets each, 8 a key group in the scores loop, where the registers run out)
            # was slower.  Requests only: the same bits.  decode_ab.py against that loop (2 Dec,
            # 15:44–16:17, load 1.0–1.4): B1 4k float32 alone 1.569 → 1.520 ms, pool 0.942 →
            # 0.928, float16 pool 0.675 → 0.664, bfloat16 pool 0.714 → 0.706; B1 32k bfloat16
            # pool 6.111 → 5.843, B8 4k float32 13.150 → 13.100 (docs/decoding-log.md, "Decode on
            # the new host"; the shared loop is in git history, 06b5052)
            with builder.if_else(has) as (then, otherwise):
                with then:
                    emit_blocks(variant, True)
                with otherwise:
                    emit_blocks(variant, False)

        _ir_variants(context, builder, at[3], kind_, emit)
        return context.get_dummy_value()

    return sig, codegen


def _fused_requests(nxt, fd, vfd, D_, Dv_, npk, npv, kahead, vahead, small_v_locality, in_order=False):
    """The fused pass's requests beside the scores' FMAs (:class:`_Request` s, as
    :func:`_ir_scores_blocked` takes them) for the block loop's copy of one case
    (``emit``): ``nxt`` True — the next item's key rows into L2 (and its value rows,
    unless the ``P·V`` part asks for them: FUSED_NEXT_V_IN_PV); False — the next block's rows
    (keys into L1, values as ``small_v_locality`` says).  What the shared loop's per-block selects
    gave each case, without the other case's rows.  ``in_order``: the next item's key rows asked
    for in address order (REQUESTS_IN_ADDRESS_ORDER)."""
    pf = []
    if nxt:
        pf.append(_Request(fd, npk, D_, 2, in_order))
        if not FUSED_NEXT_V_IN_PV:
            pf.append(_Request(vfd, npv, Dv_, 2))
        if FUSED_K_LOCALITY and not FUSED_K_SMALL_ONLY:
            pf.append(_Request(fd, kahead, D_, FUSED_K_LOCALITY))
    else:
        if small_v_locality:
            pf.append(_Request(vfd, vahead, Dv_, small_v_locality))
        if not FUSED_NEXT_V_IN_PV:
            pf.append(_Request(vfd, vahead, Dv_, 2))
        if FUSED_K_LOCALITY:
            pf.append(_Request(fd, kahead, D_, FUSED_K_LOCALITY))
    if FUSED_V_LOCALITY:
        pf.append(_Request(vfd, vahead, Dv_, FUSED_V_LOCALITY))
    return pf


# P·V's register tile where the compile target lacks AVX-512 (AVX2: 16 registers of 8 lanes): a
# pass holds rows × pieces ≤ PV_NARROW_TILE 16-lane pieces of output (8 ymm at 4), besides the
# rows' broadcast weights and the pieces' values.  The 4 × 4 tile of AVX-512 is 32 ymm there:
# LLVM kept the accumulators on the stack, a store and a reload around each FMA (docs/decoding-log.md,
# "An AMD EPYC Zen 3 without AVX-512").  Each output element's FMAs are the same in the same
# order whatever the tile: the same bits.
PV_NARROW_TILE = 4


def _pv_pieces_per_pass(rows, narrow):
    """16-lane output pieces a ``P·V`` pass holds for a group of ``rows`` rows."""
    return max(1, min(4, PV_NARROW_TILE // rows)) if narrow else 4


def _ir_pv_groups(builder, R, npieces, label, emit_block, narrow=False):
    """The ``P·V`` passes' register blocking: rows in groups of 4 and Dv's 16-lane pieces in
    groups of 4 (``narrow``, a target without AVX-512: of :func:`_pv_pieces_per_pass`), each
    group's pass emitted for its constant shape (``emit_block(r0, v0, rows, pieces)``, 1–4
    each) behind a switch on the group's shape (the last groups are smaller)."""
    c4 = ir.Constant(_IRI64, 4)
    one = ir.Constant(_IRI64, 1)
    with cgutils.for_range(builder, builder.sdiv(builder.add(R, ir.Constant(_IRI64, 3)), c4)) as rg:
        r0 = builder.mul(rg.index, c4)
        rows = builder.sub(R, r0)
        rows = builder.select(builder.icmp_signed("<", rows, c4), rows, c4)
        per = ir.Constant(_IRI64, _pv_pieces_per_pass(4, narrow))
        for rows_c in (3, 2, 1):  # the group's pieces a pass by its rows (a constant without narrow)
            g = ir.Constant(_IRI64, _pv_pieces_per_pass(rows_c, narrow))
            per = builder.select(builder.icmp_signed("==", rows, ir.Constant(_IRI64, rows_c)), g, per)
        with cgutils.for_range(builder, builder.sdiv(builder.add(npieces, builder.sub(per, one)), per)) as vg:
            v0 = builder.mul(vg.index, per)
            nv = builder.sub(npieces, v0)
            nv = builder.select(builder.icmp_signed("<", nv, per), nv, per)
            code = builder.add(builder.mul(rows, ir.Constant(_IRI64, 8)), nv)
            after = builder.append_basic_block(f"{label}_after")
            switch = builder.switch(code, after)
            for rows_c in range(1, 5):
                for nv_c in range(1, _pv_pieces_per_pass(rows_c, narrow) + 1):
                    block = builder.append_basic_block(f"{label}_{rows_c}_{nv_c}")
                    switch.add_case(ir.Constant(_IRI64, rows_c * 8 + nv_c), block)
                    builder.position_at_end(block)
                    emit_block(r0, v0, rows_c, nv_c)
                    builder.branch(after)
            builder.position_at_end(after)


def _ir_splat_i32(builder, value):
    undef = ir.Constant(_V16I32, ir.Undefined)
    first = builder.insert_element(undef, value, ir.Constant(_IRI32, 0))
    return builder.shuffle_vector(first, undef, ir.Constant(_V16I32, [0] * _LANES))


# =================================================================================
# exp of a score row: vectorizable polynomial in float32, libm in float64
# =================================================================================


def _exp_row(s, ibuf, n, m):
    """``s[:n] = exp(s[:n] − m)`` in place (``m`` finite, arguments ≤ 0); returns the sum."""
    raise NotImplementedError("compiled only")


@njit(cache=_JIT_CACHE, fastmath={"contract", "afn", "nsz"})
def _exp_row_f32(s, ibuf, n, m):
    # 2**x with x = (s − m)·log2(e) = k + f, f ∈ [−½, ½]: the general kernels' polynomial for
    # 2**f (_cpu_primitives.exp2_fraction, inlined), then k added to the exponent bits in an
    # integer-only loop over an int32 view (both loops branch-free, so both vectorize).
    # Relative error ≤ 2.2e-7; −inf and x < −126 give 0.
    # (s − m)·log2(e), subtracted first: exactly 0 at the maximum whatever its size (the
    # fused s·log2(e) − m·log2(e) carried the product's rounding error, ulp(m)/2 — for
    # scores ≈ 1e20 an exponent of ±1e13, which zeroed the row).
    mf = np.float32(m)
    for t in range(n):
        xc = max((s[t] - mf) * np.float32(LOG2E), np.float32(-127.0))
        k = np.floor(xc + np.float32(0.5))
        s[t] = exp2_fraction(xc - k)
        ibuf[t] = np.int32(k)
    bits = s.view(np.int32)
    for t in range(n):
        e = ibuf[t]
        bits[t] = np.int32(bits[t] + (e << 23)) if e > -127 else np.int32(0)
    # The sum in float64 (a loop that does not vectorize either way: the same cost).  In float32
    # blocks of 64 keys, an attention sink's block lost its small terms (each under half an ulp
    # of the sink's 1): the row's sum 8 % short of its small part — a D 24 row's output 3e-6
    # relative off, twice the rule's tolerance at a few hundred keys (the 16-lane sum spreads
    # the keys over 16 lanes, 8 a lane per block).
    total = 0.0
    for t in range(n):
        total += np.float64(s[t])
    return np.float32(total)


@njit(cache=_JIT_CACHE)
def _exp_row_f64(s, ibuf, n, m):
    total = 0.0
    for t in range(n):
        e = math.exp(s[t] - m)
        s[t] = e
        total += e
    return total


@overload(_exp_row, jit_options={"cache": _JIT_CACHE})
def _exp_row_overload(s, ibuf, n, m):
    if s.dtype == types.float64:
        return lambda s, ibuf, n, m: _exp_row_f64(s, ibuf, n, m)
    return lambda s, ibuf, n, m: _exp_row_f32(s, ibuf, n, m)


# =================================================================================
# one work item: (sequence b, K/V head hk, keys [j0, j1)) for the R = G·Lq folded rows
# =================================================================================


@njit(cache=_JIT_CACHE, fastmath={"nnan", "ninf", "nsz", "reassoc"})
def _row_max_fast(s, i0, i1):
    # eight independent compare chains: LLVM does not vectorize a max reduction, and one
    # chain waits a compare's latency per element (9 % of a 16-bit item, perf)
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = s[i0]
    i = i0
    while i + 8 <= i1:
        m0 = s[i] if s[i] > m0 else m0
        m1 = s[i + 1] if s[i + 1] > m1 else m1
        m2 = s[i + 2] if s[i + 2] > m2 else m2
        m3 = s[i + 3] if s[i + 3] > m3 else m3
        m4 = s[i + 4] if s[i + 4] > m4 else m4
        m5 = s[i + 5] if s[i + 5] > m5 else m5
        m6 = s[i + 6] if s[i + 6] > m6 else m6
        m7 = s[i + 7] if s[i + 7] > m7 else m7
        i += 8
    while i < i1:
        m0 = s[i] if s[i] > m0 else m0
        i += 1
    m0 = m1 if m1 > m0 else m0
    m2 = m3 if m3 > m2 else m2
    m4 = m5 if m5 > m4 else m4
    m6 = m7 if m7 > m6 else m6
    m0 = m2 if m2 > m0 else m0
    m4 = m6 if m6 > m4 else m4
    return m4 if m4 > m0 else m0


@njit(cache=_JIT_CACHE, fastmath={"nsz", "reassoc"})
def _row_max(s, i0, i1):
    """``(max s[i0:i1], poisoned, hidden)``: the max (a loop that may assume finite values), whether
    a score is NaN or +inf — the scores that make the row NaN by IEEE arithmetic (``exp(s −
    max)``), and whether one is −inf.  A −inf score is not poison: it hides its key, as a mask
    does (docs/semantics.md; until 4 Dec it poisoned the row, where ``attention()`` and the
    reference hid the key)."""
    bad = 0
    hidden = 0
    for i in range(i0, i1):  # counts, not an early exit: the loop vectorizes
        bad += (s[i] != s[i]) | (s[i] == np.inf)
        hidden += s[i] == -np.inf
    return _row_max_fast(s, i0, i1), bad > 0, hidden > 0


@njit(cache=_JIT_CACHE, fastmath={"nsz"})
def _gather_rows(flat, st, table, ps, b, hk, j0, n, width, dst):
    """``dst[t·width : (t+1)·width]`` = the float cache row of key ``j0 + t`` (sequence ``b``,
    K/V head ``hk``) for ``t < n``: a chunk that is not consecutive rows (small pages) as one
    contiguous block for BLAS.

    The cache is read in place through ``flat`` and element strides ``st`` (page, head, slot);
    (page, slot) advance by one per key (no integer division in the loop).  Unsigned offsets:
    Numba adds no negative-index wraparound to them, so LLVM sees contiguous loads (signed
    ones compiled to gathers, 4× slower).
    """
    pg = j0 // ps
    slot = j0 - pg * ps
    for t in range(n):
        u = np.uint64(table[b, pg] * st[0] + hk * st[1] + slot * st[2])
        o = np.uint64(t * width)
        slot += 1
        if slot == ps:
            slot = 0
            pg += 1
        for d in range(width):
            dst[o + np.uint64(d)] = flat[u + np.uint64(d)]


@njit(cache=_JIT_CACHE, inline="always")
def _convert_row(flat, u, kind, width, dst, bits, at):
    """``dst[at : at + width]`` = the 16-bit cache row at ``flat[u:]`` as float32 (``u``
    unsigned); ``bits`` is ``dst`` viewed as uint32, made once by the caller (a view or slice
    per row costs two atomic reference-count updates, more than converting the row)."""
    a = np.uint64(at)
    if kind == KIND_BF16:
        for d in range(width):  # bfloat16 is the top half of a float32
            bits[a + np.uint64(d)] = np.uint32(flat[u + np.uint64(d)]) << np.uint32(16)
    else:
        for d in range(width):  # float16: an fpext that LLVM vectorizes (vcvtph2ps)
            dst[a + np.uint64(d)] = _half_to_float(flat[u + np.uint64(d)])


def _zero(x):
    """A zero of ``x``'s dtype (``x[0] * 0`` would be float64: Numba promotes with the int)."""
    raise NotImplementedError("compiled only")


@overload(_zero, inline="always", jit_options={"cache": _JIT_CACHE})
def _zero_overload(x):
    if x.dtype == types.float32:
        return lambda x: np.float32(0.0)
    return lambda x: np.float64(0.0)


def _rows_array(flat, buf):
    """Where the row loops read cache rows: a float cache in place, 16-bit rows converted
    into ``buf``.  Chosen once per loop — an array returned per key cost two atomic
    reference-count updates per key (6 % of a 16-bit item, perf)."""
    raise NotImplementedError("compiled only")


@overload(_rows_array, inline="always", jit_options={"cache": _JIT_CACHE})
def _rows_array_overload(flat, buf):
    if flat.dtype == types.uint16:
        return lambda flat, buf: buf
    return lambda flat, buf: flat


def _row_at(flat, u, kind, width, buf, bits, at):
    """The offset in ``_rows_array(flat, buf)`` of the cache row at ``flat[u:]``: ``u`` for a
    float cache; ``at`` for a 16-bit one, after converting the row into ``buf[at:at+width]``."""
    raise NotImplementedError("compiled only")


@overload(_row_at, inline="always", jit_options={"cache": _JIT_CACHE})
def _row_at_overload(flat, u, kind, width, buf, bits, at):
    if flat.dtype == types.uint16:

        def converted(flat, u, kind, width, buf, bits, at):
            _convert_row(flat, u, kind, width, buf, bits, at)
            return np.uint64(at)

        return converted
    return lambda flat, u, kind, width, buf, bits, at: u


@njit(cache=_JIT_CACHE, _nrt=True)
def _matmul(a, b, out):
    """``out = a · b`` (:func:`_np_matmul`, NumPy's dot) compiled with reference counting: the
    per-item functions (:func:`_item`, :func:`_chunk`) are compiled without it, and a callee
    inherits that unless it says otherwise (Numba's ``nrt`` flag) — where NumPy's dot has no
    implementation."""
    _np_matmul(a, b, out)


def _gemm_in_place(a, flat, base, n, width, out, transpose):
    """``out = a · blockᵀ`` (``transpose``) or ``a · block`` with ``block`` the ``(n, width)``
    rows of a float cache at ``flat[base:]``, read in place (16-bit caches never come here)."""
    raise NotImplementedError("compiled only")


@overload(_gemm_in_place, jit_options={"cache": _JIT_CACHE})
def _gemm_in_place_overload(a, flat, base, n, width, out, transpose):
    if flat.dtype == types.uint16:

        def unreachable(a, flat, base, n, width, out, transpose):
            pass  # 16-bit blocks are converted (gathered) first

        return unreachable

    def impl(a, flat, base, n, width, out, transpose):
        block = flat[base : base + n * width].reshape(n, width)
        if transpose:
            _matmul(a, block.T, out)
        else:
            _matmul(a, block, out)

    return impl


@njit(cache=_JIT_CACHE, inline="always")
def _rows_in_place(kind, st, ps, width, j0, n):
    """True where keys ``[j0, j0 + n)`` are ``n`` consecutive rows of one page of a float cache
    (the contiguous layouts): BLAS then reads them where they are, with no gather."""
    return kind == KIND_FLOAT and st[2] == width and j0 // ps == (j0 + n - 1) // ps


@njit(cache=_JIT_CACHE, inline="always")
def _row_offset(st, table, ps, b, hk, j):
    pg = j // ps
    return table[b, pg] * st[0] + hk * st[1] + (j - pg * ps) * st[2]


@njit(cache=_JIT_CACHE, fastmath={"nsz", "reassoc"}, _nrt=False)
def _all_finite(x, count):
    """No NaN or ±inf in ``x[:count]`` (``x·0`` is 0 exactly for finite ``x``)."""
    check = x[0] * 0.0
    for i in range(count):
        check += x[i] * 0.0
    return check == 0.0


@njit(cache=_JIT_CACHE, fastmath={"nsz", "contract", "reassoc"})
def _pv_skipping_zeros(p, R, n, vc, Dv, o, ob, st):
    """``o (R·Dv) += P · V`` key by key, skipping ``p = 0`` exactly: a chunk whose values are not
    all finite must not let a hidden value in (``0 · NaN``) — the NaN policy; a live key whose
    ``p`` underflowed still brings its NaN/±inf values (:func:`_live_underflow`).  Summed into
    ``ob`` (R·Dv zeros), added to ``o`` every PV_SUM_KEYS keys."""
    for t in range(n):
        v0 = np.uint64(t * Dv)
        for r in range(R):
            pr = p[r * n + t]
            o0 = np.uint64(r * Dv)
            if pr != 0.0:
                for d in range(Dv):
                    ob[o0 + np.uint64(d)] += pr * vc[v0 + np.uint64(d)]
            elif _live_underflow(st, r, t):
                for d in range(Dv):
                    xv = vc[v0 + np.uint64(d)]
                    if not math.isfinite(xv):
                        ob[o0 + np.uint64(d)] += xv
        if (t + 1) % PV_SUM_KEYS == 0 or t + 1 == n:
            _add_block(o, ob, R * Dv)


# a live key's weight where it underflowed, in rows where −inf scores hide other keys (the
# least positive float32; a float64 row takes it as it is): p·inf = inf, p·NaN = NaN
LEAST_POSITIVE = 1.401298464324817e-45


@njit(cache=_JIT_CACHE, inline="always")
def _live_underflow(st, r, t):
    """Whether key ``t``'s ``pr = 0`` is a live key's weight that underflowed — the row sees the
    key and its score is not −inf — rather than a hidden key's: a live key weighs > 0 however it
    rounds, so its NaN/±inf values reach the row (docs/semantics.md, non-finite inputs).  The row's
    ``[tlo, thi)`` and whether −inf scores hide keys in it are at ``st[r·FUSED_STATS:]`` (step 2
    of :func:`_chunk`); where they do, an underflowed live weight was stored as
    :data:`LEAST_POSITIVE`, so a 0 there is a hidden key's."""
    at = r * FUSED_STATS
    return st[at] <= t < st[at + 1] and st[at + 2] == 0.0


@njit(cache=_JIT_CACHE, inline="always")
def _add_block(o, ob, count):
    """``o[:count] += ob[:count]``, then ``ob[:count] = 0``: a block of keys' P·V sums joins the
    output's (PV_SUM_KEYS)."""
    for i in range(count):
        o[i] += ob[i]
        ob[i] = 0.0


def _pv_gemm(s, R, n, flat, base, Dv, o, pb, ob):
    """``o (R·Dv) = P · V`` by BLAS, ``P = s (R, n)``, ``V`` the ``(n, Dv)`` rows at ``flat[base:]``
    (a float cache in place, or the gathered rows): float32 one GEMM per PV_GEMM_KEYS keys, each
    block's ``P`` copied into ``pb`` (R·PV_GEMM_KEYS) and its product into ``ob`` (R·Dv), then
    added to ``o`` (16-bit caches never come here; float64 one GEMM: its rounding is far below
    the float32 of every naive baseline)."""
    raise NotImplementedError("compiled only")


@overload(_pv_gemm, jit_options={"cache": _JIT_CACHE})
def _pv_gemm_overload(s, R, n, flat, base, Dv, o, pb, ob):
    if flat.dtype == types.uint16:

        def unreachable(s, R, n, flat, base, Dv, o, pb, ob):
            pass  # never called: 16-bit caches compute in float32, on the 16-lane loops (_uses_simd_pv)

        return unreachable
    if s.dtype != types.float32:

        def whole(s, R, n, flat, base, Dv, o, pb, ob):
            _matmul(s[: R * n].reshape(R, n), flat[base : base + n * Dv].reshape(n, Dv), o[: R * Dv].reshape(R, Dv))

        return whole

    def blocked(s, R, n, flat, base, Dv, o, pb, ob):
        for t0 in range(0, n, PV_GEMM_KEYS):
            kb = min(PV_GEMM_KEYS, n - t0)
            for r in range(R):
                for t in range(kb):
                    pb[r * kb + t] = s[r * n + t0 + t]
            vb = flat[base + t0 * Dv : base + (t0 + kb) * Dv].reshape(kb, Dv)
            _matmul(pb[: R * kb].reshape(R, kb), vb, ob[: R * Dv].reshape(R, Dv))
            if t0 == 0:
                for i in range(R * Dv):
                    o[i] = ob[i]
            else:
                for i in range(R * Dv):
                    o[i] += ob[i]

    return blocked


# float caches take the 16-lane loops up to this many folded query rows (a chunked prefill's
# R = G·Lq can be large: there BLAS's register-blocked GEMM reads each key row once for all)
SIMD_MAX_ROWS_FLOAT = 16


# The 16 lane sums of a row's P are kept per block of SUM_VECTORS pieces (8 keys a lane) and
# added to the row's totals block by block: added one by one into a lane already holding the
# row's largest P (≈ 1), each small P rounds at ulp(1)/2 (the general kernels' SUM_KEYS).
SUM_VECTORS = 8


def _is_float32_array(s):
    return isinstance(s, types.Array) and s.dtype == types.float32


def _ir_row_args(context, builder, signature, args):
    """A row intrinsic's ``(s, i0, count, x)`` as IR: ``s``'s data pointer, ``i0`` and ``count``
    as i64, ``x`` as a float32 splat."""
    at = signature.args
    sd = context.make_array(at[0])(context, builder, args[0]).data
    i0_, count_ = (_ir_i64(context, builder, args[i], at[i]) for i in (1, 2))
    return sd, i0_, count_, _ir_splat(builder, context.cast(builder, args[3], at[3], types.float32))


@intrinsic
def _exp_sum16(typingctx, s, i0, count, m):
    """``s[i0 : i0 + count] = exp(s − m)`` in place, 16 lanes at a time (``count % 16 == 0``,
    ``m`` finite, arguments ≤ 0, −inf → 0); returns the sum (16 lane sums in blocks of
    SUM_VECTORS pieces, then the lanes in order).  ``(s − m)·log2(e)`` is subtracted first, then 2**x as
    :func:`_exp_row_f32` (the same polynomial, clamp and exponent rule)."""
    if not _is_float32_array(s):
        return None
    sig = types.float32(s, i0, count, m)

    def codegen(context, builder, signature, args):
        sd, i0_, count_, m_v = _ir_row_args(context, builder, signature, args)
        log2e = ir.Constant(_V16F, [float(np.float32(LOG2E))] * _LANES)
        one = ir.Constant(_V16F, [1.0] * _LANES)
        zero = ir.Constant(_V16F, [0.0] * _LANES)
        total = cgutils.alloca_once(builder, _V16F)
        part = cgutils.alloca_once(builder, _V16F)
        builder.store(zero, total)
        builder.store(zero, part)
        nvec = builder.sdiv(count_, ir.Constant(_IRI64, _LANES))
        block = ir.Constant(_IRI64, SUM_VECTORS)
        with cgutils.for_range(builder, nvec) as piece:
            at_ = builder.add(i0_, builder.mul(piece.index, ir.Constant(_IRI64, _LANES)))
            ptr = builder.bitcast(builder.gep(sd, [at_]), _V16F.as_pointer())
            x = builder.fmul(builder.fsub(builder.load(ptr, align=4), m_v), log2e)
            p = _exp2_vector(builder, x, one, zero)
            builder.store(p, ptr, align=4)
            builder.store(builder.fadd(builder.load(part), p), part)
            # every SUM_VECTORS pieces the block's lane sums join the total (see SUM_VECTORS)
            last = builder.icmp_signed("==", builder.srem(piece.index, block), ir.Constant(_IRI64, SUM_VECTORS - 1))
            with builder.if_then(last):
                builder.store(builder.fadd(builder.load(total), builder.load(part)), total)
                builder.store(zero, part)
        vec = builder.fadd(builder.load(total), builder.load(part))
        acc = builder.extract_element(vec, ir.Constant(_IRI32, 0))
        for lane in range(1, _LANES):
            acc = builder.fadd(acc, builder.extract_element(vec, ir.Constant(_IRI32, lane)))
        return acc

    return sig, codegen


@intrinsic
def _softcap16(typingctx, s, i0, count, cap):
    """``s[i0 : i0 + count] = cap · tanh(s / cap)`` in place, 16 lanes at a time (the last piece
    through a mask: nothing past ``i0 + count`` read or written); ``tanh`` by
    :func:`_cpu_simd._tanh_vector`, the fused pass's: a score gets the same bits on every route."""
    if not _is_float32_array(s):
        return None
    sig = types.void(s, i0, count, cap)

    def codegen(context, builder, signature, args):
        sd, i0_, count_, c = _ir_row_args(context, builder, signature, args)
        c16 = ir.Constant(_IRI64, _LANES)
        lanes = ir.Constant(_V16I32, list(range(_LANES)))
        nvec = builder.sdiv(builder.add(count_, ir.Constant(_IRI64, _LANES - 1)), c16)
        with cgutils.for_range(builder, nvec) as piece:
            start = builder.mul(piece.index, c16)
            left = builder.sub(count_, start)
            left = builder.trunc(builder.select(builder.icmp_signed("<", left, c16), left, c16), _IRI32)
            mask = builder.icmp_signed("<", lanes, _ir_splat_i32(builder, left))
            ptr = builder.bitcast(builder.gep(sd, [builder.add(i0_, start)]), _V16F.as_pointer())
            x = builder.call(_ir_masked(builder, _V16F), [ptr, ir.Constant(_IRI32, 4), mask, ir.Constant(_V16F, [0.0] * _LANES)])
            y = builder.fmul(c, _tanh_vector(builder, builder.fdiv(x, c)))
            builder.call(_ir_masked(builder, _V16F, store=True), [y, ptr, ir.Constant(_IRI32, 4), mask])
        return context.get_dummy_value()

    return sig, codegen


def _softcap_row(s, i0, count, cap):
    """``s[i0 : i0 + count] = cap · tanh(s / cap)``: :func:`_softcap16` for float32 scores, libm's
    ``tanh`` for float64 ones (the float64 path is the reference's precision)."""
    raise NotImplementedError("compiled only")


@overload(_softcap_row, jit_options={"cache": _JIT_CACHE})
def _softcap_row_overload(s, i0, count, cap):
    if s.dtype == types.float32:
        return lambda s, i0, count, cap: _softcap16(s, i0, count, cap)

    def scalar(s, i0, count, cap):
        for t in range(i0, i0 + count):
            s[t] = cap * math.tanh(s[t] / cap)

    return scalar


def _exp_sum_simd(s, i0, count, m):
    """:func:`_exp_sum16` for a float32 row; never reached for float64."""
    raise NotImplementedError("compiled only")


@overload(_exp_sum_simd, jit_options={"cache": _JIT_CACHE})
def _exp_sum_simd_overload(s, i0, count, m):
    if s.dtype == types.float32:
        return lambda s, i0, count, m: _exp_sum16(s, i0, count, m)
    return lambda s, i0, count, m: 0.0


def _simd_dtype(q):
    """True where the compute dtype is float32 (the 16-lane loops); float64 calls use BLAS."""
    raise NotImplementedError("compiled only")


@overload(_simd_dtype, inline="always", jit_options={"cache": _JIT_CACHE})
def _simd_dtype_overload(q):
    if q.dtype == types.float32:
        return lambda q: True
    return lambda q: False


def _scores_simd(q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, pk, npf):
    """:func:`_scores16` for a float32 call; never reached (nothing) for float64."""
    raise NotImplementedError("compiled only")


@overload(_scores_simd, jit_options={"cache": _JIT_CACHE})
def _scores_simd_overload(q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, pk, npf):
    if q.dtype == types.float32:
        return lambda q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, pk, npf: _scores16(
            q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, pk, npf)
    return lambda q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, pk, npf: None


def _scores_dot(qp, R, D, flat, qscale, offs, n, s, ns, vflat, voffs, Dv, pk, npf):
    """:func:`_scores_dot16` for a bfloat16 cache (uint16 bits) and float32 scores; never
    reached (nothing) for the others."""
    raise NotImplementedError("compiled only")


@overload(_scores_dot, jit_options={"cache": _JIT_CACHE})
def _scores_dot_overload(qp, R, D, flat, qscale, offs, n, s, ns, vflat, voffs, Dv, pk, npf):
    if flat.dtype == types.uint16 and s.dtype == types.float32:
        return lambda qp, R, D, flat, qscale, offs, n, s, ns, vflat, voffs, Dv, pk, npf: _scores_dot16(
            qp, R, D, flat, qscale, offs, n, s, ns, vflat, voffs, Dv, pk, npf)
    return lambda qp, R, D, flat, qscale, offs, n, s, ns, vflat, voffs, Dv, pk, npf: None


def _pv_simd(p, ns, R, n, flat, kind, offs, Dv, o, kflat, pk, npf, D):
    """:func:`_pv16` for a float32 call; never reached (nothing) for float64."""
    raise NotImplementedError("compiled only")


@overload(_pv_simd, jit_options={"cache": _JIT_CACHE})
def _pv_simd_overload(p, ns, R, n, flat, kind, offs, Dv, o, kflat, pk, npf, D):
    if p.dtype == types.float32:
        return lambda p, ns, R, n, flat, kind, offs, Dv, o, kflat, pk, npf, D: _pv16(
            p, ns, R, n, flat, kind, offs, Dv, o, kflat, pk, npf, D)
    return lambda p, ns, R, n, flat, kind, offs, Dv, o, kflat, pk, npf, D: None


def _fused_simd(q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, o, m, st, pk, pv, npf, cap, ab, alibi):
    """:func:`_fused16` for a 16-bit or float32 cache and float32 compute; never reached (nothing) for the others."""
    raise NotImplementedError("compiled only")


# compiled without NRT (as _item and _chunk): with it, each of the pass's ten array arguments was
# incref'd and decref'd per item (atomic adds: ≈ 2.8 % of a B1 4k item's samples in NRT_incref/decref)
@overload(_fused_simd, jit_options={"cache": _JIT_CACHE, "_nrt": False})
def _fused_simd_overload(q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, o, m, st, pk, pv, npf, cap, ab, alibi):
    if q.dtype == types.float32 and flat.dtype in (types.uint16, types.float32):
        return lambda q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, o, m, st, pk, pv, npf, cap, ab, alibi: _fused16(
            q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, o, m, st, pk, pv, npf, cap, ab, alibi)
    return lambda q, R, D, flat, kind, offs, n, s, ns, vflat, voffs, Dv, o, m, st, pk, pv, npf, cap, ab, alibi: None


@njit(cache=_JIT_CACHE, inline="always")
def _all_visible(R, Lq, pos0, j0, n, causal, left, right):
    """Whether every folded row sees every key of the chunk ``[j0, j0 + n)`` (the bounds of
    :func:`_chunk`'s masks)."""
    for r in range(R):
        pos = pos0 + r % Lq
        if causal and pos - j0 + 1 < n:
            return False
        if left >= 0 and pos - left - j0 > 0:
            return False
        if right >= 0 and pos + right - j0 + 1 < n:
            return False
    return True


@njit(cache=_JIT_CACHE, inline="always")
def _uses_simd(q, D, Dv, kind, R):
    """Whether a chunk runs the 16-lane loops (float32 compute; float caches up to
    SIMD_MAX_ROWS_FLOAT rows; head dims not multiples of 16 with a masked last piece); else BLAS
    for float caches and the row-by-row loops for 16-bit ones (float64 compute)."""
    return _simd_dtype(q) and (kind != KIND_FLOAT or R <= SIMD_MAX_ROWS_FLOAT)


@njit(cache=_JIT_CACHE, inline="always")
def _uses_simd_pv(q, kind, R):
    """Whether a chunk's P·V runs the 16-lane loop (:func:`_pv16`, masked tail pieces where Dv is
    not a multiple of 16): float32 compute, and for float caches at most SIMD_MAX_ROWS_FLOAT rows
    (else one BLAS GEMM per PV_GEMM_KEYS keys).  Its scores may still go to BLAS or the rows."""
    return _simd_dtype(q) and (kind != KIND_FLOAT or R <= SIMD_MAX_ROWS_FLOAT)


@njit(cache=_JIT_CACHE, inline="always")
def _fill_offsets(st, table, ps, b, hk, j0, n, offs):
    """``offs[t]`` = the element offset of key ``j0 + t``'s row (sequence ``b``, K/V head ``hk``)."""
    pg = j0 // ps
    slot = j0 - pg * ps
    t = 0
    while t < n:  # page by page: the rows of one page are evenly spaced (a loop that vectorizes)
        run = min(n - t, ps - slot)
        base = table[b, pg] * st[0] + hk * st[1] + slot * st[2]
        step = st[2]
        # indexed from 0 (a view): offs[t + i] with a signed index wrapped around per element,
        # which LLVM vectorized as a scatter (vpscatterqq): 231 → 119 ns per 256 offsets
        run_offs = offs[t : t + run]
        for i in range(run):
            run_offs[i] = base + i * step
        t += run
        pg += 1
        slot = 0


@njit(cache=_JIT_CACHE, fastmath={"nsz", "contract"})
def _pv_offsets_skipping_zeros(p, ns, R, n, flat, kind, offs, Dv, o, row, ob, st):
    """``o (R·Dv) += P · V`` key by key through the row offsets, skipping ``p = 0`` exactly (the
    NaN policy's redo of a chunk whose output is not finite) — but for a live key whose ``p``
    underflowed, whose NaN/±inf values still count (:func:`_live_underflow`); 16-bit rows
    converted into ``row``; summed into ``ob`` (R·Dv zeros), added to ``o`` every PV_SUM_KEYS keys."""
    bits = row.view(np.uint32)
    x = _rows_array(flat, row)
    for t in range(n):
        xo = _row_at(flat, np.uint64(offs[t]), kind, Dv, row, bits, 0)
        for r in range(R):
            pr = p[r * ns + t]
            o0 = np.uint64(r * Dv)
            if pr != 0.0:
                for d in range(Dv):
                    ob[o0 + np.uint64(d)] += pr * x[xo + np.uint64(d)]
            elif _live_underflow(st, r, t):
                for d in range(Dv):
                    xv = x[xo + np.uint64(d)]
                    if not math.isfinite(xv):
                        ob[o0 + np.uint64(d)] += xv
        if (t + 1) % PV_SUM_KEYS == 0 or t + 1 == n:
            _add_block(o, ob, R * Dv)



@njit(cache=_JIT_CACHE, fastmath={"nsz", "contract", "reassoc"}, _nrt=False)
def _chunk(
    qf, R, b, hk, j0, j1, kflat, kst, vflat, vst, table, ps, kind, D, Dv, G, Lq, pos0,
    causal, left, right, softcap, slopes, has_alibi, o_out, lse_out, kc, vc, offs, npf, qp, qscale, dot, work, ibuf,
):
    """Partial attention of the R folded rows ``qf (R·D,)`` (pre-scaled) over keys ``[j0, j1)``;
    with ``dot``, the scores are ``qscale · (q·k)`` of q's bfloat16 bits ``qp[:R·D]`` by
    :func:`_scores_dot16` (``qf``: the same q unscaled; a bfloat16 cache, ``D % 32 == 0``).

    ``o_out (R, Dv)`` gets the chunk's normalized output, ``lse_out (R,)`` its LSE
    (−inf and 0 for a row that sees no key of the chunk).  Query row ``r`` is head
    ``hk·G + r // Lq``, position ``pos0 + r % Lq``.  ``kc``/``vc`` are scratch for the chunk's
    keys and values (``SPLIT · D`` and ``SPLIT · Dv`` elements of the compute dtype); ``work``
    (:func:`_work_size` elements of it) and ``ibuf`` (``SPLIT`` int32) for the scores, row
    maxima and sums and the unnormalized output — a thread's, allocated once per kernel entry
    (five allocations per item before: ≈ 1 µs of an item's bookkeeping at B1 4k).

    1. ``S = Q · Kᵀ``: float caches by one BLAS GEMM (on the rows in place, or gathered into
       ``kc``); 16-bit caches key row by key row, each converted once into ``kc``;
    2. per row: score chain, masks, max, ``P = exp(S − m)``, row sum (1-D loops, vectorized);
    3. ``O = P · V``: float caches by BLAS (float32: a GEMM per PV_GEMM_KEYS keys), redone key
       by key skipping ``p = 0`` where an output is not finite (a NaN or ±inf value got in,
       maybe through ``0·NaN``: a hidden NaN must never enter a row); 16-bit caches value row
       by value row, converted into ``vc``, always skipping ``p = 0`` — every route summing
       in blocks of keys (PV_SUM_KEYS, PV_GEMM_KEYS: an attention sink's row);
    4. normalize: ``o = O / l``, ``lse = m + log l`` (float64: ``lse_out`` is, whatever q).
    The GEMMs' shapes depend only on the chunk (``R``, its length, ``D``), never on the batch,
    the capacity or the page layout: the bits are the same wherever the sequence sits.
    """
    T = qf.dtype
    n = j1 - j0
    # the 16-lane loops (float32 compute, whole 16-lane pieces of D and Dv); else BLAS for float
    # caches and the row-by-row loops for 16-bit ones
    simd = _uses_simd(qf, D, Dv, kind, R)
    ns = (n + 15) // 16 * 16 if simd else n  # score row stride (the 16-lane loop writes whole vectors)
    # scores then probabilities, row r at [r·ns, r·ns + n); then the rows' maxima and sums, and O
    s_size = R * ((max(ns, 1) + 15) // 16 * 16)
    rows = (R + 15) // 16 * 16
    s = work[: R * max(ns, 1)]  # exactly R·ns: the BLAS paths view it as (R, n)
    m_row = work[s_size : s_size + R]
    l_row = work[s_size + rows : s_size + rows + R]
    o_at = s_size + 2 * rows
    o = work[o_at : o_at + R * Dv]
    o[:] = 0.0
    # P·V's block buffers: a block's P for BLAS (PV_GEMM_KEYS), a block's sums
    pb_at = o_at + (R * Dv + 15) // 16 * 16
    ob_at = pb_at + (R * PV_GEMM_KEYS + 15) // 16 * 16
    pb = work[pb_at : pb_at + R * PV_GEMM_KEYS]
    ob = work[ob_at : ob_at + R * Dv]
    st_at = ob_at + (R * Dv + 15) // 16 * 16
    st = work[st_at : st_at + R * FUSED_STATS]  # the fused pass's row states
    sp = offs.shape[0] // 4  # offs: this chunk's key rows, its value rows, the next item's key and value rows
    koffs = offs[: max(n, 1)]
    voffs = offs[sp : sp + max(n, 1)]
    pk = offs[2 * sp : 2 * sp + max(npf, 1)]
    pv = offs[3 * sp : 3 * sp + max(npf, 1)]
    done = False  # the fused pass ran (FUSED16): O, maxima and sums are in place
    if (
        (FUSED32 if kind == KIND_FLOAT else FUSED16) and n > 0 and simd and not dot
        and Dv % 16 == 0 and _all_visible(R, Lq, pos0, j0, n, causal, left, right)
    ):
        _fill_offsets(kst, table, ps, b, hk, j0, n, koffs)
        _fill_offsets(vst, table, ps, b, hk, j0, n, voffs)
        for r in range(R):
            m_row[r] = -np.inf
        st[:] = 0.0
        ab = pb[: 2 * R]  # ALiBi's slopes and distances (pb: the BLAS P·V's, unused on this route)
        if has_alibi:
            for r in range(R):
                ab[r] = slopes[b, hk * G + r // Lq]
                ab[R + r] = pos0 + r % Lq - j0
        _fused_simd(qf, R, D, kflat, kind, koffs, n, s, ns, vflat, voffs, Dv, o, m_row, st, pk, pv, npf if NEXT_SCHEME else 0,
                    softcap, ab, has_alibi)
        # a hidden NaN or ±inf value got in, or a score is NaN or ±inf (the check vector): the
        # passes below redo the chunk — they make a NaN or +inf score's row NaN and let a −inf
        # score hide its key, which the online softmax here does not
        done = _all_finite(o, R * Dv)
        if done:
            for r in range(R):
                at = r * FUSED_STATS
                total = st[at] + st[at + 16]
                check = st[at + 32]
                for lane in range(1, 16):
                    total += st[at + lane] + st[at + 16 + lane]
                    check += st[at + 32 + lane]
                l_row[r] = total if check == 0.0 else np.nan
            for r in range(R):  # (a loop of its own: the one above keeps its code, and its bits)
                if l_row[r] != l_row[r]:
                    done = False
        if not done:
            o[:] = 0.0
    if n > 0 and not done:
        # ---- 1. scores ----
        if simd:
            _fill_offsets(kst, table, ps, b, hk, j0, n, koffs)
            _fill_offsets(vst, table, ps, b, hk, j0, n, voffs)
            if dot:
                _scores_dot(qp, R, D, kflat, qscale, koffs, n, s, ns, vflat, voffs, Dv, pk, npf if NEXT_SCHEME else 0)
            else:
                _scores_simd(qf, R, D, kflat, kind, koffs, n, s, ns, vflat, voffs, Dv, pk, npf if NEXT_SCHEME else 0)
        elif _rows_in_place(kind, kst, ps, D, j0, n):
            _gemm_in_place(qf.reshape(R, D), kflat, _row_offset(kst, table, ps, b, hk, j0), n, D, s.reshape(R, n), True)
        else:
            _gather_rows(kflat, kst, table, ps, b, hk, j0, n, D, kc)
            _matmul(qf.reshape(R, D), kc[: n * D].reshape(n, D).T, s.reshape(R, n))
    # ---- 2. masks and softmax, row by row ----
    for r in range(0 if done else R):
        pos = pos0 + r % Lq
        # keys of this chunk the row sees: t ∈ [tlo, thi) (the rules of
        # semantics.AttentionCall.visible, solved for t)
        tlo, thi = 0, n
        if causal:
            thi = min(thi, pos - j0 + 1)
        if left >= 0:
            tlo = max(tlo, pos - left - j0)
        if right >= 0:
            thi = min(thi, pos + right - j0 + 1)
        tlo = min(max(tlo, 0), n)
        thi = min(max(thi, tlo), n)
        r0 = r * ns
        # the row's live keys for the P·V redo (_live_underflow): [tlo, thi), and whether −inf
        # scores hide some of them (then an underflowed live key's p is the least positive float
        # instead of 0, and a p of 0 is a hidden key's)
        at = r * FUSED_STATS
        st[at], st[at + 1], st[at + 2] = tlo, thi, 0.0
        if softcap > 0.0:
            _softcap_row(s, r0 + tlo, thi - tlo, softcap)
        if has_alibi:
            slope = slopes[b, hk * G + r // Lq]
            for t in range(tlo, thi):
                s[r0 + t] -= slope * abs(pos - j0 - t)
        for t in range(r0, r0 + tlo):
            s[t] = -np.inf
        for t in range(r0 + thi, r0 + ns):  # with the 16-lane loops, the row's padding too
            s[t] = -np.inf
        if thi == tlo:
            m_row[r] = -np.inf
            l_row[r] = 0.0
            for t in range(r0, r0 + ns):
                s[t] = 0.0
            continue
        m, poisoned, hidden = _row_max(s, r0 + tlo, r0 + thi)
        if m == -np.inf and not poisoned:  # every key it sees has a −inf score: hidden, as by a mask
            m_row[r] = -np.inf
            l_row[r] = 0.0
            st[at + 1] = tlo  # nothing live
            for t in range(r0, r0 + ns):
                s[t] = 0.0
            continue
        if hidden:  # the row's scores before the exp (kc: the keys' scratch, free after the scores)
            st[at + 2] = 1.0
            for t in range(tlo, thi):
                kc[t] = s[r0 + t]
        m_row[r] = m
        if simd:
            l_row[r] = _exp_sum_simd(s, r0, ns, m)
        else:
            l_row[r] = _exp_row(s[r0 : r0 + n], ibuf, n, m)
        if hidden:
            for t in range(tlo, thi):
                if s[r0 + t] == 0.0 and kc[t] != -np.inf:
                    s[r0 + t] = LEAST_POSITIVE  # live, underflowed: > 0, as exact arithmetic has it
        if poisoned:  # a NaN or +inf score: the row is NaN, as IEEE arithmetic says
            l_row[r] = np.nan
    # ---- 3. P · V ----
    if n > 0 and not done:
        if _uses_simd_pv(qf, kind, R):  # the 16-lane loop, whatever the head dims
            if not simd:  # (the scores pass filled the value rows' offsets)
                _fill_offsets(vst, table, ps, b, hk, j0, n, voffs)
            if NEXT_SCHEME:  # the next item's value rows (its keys: the scores pass)
                _pv_simd(s, ns, R, n, vflat, kind, voffs, Dv, o, vflat, pv, npf, Dv)
            else:
                _pv_simd(s, ns, R, n, vflat, kind, voffs, Dv, o, kflat, pk, npf, D)
            if not _all_finite(o, R * Dv):  # a hidden NaN or ±inf value got in: redo skipping p = 0
                o[:] = 0.0
                ob[:] = 0.0
                _pv_offsets_skipping_zeros(s, ns, R, n, vflat, kind, voffs, Dv, o, vc, ob, st)
        else:
            # GEMMs (one per PV_GEMM_KEYS keys in float32: _pv_gemm), then a check of the R·Dv
            # outputs: where a value is NaN or ±inf, some output is too (0·NaN, p·inf), and the
            # chunk is redone key by key skipping p = 0.  (Scanning the n·Dv values first read
            # them twice: a third of a float32 item.)
            if _rows_in_place(kind, vst, ps, Dv, j0, n):
                _pv_gemm(s, R, n, vflat, _row_offset(vst, table, ps, b, hk, j0), Dv, o, pb, ob)
            else:
                _gather_rows(vflat, vst, table, ps, b, hk, j0, n, Dv, vc)
                _pv_gemm(s, R, n, vc, 0, Dv, o, pb, ob)
            if not _all_finite(o, R * Dv):
                o[:] = 0.0
                ob[:] = 0.0
                _gather_rows(vflat, vst, table, ps, b, hk, j0, n, Dv, vc)
                _pv_skipping_zeros(s, R, n, vc, Dv, o, ob, st)
    # ---- 4. normalize ----
    for r in range(R):
        l = l_row[r]
        if l > 0.0 or l != l:  # a NaN sum (poisoned row) stays NaN, as in IEEE arithmetic
            inv = 1.0 / l
            for d in range(Dv):
                o_out[r, d] = o[r * Dv + d] * inv
            # in float64 (lse_out is): m + log l rounded to float32 lost ≈ ulp(m) — 1e-3 at m ≈ 1e4,
            # a merge weight exp(lseᵢ − M) 5e-5 off where float32 scores were exact (fuzzing, 6 Dec)
            lse_out[r] = np.float64(m_row[r]) + math.log(np.float64(l))
        else:
            for d in range(Dv):
                o_out[r, d] = 0.0
            lse_out[r] = -np.inf


@njit(cache=_JIT_CACHE, _nrt=False)
def _merge(part_o, part_lse, first, count, out_rows, lse_rows, wbuf, wcast):
    """Merge parts ``first … first+count−1`` (chunk order) of one (sequence, K/V head).

    The math of :func:`dotattn.merge_attention_states`: ``lse = M + log Σ exp(lseᵢ − M)``,
    ``o = Σ exp(lseᵢ − lse)·oᵢ`` (computed as ``wᵢ / Σw`` with ``wᵢ = exp(lseᵢ − M)``); a part
    with ``lse = −inf`` contributes nothing; no part with keys → 0 and −inf.  ``wbuf`` (float64,
    ≥ ``count``) and ``wcast`` (one element of the output's dtype) are the thread's scratch
    (:func:`_merge_scratch`).
    """
    R, Dv = out_rows.shape
    for r in range(R):
        M = -np.inf
        poisoned = False
        for c in range(count):
            x = part_lse[first + c, r]
            poisoned |= x != x
            M = x if x > M else M
        if poisoned:  # a NaN part makes the row NaN (as merge_attention_states does)
            for d in range(Dv):
                out_rows[r, d] = np.nan
            lse_rows[r] = np.nan
            continue
        if M == -np.inf:
            for d in range(Dv):
                out_rows[r, d] = 0.0
            lse_rows[r] = -np.inf
            continue
        # wᵢ = exp(lseᵢ − M) once per part (0 for −inf), then o = Σ (wᵢ / Σw)·oᵢ with weights in
        # the output's dtype: one exp per part and row instead of two (exp(lseᵢ − lse) again),
        # and for float32 calls float32 multiply-adds (a float64 weight made every one convert):
        # the merges after the items, on one thread, 0.148 → 0.086 ms at B1 32k and 1.42 → 0.87
        # ms at B8 32k (128 parts per (sequence, K/V head); /tmp-style A/B, load 1.8); outputs
        # within 1e-7 relative, same LSE.  float64 calls keep float64 weights (a float32 one
        # cost them 1e-8 of error once a sequence had two chunks: 4 Dec 2026)
        total = 0.0
        for c in range(count):
            w = math.exp(part_lse[first + c, r] - M)
            wbuf[c] = w
            total += w
        lse = M + math.log(total)
        inv = 1.0 / total
        for d in range(Dv):
            out_rows[r, d] = 0.0
        for c in range(count):
            if part_lse[first + c, r] == -np.inf:  # a part without keys: nothing, not even 0·NaN
                continue
            wcast[0] = wbuf[c] * inv
            w = wcast[0]
            if w == 0.0:  # a part with keys weighs > 0 however it rounds: its NaN/±inf still count
                for d in range(Dv):
                    x = part_o[first + c, r, d]
                    if not math.isfinite(x):
                        out_rows[r, d] += x
                continue
            for d in range(Dv):
                out_rows[r, d] += w * part_o[first + c, r, d]
        lse_rows[r] = lse


# =================================================================================
# the entry points: plan, items (on any threads), merges
# =================================================================================


@njit(cache=_JIT_CACHE)
def _plan(kvlen, Lq, Hkv, split, causal, left, right):
    """Per sequence: first chunk, chunk count, first work item; and the item total."""
    B = kvlen.shape[0]
    c0 = np.zeros(B, dtype=np.int64)
    nch = np.zeros(B, dtype=np.int64)
    start = np.zeros(B + 1, dtype=np.int64)
    for b in range(B):
        n = kvlen[b]
        lo = 0
        hi = n
        if right >= 0:
            hi = min(hi, n - 1 + right + 1)
        if left >= 0:
            lo = max(lo, n - Lq - left)
        if lo < hi and Lq > 0:
            c0[b] = lo // split
            nch[b] = (hi - 1) // split - c0[b] + 1
        start[b + 1] = start[b] + nch[b] * Hkv
    return c0, nch, start


@njit(cache=_JIT_CACHE, inline="always")
def _item_keys(it, B, Lq, kvlen, split, left, right, c0, nch, start):
    """``(b, hk, j0, j1, pos0)`` of work item ``it``: its sequence, K/V head and keys."""
    # the sequence of item ``it``: binary search in ``start``
    lo_b, hi_b = 0, B
    while hi_b - lo_b > 1:
        mid = (lo_b + hi_b) // 2
        if start[mid] <= it:
            lo_b = mid
        else:
            hi_b = mid
    b = lo_b
    rem = it - start[b]
    hk = rem // nch[b]
    c = c0[b] + rem % nch[b]
    n = kvlen[b]
    pos0 = n - Lq
    j_lo = 0 if left < 0 else max(0, pos0 - left)
    j_hi = n if right < 0 else min(n, n - 1 + right + 1)
    j0 = max(c * split, j_lo)
    j1 = min((c + 1) * split, j_hi)
    return b, hk, j0, j1, pos0


# rows of the next work item's keys asked for while an item runs (its first blocks: the
# loops' own prefetch takes over from there)
PREFETCH_NEXT_ROWS = 32
# 16-bit caches: their rows are half as many lines; the burst of requests stalls the thread once
# the fill buffers are taken (3.7 % of a B1 4k float16 item's samples on its prefetcht0 at 32 rows)
PREFETCH_NEXT_ROWS_16 = 16


@njit(cache=_JIT_CACHE, _nrt=False)
def _prefetch_item(it, q, kflat, kst, table, ps, kvlen, split, left, right, c0, nch, start):
    """Ask for the first key rows of work item ``it`` (a hint: an item that another thread
    takes costs a few wasted lines)."""
    B, Hq, Lq, D = q.shape
    b, hk, j0, j1, pos0 = _item_keys(it, B, Lq, kvlen, split, left, right, c0, nch, start)
    pg = j0 // ps
    slot = j0 - pg * ps
    for t in range(min(j1 - j0, PREFETCH_NEXT_ROWS if kflat.itemsize == 4 else PREFETCH_NEXT_ROWS_16)):
        _prefetch_row(kflat, kst, table, b, hk, pg, slot, D)
        slot += 1
        if slot == ps:
            slot = 0
            pg += 1


@njit(cache=_JIT_CACHE, _nrt=False)
def _item(
    it, q, kflat, kst, vflat, vst, table, ps, kind, kvlen, split, causal, left, right, softcap,
    qscale, slopes, has_alibi, c0, nch, start, part_o, part_lse, Hkv, kc, vc, offs, qp, nxt, work, ibuf,
):
    """Work item ``it``; the key rows of item ``nxt`` (this thread's likely next item, −1 for
    none) are asked for meanwhile: by the 16-lane P·V loop all of them (their offsets in
    ``offs[2·split:]``), otherwise the first ones now.  ``kind == KIND_BF16_DOT``: ``q`` is
    unscaled (exact bfloat16 values) and ``qscale`` the scale; the item packs its rows' bits
    into ``qp`` (:func:`_q_bits_scratch`) for :func:`_scores_dot16`.  Otherwise the item's q
    rows are ``q``'s times ``qscale`` (1.0 for a pre-scaled ``q``), rounded as NumPy's product
    in q's dtype."""
    dot = kind == KIND_BF16_DOT
    B, Hq, Lq, D = q.shape
    G = Hq // Hkv
    R = G * Lq
    Dv = part_o.shape[2]
    b, hk, j0, j1, pos0 = _item_keys(it, B, Lq, kvlen, split, left, right, c0, nch, start)
    npf = 0
    if 0 <= nxt < start[B]:
        keys = 0  # the call's keys (PREFETCH_NEXT_MIN_BYTES counts the call's K/V)
        for i in range(B):
            keys += kvlen[i]
        if PREFETCH_NEXT_K and _uses_simd(q, D, Dv, kind, R) and (
            keys * Hkv * (D + Dv) * kflat.itemsize >= PREFETCH_NEXT_MIN_BYTES
        ):
            b2, hk2, j0b, j1b, _ = _item_keys(nxt, B, Lq, kvlen, split, left, right, c0, nch, start)
            npf = max(j1b - j0b, 0)
            _fill_offsets(kst, table, ps, b2, hk2, j0b, npf, offs[2 * split :])
            if NEXT_SCHEME:
                _fill_offsets(vst, table, ps, b2, hk2, j0b, npf, offs[3 * split :])
        else:
            _prefetch_item(nxt, q, kflat, kst, table, ps, kvlen, split, left, right, c0, nch, start)
    qsize = (R * D + 15) // 16 * 16
    qf = work[: R * D]  # this item's q rows (the thread's scratch; _chunk's part follows)
    for r in range(R):
        for d in range(D):
            qf[r * D + d] = q[b, hk * G + r // Lq, r % Lq, d]
    if dot:
        kind = KIND_BF16
        if not (D % 32 == 0 and Dv % 16 == 0 and qf.itemsize == 4):  # (cpu_decode checks this)
            dot = False  # the scaled q of the other paths, below
    if not dot and qscale != 1.0:
        # q unscaled (cpu_decode's C-contiguous float32 q, or a bfloat16 q off the dot path): the
        # rows scaled here, as np.multiply(q, scale, dtype=q.dtype) would — the scale rounded to
        # q's dtype, one rounding a product — the same bits without that call and its array
        if qf.itemsize == 4:
            sc = np.float32(qscale)
            for i in range(R * D):
                qf[i] *= sc
        else:
            for i in range(R * D):
                qf[i] *= qscale
    if dot:  # bfloat16 values in float32: the top half of the bits is the value
        bits = qf.view(np.uint32)
        for i in range(R * D):
            qp[i] = np.uint16(bits[i] >> np.uint32(16))
    _chunk(
        qf, R, b, hk, j0, j1, kflat, kst, vflat, vst, table, ps, kind, D, Dv, G, Lq, pos0,
        causal, left, right, softcap, slopes, has_alibi, part_o[it, :R], part_lse[it, :R], kc, vc, offs, npf,
        qp, qscale, dot, work[qsize:], ibuf,
    )


@njit(cache=_JIT_CACHE, inline="always")
def _work_size(R, D, Dv, split):
    """Elements of an item's float scratch (``_item``'s ``work``): its q rows, then _chunk's
    scores (``R`` rows of ``split`` rounded up to 16), row maxima, row sums, ``O``, and P·V's
    block buffers (a block's P: PV_GEMM_KEYS; a block's sums), each part starting at a multiple
    of 16 elements."""
    return ((R * D + 15) // 16 * 16 + R * ((split + 15) // 16 * 16) + 2 * ((R + 15) // 16 * 16)
            + 2 * ((R * Dv + 15) // 16 * 16) + (R * PV_GEMM_KEYS + 15) // 16 * 16 + R * FUSED_STATS)


@njit(cache=_JIT_CACHE, inline="always")
def _line_aligned(n, like):
    """``n`` elements of ``like``'s dtype starting on a 64-byte line (Numba aligns an allocation
    to 32 bytes only): the thread's item scratch, whose q rows, scores and ``O`` the 16-lane
    loops read and write a whole line at a time, so that no access straddles two lines.  (A B1
    4k item at the other offsets measured ≈ 1 ns per key slower once, within the noise another
    time; whole calls ≤ 1 %: docs/decoding-log.md, "Reference counting in the per-item functions".)"""
    per_line = 64 // like.itemsize
    raw = np.empty(n + per_line, dtype=like.dtype)
    skip = (-raw.ctypes.data % 64) // like.itemsize
    return raw[skip : skip + n]


@njit(cache=_JIT_CACHE, inline="always")
def _q_bits_scratch(q, kst, kind):
    """A thread's buffer for an item's q rows as bfloat16 bits (``R·D``; empty unless ``kind ==
    KIND_BF16_DOT``), allocated once per entry, not per item."""
    B, Hq, Lq, D = q.shape
    return np.empty((Hq // kst[3]) * Lq * D if kind == KIND_BF16_DOT else 0, dtype=np.uint16)


@njit(cache=_JIT_CACHE, inline="always")
def _merge_scratch(nch, part_o, out, lse):
    """A thread's scratch for :func:`_finish`: ``(rows_o (R, Dv), rows_l (R,), wbuf (float64,
    the most chunks of any sequence), wcast (1))`` — allocated once by :func:`run_serial` for
    all its merges.  Each merge allocated its own before, with the reference counting of a
    function that allocates (an atomic add on every array it passes or slices): 20 % of a
    one-token call's samples were those atomics; a B1 call with 8 K/V heads 22.0 → 20.6 µs."""
    R, Dv = part_o.shape[1], part_o.shape[2]
    most = 1
    for b in range(nch.shape[0]):
        most = max(most, nch[b])
    return (np.empty((R, Dv), dtype=out.dtype), np.empty(R, dtype=lse.dtype),
            np.empty(most, dtype=np.float64), np.empty(1, dtype=out.dtype))


@njit(cache=_JIT_CACHE, _nrt=False)
def _finish(pair, Hkv, nch, start, part_o, part_lse, out, lse, rows_o, rows_l, wbuf, wcast):
    """Merge the parts of pair = b·Hkv + hk into ``out``/``lse`` rows of its query heads
    (``rows_o``, ``rows_l``, ``wbuf``, ``wcast``: the thread's :func:`_merge_scratch`)."""
    B, Hq, Lq, Dv = out.shape
    G = Hq // Hkv
    R = G * Lq
    b = pair // Hkv
    hk = pair - b * Hkv
    first = start[b] + hk * nch[b]
    one = nch[b] == 1
    for r in range(R if one else 0):
        one &= part_lse[first, r] != np.inf  # (+inf: _merge's exp(inf − inf) NaN, its own bits)
    if one:
        # one chunk (every sequence of up to SPLIT_SIZE keys): what _merge computes for one part,
        # 0 + 1·o and lse + log 1, without its exp and log per row and the copy through rows_o —
        # the same bits (IEEE: x + 0 turns −0 into +0 as 0 + 1·x does; a NaN LSE makes the row
        # NaN, −inf zeros and −inf, as there)
        for r in range(R):
            h = hk * G + r // Lq
            i = r % Lq
            x = part_lse[first, r]
            if x != x:
                for d in range(Dv):
                    out[b, h, i, d] = np.nan
                lse[b, h, i] = np.nan
            elif x == -np.inf:
                for d in range(Dv):
                    out[b, h, i, d] = 0.0
                lse[b, h, i] = -np.inf
            else:
                for d in range(Dv):
                    out[b, h, i, d] = part_o[first, r, d] + 0.0
                lse[b, h, i] = x + 0.0
        return
    _merge(part_o, part_lse, first, nch[b], rows_o, rows_l, wbuf, wcast)
    for r in range(R):
        h = hk * G + r // Lq
        i = r % Lq
        for d in range(Dv):
            out[b, h, i, d] = rows_o[r, d]
        lse[b, h, i] = rows_l[r]


@njit(cache=_JIT_CACHE, _nrt=True)  # (its callers run without reference counting)
def _finish_alone(pair, Hkv, nch, start, part_o, part_lse, out, lse):
    """:func:`_finish` with its own scratch: the merges of :func:`run_items`, where a thread
    merges a few pairs of a long call (the scratch once per thread there: level at B8 4k and B1
    32k, and 0.64 → 0.66–0.70 ms in some B1 4k float16 runs on two threads, within the machine's
    swing in others — left as it was)."""
    rows_o, rows_l, wbuf, wcast = _merge_scratch(nch, part_o, out, lse)
    _finish(pair, Hkv, nch, start, part_o, part_lse, out, lse, rows_o, rows_l, wbuf, wcast)


@njit(cache=_JIT_CACHE, nogil=True)
def plan(kvlen, Lq, Hkv, split, left, right):
    """``(c0, nch, start)``: per sequence its first chunk, chunk count and first work item;
    ``start[B]`` is the number of items."""
    return _plan(kvlen, Lq, Hkv, split, False, left, right)


@njit(cache=_JIT_CACHE, nogil=True)
def run_items(
    counter, total, role, q, kflat, kst, vflat, vst, table, ps, kind, kvlen, split, causal, left, right, softcap,
    qscale, slopes, has_alibi, c0, nch, start, part_o, part_lse, out, lse, pairs_done,
):
    """Work items, one per ticket taken from the shared ``counter`` (an atomic add) until
    ``total`` tickets are out: threads calling this together split the items by how fast each
    one runs — a thread that starts late or shares its core does fewer.  ``role`` says which
    item a ticket means: ``ROLE_FRONT`` this thread's next item from the first one up,
    ``ROLE_BACK`` from the last one down (two threads then each read one run of consecutive
    items — whole stretches of a contiguous cache in address order — and meet where their
    tickets run out), ``ROLE_SHARED`` the ticket's number (any number of threads).  Each item
    writes its own part: the same bits whichever thread ran it.

    Merges as the items go: ``pairs_done`` (zeros, one per (sequence, K/V head)) counts each
    pair's finished items, and the thread that finishes a pair's last item merges its parts
    into ``out``/``lse`` (:func:`_finish`, the parts in chunk order: the same bits whoever
    merges); the thread holding ticket 0 writes the pairs that have no item (0 and −inf).  All
    merges ran on one thread after the items before — 22 µs of a 0.78 ms two-thread call at B1
    4k, 0.27 ms of 7.9 at B8 4k.  Returns the items run."""
    Hkv = kst[3]
    kc = np.empty(split * q.shape[3], dtype=part_o.dtype)
    vc = np.empty(split * part_o.shape[2], dtype=part_o.dtype)
    offs = np.empty(4 * split, dtype=np.int64)
    qp = _q_bits_scratch(q, kst, kind)
    work = _line_aligned(_work_size((q.shape[1] // Hkv) * q.shape[2], q.shape[3], part_o.shape[2], split), part_o)
    ibuf = np.empty(max(split, 1), dtype=np.int32)
    return _ticket_items(
        counter, total, role, q, kflat, kst, vflat, vst, table, ps, kind, kvlen, split, causal, left, right, softcap,
        qscale, slopes, has_alibi, c0, nch, start, part_o, part_lse, out, lse, pairs_done, Hkv, kc, vc, offs, qp, work, ibuf,
    )


@njit(cache=_JIT_CACHE, nogil=True, _nrt=False)
def _ticket_items(
    counter, total, role, q, kflat, kst, vflat, vst, table, ps, kind, kvlen, split, causal, left, right, softcap,
    qscale, slopes, has_alibi, c0, nch, start, part_o, part_lse, out, lse, pairs_done, Hkv, kc, vc, offs, qp, work, ibuf,
):
    """:func:`run_items`' loop over its tickets (its scratch allocated there), compiled without
    reference counting: in run_items' own body each item's call increfed and decrefed the ~15
    arrays it passes, an atomic add each (:func:`_serial_items_and_merges`)."""
    B = kvlen.shape[0]
    done = 0
    while True:
        ticket = _fetch_add(counter, 1)
        if ticket == 0:
            for pair in range(B * Hkv):
                if nch[pair // Hkv] == 0:
                    _finish_alone(pair, Hkv, nch, start, part_o, part_lse, out, lse)
        if ticket >= total:
            return done
        if role == ROLE_FRONT:
            it, nxt = done, done + 1
        elif role == ROLE_BACK:
            it, nxt = total - 1 - done, total - 2 - done
        else:
            it, nxt = ticket, -1
        _item(it, q, kflat, kst, vflat, vst, table, ps, kind, kvlen, split, causal, left, right, softcap,
              qscale, slopes, has_alibi, c0, nch, start, part_o, part_lse, Hkv, kc, vc, offs, qp, nxt, work, ibuf)
        done += 1
        # this item's pair: its sequence by binary search in ``start``, then its K/V head
        lo_b, hi_b = 0, B
        while hi_b - lo_b > 1:
            mid = (lo_b + hi_b) // 2
            if start[mid] <= it:
                lo_b = mid
            else:
                hi_b = mid
        pair = lo_b * Hkv + (it - start[lo_b]) // nch[lo_b]
        if _fetch_add_acq_rel(pairs_done, pair, 1) == nch[lo_b] - 1:
            _finish_alone(pair, Hkv, nch, start, part_o, part_lse, out, lse)


@njit(cache=_JIT_CACHE, parallel=True)
def run_items_team(counter, total, workers, common):
    """:func:`run_items` (``common``: its arguments after ``role``) on ``workers`` threads of
    Numba's own team instead of the Python pool: two take ``ROLE_FRONT`` and ``ROLE_BACK``,
    more ``ROLE_SHARED``.  For callers whose work around the call runs on that team (SmolLM's
    decode step: its products are Numba parallel kernels, whose OpenMP workers spin after each
    one): a pool thread would share a core with a spinning worker, the team's workers are
    awake already (in-model A/B at 4k: 36–40 → 25–29 ms of attention a step).  Each item
    writes its own part: the same bits as on the pool or alone."""
    for i in prange(workers):
        role = ROLE_SHARED if workers != 2 else (ROLE_FRONT if i == 0 else ROLE_BACK)
        run_items(counter, total, role, *common)


@njit(cache=_JIT_CACHE, nogil=True)
def run_items_caller(flags, gen, partners, max_cycles, counter, total, role, common):
    """The caller's side of a call on the spinning partners (``_launch.Partners``): store the
    call's number ``gen`` at ``flags[ENTERED]`` (the partners, spinning in
    :func:`~dotattn.kernels._cpu_sync.partner_wait`, start at once: no thread wake-up, and the
    GIL is free from here on), run items as :func:`run_items` (``common``: its arguments after
    ``role``), then :func:`~dotattn.kernels._cpu_sync.finish_partners` (a partner that has not
    claimed the call is cancelled: the items are all done).  Returns True when no partner is
    left running (else the caller waits in Python: a partner off its core)."""
    _store_release(flags, ENTERED, gen)
    run_items(counter, total, role, *common)
    return finish_partners(flags, gen, partners, max_cycles)[1] == 0


@njit(cache=_JIT_CACHE, nogil=True)
def run_items_partner(flags, i, gen, counter, total, role, common):
    """Partner ``i``'s side of call ``gen`` (claimed): items as :func:`run_items`, then ``gen``
    stored (release) in its DONE slot, after its parts.  Returns the items run."""
    done = run_items(counter, total, role, *common)
    partner_done(flags, i, gen)
    return done


# run_items' own entry loads before the three entries that run it (the caller's and partners'
# roles, Numba's team): one machine code for the items on every path, whatever the process ran
# first (kernels/_entry_order.py)
load_callee_first(run_items_caller, lambda a: (run_items, (*a[4:7], *a[7].types)))
load_callee_first(run_items_partner, lambda a: (run_items, (*a[3:6], *a[6].types)))
load_callee_first(run_items_team, lambda a: (run_items, (a[0], a[1], types.int64, *a[3].types)))


@njit(cache=_JIT_CACHE, nogil=True)
def run_serial(
    q, kflat, kst, vflat, vst, table, ps, kind, kvlen, split, causal, left, right, softcap, qscale, slopes, has_alibi, Dv,
):
    """:func:`plan`, every work item and every merge (as :func:`run_items`) in one call on
    this thread (a small call: one entry from Python instead of two, its parts allocated
    here) → ``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))``.  The same item and merge code as the
    three entries, in the same order: the same bits."""
    B, Hq, Lq, D = q.shape
    Hkv = kst[3]
    R = (Hq // Hkv) * Lq
    c0, nch, start = _plan(kvlen, Lq, Hkv, split, False, left, right)
    total = start[B]
    part_o = np.empty((total, R, Dv), dtype=q.dtype)
    part_lse = np.empty((total, R), dtype=np.float64)  # (float64 whatever q: _chunk's step 4)
    kc = np.empty(split * D, dtype=q.dtype)
    vc = np.empty(split * Dv, dtype=q.dtype)
    offs = np.empty(4 * split, dtype=np.int64)
    qp = _q_bits_scratch(q, kst, kind)
    work = _line_aligned(_work_size(R, D, Dv, split), q)
    ibuf = np.empty(max(split, 1), dtype=np.int32)
    out = np.empty((B, Hq, Lq, Dv), dtype=q.dtype)
    lse = np.empty((B, Hq, Lq), dtype=q.dtype)
    rows_o, rows_l, wbuf, wcast = _merge_scratch(nch, part_o, out, lse)
    _serial_items_and_merges(
        q, kflat, kst, vflat, vst, table, ps, kind, kvlen, split, causal, left, right, softcap, qscale, slopes, has_alibi,
        c0, nch, start, part_o, part_lse, Hkv, kc, vc, offs, qp, work, ibuf, out, lse, rows_o, rows_l, wbuf, wcast,
    )
    return out, lse


@njit(cache=_JIT_CACHE, _nrt=False)
def _serial_items_and_merges(
    q, kflat, kst, vflat, vst, table, ps, kind, kvlen, split, causal, left, right, softcap, qscale, slopes, has_alibi,
    c0, nch, start, part_o, part_lse, Hkv, kc, vc, offs, qp, work, ibuf, out, lse, rows_o, rows_l, wbuf, wcast,
):
    """:func:`run_serial`'s loops, every item then every merge, compiled without reference
    counting: called from run_serial's body, each item's call increfed and decrefed the ~15
    arrays it passes (an atomic add each, 13 % of a one-token call's samples)."""
    for it in range(start[kvlen.shape[0]]):
        _item(it, q, kflat, kst, vflat, vst, table, ps, kind, kvlen, split, causal, left, right, softcap,
              qscale, slopes, has_alibi, c0, nch, start, part_o, part_lse, Hkv, kc, vc, offs, qp, it + 1, work, ibuf)
    for pair in range(kvlen.shape[0] * Hkv):
        _finish(pair, Hkv, nch, start, part_o, part_lse, out, lse, rows_o, rows_l, wbuf, wcast)

