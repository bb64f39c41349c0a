"""A float32 block kernel of our own (AVX-512 FMAs, LLVM IR) against MKL's sgemm on the kernels' tiles.

Issue 13 §2's go/no-go (docs/performance-log.md, "float32 tile products: our own AVX-512 block
kernel against MKL's sgemm").  One thread, the float32 products of the ``cpu`` kernels with
their operand layouts (the views ``_cpu_kernels.py`` passes to ``_gemm``): MKL through
``_cpu_primitives._gemm_f32`` (beta 0 or 1 as there); ours through a plain Numba loop over
``MR × 16·NV`` blocks of :func:`block` (columns outer, so a ``B`` panel stays hot while ``A``
streams; ``k<KC>``: depth in chunks of KC; ``u<U>``: U depth steps a loop iteration).
``B = Qᵀ``/``dOᵀ`` is given to ours in 16·NV-column panels (``--pack panels``) or as one
transposed copy (``--pack rows``), made outside the timing — the kernels would pack it once
per query tile (forward) or per call (backward); every other operand is read where it lies.
Operands hot (the same tile every repeat) or, with ``--stream N``, the operands the kernels
stream (forward: K for S, V for P·V; backward: dO) cycled through N copies (past L2);
``--align 0`` leaves them where NumPy puts large arrays (16 bytes past a page), as the
float32 kernels' K/V tiles may lie.  Routes alternated in random order each round, in one
process, medians of ``--rounds``; GFLOP/s = 2·M·N·K / time.  The first row times MKL on a
1024² square sgemm and our 6 × 64 block with A and B strides 0 (registers and L1 only) —
the rate of the moment.  ``--check`` first tests the block kernel against NumPy float64 on
odd sizes (row and column tails), overwrite and accumulate.

    flock /tmp/bench.lock env PYTHONPATH=src .venv/bin/python benchmarks/f32_microkernel.py [--rounds 15] [--flops 2e9] [--kernels 6x4,6x4k128] [--stream 32] [--align 0] [--check]

The block kernel: it keeps an ``MR × 16·NV`` block of ``C`` in ``MR·NV`` zmm accumulators;
per depth step it loads ``NV`` 16-wide vectors of ``B``'s row ``k`` and broadcasts ``MR``
elements of ``A``'s column ``k``, ``MR·NV`` FMAs.  ``A`` is read through two byte strides
(rows, depth: a row-major tile or the transpose of one); ``B``'s rows are 16-float vectors at
``b + k·b_ks``.  Each element of ``C`` is summed in depth order from ``C`` (accumulate) or 0 —
not MKL's order.  Rows past ``rows`` alias the last valid row (the same values stored again:
overwrite and accumulate stay right); columns past ``ncols`` are masked.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from dotattn.kernels import _cpu_isa
from dotattn.kernels import _cpu_primitives as P


# =================================================================================
# the block kernel (kept here, not in the package: it lost the go/no-go, docs/performance.md)
# =================================================================================

LANES = 16
_F = ir.FloatType()
_I1 = ir.IntType(1)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_VF = ir.VectorType(_F, LANES)
_VB = ir.VectorType(_I1, LANES)


def _splat(builder, value, vty=_VF):
    undef = ir.Constant(vty, ir.Undefined)
    first = builder.insert_element(undef, value, ir.Constant(_I32, 0))
    return builder.shuffle_vector(first, undef, ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


def _lane_mask(builder, n):
    """``<16 x i1>``: lanes ``0 … n−1`` (``n`` an i64, any value)."""
    lanes = ir.Constant(ir.VectorType(_I64, LANES), list(range(LANES)))
    return builder.icmp_signed("<", lanes, _splat(builder, n, ir.VectorType(_I64, LANES)))


def _masked_load(builder, addr, mask):
    ptr = builder.inttoptr(addr, _VF.as_pointer())
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(_VF, [_VF.as_pointer(), _I32, _VB, _VF]), "llvm.masked.load.v16f32.p0"
    )
    return builder.call(fn, [ptr, ir.Constant(_I32, 4), mask, ir.Constant(_VF, [0.0] * LANES)])


def _masked_store(builder, value, addr, mask):
    ptr = builder.inttoptr(addr, _VF.as_pointer())
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [_VF, _VF.as_pointer(), _I32, _VB]), "llvm.masked.store.v16f32.p0"
    )
    builder.call(fn, [value, ptr, ir.Constant(_I32, 4), mask])


def _load_v(builder, addr, mask, masked):
    if masked:
        return _masked_load(builder, addr, mask)
    return builder.load(builder.inttoptr(addr, _VF.as_pointer()), align=4)


def _store_v(builder, value, addr, mask, masked):
    if masked:
        _masked_store(builder, value, addr, mask)
    else:
        builder.store(value, builder.inttoptr(addr, _VF.as_pointer()), align=4)


def _block_codegen(MR, NV, masked, U):
    def codegen(context, builder, signature, args):
        a, a_rs, a_ks, b, b_ks, c, c_rs, K, rows, ncols, acc = args
        fma = builder.module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(_VF, [_VF] * 3))
        one = ir.Constant(_I64, 1)
        last = builder.sub(rows, one)
        row_idx = []
        for i in range(MR):  # rows past the tail alias the last valid one
            ci = ir.Constant(_I64, i)
            row_idx.append(builder.select(builder.icmp_signed("<", ci, rows), ci, last))
        a_rows = [builder.add(a, builder.mul(r, a_rs)) for r in row_idx]
        c_rows = [builder.add(c, builder.mul(r, c_rs)) for r in row_idx]
        masks = [_lane_mask(builder, builder.sub(ncols, ir.Constant(_I64, LANES * v))) for v in range(NV)]
        zero = ir.Constant(_VF, [0.0] * LANES)
        do_acc = builder.icmp_signed("!=", acc, ir.Constant(_I64, 0))
        init = []
        for i in range(MR):
            for v in range(NV):
                addr = builder.add(c_rows[i], ir.Constant(_I64, 64 * v))
                init.append((i, v, addr))
        # C's starting values: loaded (accumulate) or 0
        entry = builder.basic_block
        load_bb = builder.append_basic_block("c_load")
        start_bb = builder.append_basic_block("k_start")
        builder.cbranch(do_acc, load_bb, start_bb)
        builder.position_at_end(load_bb)
        loaded = [_load_v(builder, addr, masks[v], masked) for i, v, addr in init]
        builder.branch(start_bb)
        builder.position_at_end(start_bb)
        starts = []
        for n in range(MR * NV):
            phi = builder.phi(_VF)
            phi.add_incoming(zero, entry)
            phi.add_incoming(loaded[n], load_bb)
            starts.append(phi)
        # the depth loop: U steps an iteration, then single steps
        def step(k, accs):
            b_k = builder.add(b, builder.mul(k, b_ks))
            bv = [_load_v(builder, builder.add(b_k, ir.Constant(_I64, 64 * v)), masks[v], masked) for v in range(NV)]
            a_off = builder.mul(k, a_ks)
            out = list(accs)
            for i in range(MR):
                ap = builder.inttoptr(builder.add(a_rows[i], a_off), _F.as_pointer())
                av = _splat(builder, builder.load(ap, align=4))
                for v in range(NV):
                    out[i * NV + v] = builder.call(fma, [av, bv[v], accs[i * NV + v]])
            return out

        def loop(k0, accs0, steps, limit, name):
            pre = builder.basic_block
            loop_bb = builder.append_basic_block(name)
            body_bb = builder.append_basic_block(name + "_body")
            done_bb = builder.append_basic_block(name + "_done")
            builder.branch(loop_bb)
            builder.position_at_end(loop_bb)
            k = builder.phi(_I64)
            k.add_incoming(k0, pre)
            accs = []
            for n in range(MR * NV):
                phi = builder.phi(_VF)
                phi.add_incoming(accs0[n], pre)
                accs.append(phi)
            builder.cbranch(builder.icmp_signed("<", builder.add(k, ir.Constant(_I64, steps - 1)), limit), body_bb, done_bb)
            builder.position_at_end(body_bb)
            cur = accs
            for u in range(steps):
                cur = step(builder.add(k, ir.Constant(_I64, u)), cur)
            body_end = builder.basic_block
            k.add_incoming(builder.add(k, ir.Constant(_I64, steps)), body_end)
            for n in range(MR * NV):
                accs[n].add_incoming(cur[n], body_end)
            builder.branch(loop_bb)
            builder.position_at_end(done_bb)
            return k, accs

        k, accs = loop(ir.Constant(_I64, 0), starts, U, K, "k_main")
        if U > 1:
            k, accs = loop(k, accs, 1, K, "k_tail")
        for n, (i, v, addr) in enumerate(init):
            _store_v(builder, accs[n], addr, masks[v], masked)
        return context.get_dummy_value()

    return codegen


_BLOCKS = {}


def block(MR, NV, masked=True, U=1):
    """The ``MR × 16·NV`` block kernel: ``(a, a_rs, a_ks, b, b_ks, c, c_rs, K, rows, ncols,
    acc)`` — addresses and byte strides as int64; ``C[i, j] = acc·C[i, j] + Σ_k A[i, k]·B[k,
    j]`` for ``i < rows``, ``j < ncols`` (``acc`` 0 or 1)."""
    key = (MR, NV, masked, U)
    if key not in _BLOCKS:
        sig = types.void(*([types.int64] * 11))
        codegen = _block_codegen(MR, NV, masked, U)

        def _impl(typingctx, a, a_rs, a_ks, b, b_ks, c, c_rs, K, rows, ncols, acc):
            return sig, codegen

        _impl.__name__ = f"f32_block_{MR}x{16 * NV}{'m' if masked else ''}u{U}"
        _BLOCKS[key] = intrinsic(_impl)
    return _BLOCKS[key]


def _driver(MR, NV, KC=1 << 30, U=1):
    blk = block(MR, NV, True, U)
    full = block(MR, NV, False, U)
    W = 16 * NV

    @njit
    def mm(a, a_rs, a_ks, M, K, b, b_ks, b_panel, N, c, c_rs, acc):
        for j0 in range(0, N, W):
            bp = b + (j0 // W) * b_panel
            for k0 in range(0, K, KC):
                kn = min(KC, K - k0)
                ac = acc if k0 == 0 else 1
                for i0 in range(0, M, MR):
                    if N - j0 >= W:
                        full(a + i0 * a_rs + k0 * a_ks, a_rs, a_ks, bp + k0 * b_ks, b_ks, c + i0 * c_rs + j0 * 4, c_rs, kn,
                             min(MR, M - i0), N - j0, ac)
                        continue
                    blk(a + i0 * a_rs + k0 * a_ks, a_rs, a_ks, bp + k0 * b_ks, b_ks, c + i0 * c_rs + j0 * 4, c_rs, kn,
                        min(MR, M - i0), N - j0, ac)

    @njit
    def loop(a, a_rs, a_ks, M, K, b, b_ks, b_panel, N, c, c_rs, acc, n, nc=1, a_step=0, b_step=0):
        for r in range(n):
            i = r % nc
            mm(a + i * a_step, a_rs, a_ks, M, K, b + i * b_step, b_ks, b_panel, N, c, c_rs, acc)

    return loop


@njit
def _mkl_loop(a, b, c, beta, n):
    threads = P._gemm_threads_begin(a)
    for _ in range(n):
        P._gemm_f32(a, b, c, beta)
    P._gemm_threads_end(a, threads)


@njit
def _mkl_stream(As, Bs, C, beta, ta, tb, n):
    """MKL on copy ``r % len(As)`` of the operands at repeat ``r`` (``ta``/``tb``: the copy's
    transpose is the operand)."""
    threads = P._gemm_threads_begin(C)
    for r in range(n):
        i, j = r % As.shape[0], r % Bs.shape[0]
        if ta and tb:
            P._gemm_f32(As[i].T, Bs[j].T, C, beta)
        elif ta:
            P._gemm_f32(As[i].T, Bs[j], C, beta)
        elif tb:
            P._gemm_f32(As[i], Bs[j].T, C, beta)
        else:
            P._gemm_f32(As[i], Bs[j], C, beta)
    P._gemm_threads_end(C, threads)


def _aligned(x):
    """``x`` copied to a 64-byte-aligned array (the kernels' tile buffers are; NumPy's large
    arrays start 16 bytes past a page)."""
    raw = np.empty(x.size + 16, np.float32)
    off = (-raw.ctypes.data % 64) // 4
    out = raw[off : off + x.size].reshape(x.shape)
    out[...] = x
    return out


def _panels(bt, W):
    """``bt (K, N)`` in ``W``-column panels, each ``(K, W)`` contiguous (zero past N)."""
    K, N = bt.shape
    n = -(-N // W)
    out = _aligned(np.zeros((n, K, W), np.float32))
    for p in range(n):
        w = min(W, N - p * W)
        out[p, :, :w] = bt[:, p * W : p * W + w]
    return out


def _ours_args(a, bmat, c, W, pack, packed_b):
    """Byte-level arguments for our driver: ``a`` any 2-D float32 view, ``bmat`` the
    ``(K, N)`` operand (read in place when its rows are contiguous, else packed)."""
    M, K = a.shape
    N = bmat.shape[1]
    a_rs, a_ks = a.strides
    if packed_b is not None:
        keep = packed_b
        if pack == "panels":
            b_ks, b_panel = W * 4, K * W * 4
        else:
            b_ks, b_panel = packed_b.strides[0], W * 4
    else:
        keep = bmat
        b_ks, b_panel = bmat.strides[0], W * 4
    return keep, (a.ctypes.data, a_rs, a_ks, M, K, keep.ctypes.data, b_ks, b_panel, N, c.ctypes.data, c.strides[0])


def _base(x):
    """``(base, transposed)``: the C-ordered array ``x`` is, or is the transpose of."""
    if x.flags.c_contiguous:
        return x, False
    assert x.T.flags.c_contiguous
    return x.T, True


def _streamed(args, a, bv, c, acc, needs_pack, kernels, n, work, streams):
    """The routes of one case with the operands named in ``streams`` (``"a"``, ``"b"``, or
    both: ``--stream-all``) cycled through ``args.stream`` copies each (the copies' total past
    L2: what a kernel's streamed tiles see); the others hot."""
    nc = args.stream
    rng = np.random.default_rng(1)
    (abase, ta), (bbase, tb) = _base(a), _base(bv)
    na, nb = (nc if "a" in streams else 1), (nc if "b" in streams else 1)
    As = _aligned(rng.standard_normal((na,) + abase.shape, dtype=np.float32))
    Bs = _aligned(rng.standard_normal((nb,) + bbase.shape, dtype=np.float32))
    if not args.align:
        As, Bs = As.copy(), Bs.copy()
    beta = 1.0 if acc else 0.0
    runs = {"mkl": (lambda: _mkl_stream(As, Bs, c, beta, ta, tb, n), work)}
    for kname, (loop, W) in kernels.items():
        a0 = As[0].T if ta else As[0]
        b0 = Bs[0].T if tb else Bs[0]
        step_b = Bs.strides[0]
        packed = None
        if needs_pack:
            stack = [_panels(_aligned(np.ascontiguousarray(Bs[i].T if tb else Bs[i])), W) for i in range(nb)]
            packed = _aligned(np.stack(stack))
            step_b = packed.strides[0]
            packed0 = packed[0]
        else:
            packed0 = None
        keep, targs = _ours_args(a0, b0, c, W, "panels", packed0)

        def run(loop=loop, targs=targs, keep=(keep, packed, As, Bs), step_b=step_b):
            loop(*targs, 1 if acc else 0, n, nc, As.strides[0] if na > 1 else 0, step_b if nb > 1 else 0)

        runs[kname] = (run, work)
    return runs


def _self_test(kernels):
    """Each driver against NumPy float64 on odd sizes (row and column tails, depth not a
    multiple of KC or U), overwrite and accumulate, A row-major and transposed."""
    rng = np.random.default_rng(2)
    for kname, (loop, W) in kernels.items():
        for M, N, K in ((1, 1, 1), (7, 17, 5), (13, 33, 129), (37, 70, 257), (6, 64, 64)):
            for acc in (0, 1):
                for at in (False, True):
                    a = rng.standard_normal((K, M) if at else (M, K), dtype=np.float32)
                    a = a.T if at else a
                    bm = rng.standard_normal((K, N), dtype=np.float32)
                    c = rng.standard_normal((M, N), dtype=np.float32)
                    ref = a.astype(np.float64) @ bm.astype(np.float64) + (c if acc else 0.0)
                    loop(a.ctypes.data, a.strides[0], a.strides[1], M, K, bm.ctypes.data, bm.strides[0], W * 4, N,
                         c.ctypes.data, c.strides[0], acc, 1)
                    naive = np.abs(a).astype(np.float64) @ np.abs(bm).astype(np.float64) + (np.abs(ref) if acc else 0.0)
                    err = np.abs(c - ref).max()
                    assert err <= 2 * K * 2.0**-24 * naive.max() + 1e-30, (kname, M, N, K, acc, at, err)
    print(f"self test: {list(kernels)} match NumPy float64 on odd sizes, overwrite and accumulate", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--flops", type=float, default=2e8, help="work per timed loop")
    parser.add_argument("--kernels", default="14x2,6x4")
    parser.add_argument("--pack", default="panels", choices=("panels", "rows"))
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--align", type=int, default=1, help="operands 64-byte aligned (0: as NumPy gives them)")
    parser.add_argument("--stream", type=int, default=0, help="cycle the operands the kernels stream through this many copies (0: hot)")
    parser.add_argument("--stream-all", action="store_true", help="with --stream: cycle both A and B")
    args = parser.parse_args()
    _cpu_isa.f32_gemm()
    P._bind_f32_gemm() if hasattr(P, "_bind_f32_gemm") else None
    kernels = {}
    for spec in args.kernels.split(","):
        spec_u = spec.split("u")
        u = int(spec_u[1]) if len(spec_u) > 1 else 1
        mr, nv, *kc = (int(x) for x in spec_u[0].replace("k", "x").split("x"))
        kernels[spec] = (_driver(mr, nv, kc[0] if kc else 1 << 30, u), 16 * nv)
    if args.check:
        _self_test(kernels)
    rng = np.random.default_rng(0)

    def f(*shape):
        x = rng.standard_normal(shape, dtype=np.float32)
        return _aligned(x) if args.align else x

    # (name, a, b (the view MKL gets), c, accumulate, b needs packing)
    cases = []
    for D, BQ, BK, label in ((64, 256, 512, "fwd D64"), (128, 256, 256, "fwd D128")):
        Qs, Kb, Vb, ST = f(BQ, D), f(BK, D), f(BK, D), f(BK, BQ)
        cases.append((f"{label} S=K·Qᵀ {BK}×{BQ}×{D}", Kb, Qs.T, f(BK, BQ), False, True, "a"))
        cases.append((f"{label} acc+=Pᵀ·V {BQ}×{D}×{BK}", ST.T, Vb, f(BQ, D), True, False, "b"))
    for D in (64, 128):
        BQ, BK = 256, 512
        Qs, dOs, Kb, Vb, ST = f(BQ, D), f(BQ, D), f(BK, D), f(BK, D), f(BK, BQ)
        cases.append((f"bwd D{D} dPᵀ=V·dOᵀ {BK}×{BQ}×{D}", Vb, dOs.T, f(BK, BQ), False, True, "b"))
        cases.append((f"bwd D{D} dV+=P·dO {BK}×{D}×{BQ}", ST, dOs, f(BK, D), True, False, "b"))
        cases.append((f"bwd D{D} dQ+=dSᵀ·K {BQ}×{D}×{BK}", ST.T, Kb, f(BQ, D), True, False, ""))
    what = "hot" if not args.stream else f"streamed over {args.stream} copies ({'A and B' if args.stream_all else 'the operands the kernels stream'})"
    print(f"kernels {list(kernels)}, B packed as {args.pack}, operands {what}, aligned {args.align}; {args.rounds} rounds, medians; GFLOP/s", flush=True)
    # references: a large square sgemm (MKL) and our 6 × 64 block on registers only (no
    # streaming: A and B strides 0), both in the same alternation as the tiles
    big = f(1024, 1024)
    cases.insert(0, ("ref square 1024 (mkl only)", big, big, f(1024, 1024), False, False, ""))
    for name, a, bv, c, acc, needs_pack, streams in cases:
        M, K = a.shape
        N = bv.shape[1]
        n = max(3, int(args.flops / (2 * M * N * K)))
        work = 2 * M * N * K * n
        runs = {"mkl": (lambda: _mkl_loop(a, bv, c, 1.0 if acc else 0.0, n), work)}
        for kname, (loop, W) in kernels.items():
            if name.startswith("ref"):
                if kname != list(kernels)[0]:
                    continue
                ra, rb, rc = (_aligned(np.ones(s, np.float32)) for s in ((6, 4096), (4096, 64), (6, 64)))
                reps = max(1, int(args.flops / (2 * 6 * 64 * 4096)))

                def run(loop=loop, keep=(ra, rb, rc), reps=reps):
                    loop(keep[0].ctypes.data, 4 * 4096, 0, 6, 4096, keep[1].ctypes.data, 0, 0, 64, keep[2].ctypes.data, 256, 1, reps)

                runs[f"ours {kname} regs only"] = (run, 2 * 6 * 64 * 4096 * reps)
                continue
            packed = None
            if needs_pack:
                bt = _aligned(np.ascontiguousarray(bv))
                packed = _panels(bt, W) if args.pack == "panels" else bt
            keep, targs = _ours_args(a, bv, c, W, args.pack, packed)

            def run(loop=loop, targs=targs, keep=keep):
                loop(*targs, 1 if acc else 0, n)

            runs[kname] = (run, work)
            if args.check:
                c0 = f(M, N)
                ref = a.astype(np.float64) @ bv.astype(np.float64) + (c0 if acc else 0.0)
                cc = c0.copy()
                _, t2 = _ours_args(a, bv, cc, W, args.pack, packed)
                loop(*t2, 1 if acc else 0, 1)
                err = np.abs(cc - ref).max() / np.abs(ref).max()
                assert err < 1e-5, (name, kname, err)
        if args.stream and not name.startswith("ref"):
            runs = _streamed(args, a, bv, c, acc, needs_pack, kernels, n, work, "ab" if args.stream_all else streams)
        times = {r: [] for r in runs}
        for rnd in range(args.rounds + 1):
            order = list(runs)
            random.shuffle(order)
            for r in order:
                t0 = time.perf_counter()
                runs[r][0]()
                if rnd:
                    times[r].append(time.perf_counter() - t0)
        gf = {r: runs[r][1] / statistics.median(t) / 1e9 for r, t in times.items()}
        best = max((g, r) for r, g in gf.items() if r != "mkl")
        cells = "  ".join(f"{r} {g:6.1f}" for r, g in gf.items())
        print(f"{name:<32} {cells}   best/mkl {best[0] / gf['mkl']:.2f}× ({best[1]})", flush=True)


if __name__ == "__main__":
    main()
