"""Split-KV decoding in Triton ("flash decoding") for ``attention_with_kvcache``.

The kernel (:func:`dotattn.kernels.triton_kernels.decode_split`) gives each (chunk of
:data:`dotattn.decode_semantics.SPLIT_SIZE` key positions, sequence, K/V head) one program: the
``G·Lq`` query rows of the head's GQA group are folded into the rows of one tile, keys are
read through the page table (a contiguous cache is one page per sequence), and the chunks'
partial outputs and LSEs are merged by :func:`~dotattn.kernels.triton_kernels.decode_merge`,
the rule of :func:`dotattn.merge_attention_states` (``kernels/_merge.py``) in one kernel.
Chunk boundaries are the fixed positions ``[c·S, (c+1)·S)`` of the NumPy/Numba decode
kernels, so a sequence is computed the same way in any batch.  Math in float32: float32
caches through IEEE dots, 16-bit caches through tensor-core dots of float32 operands cut into
exact 16-bit terms; a chunk whose scores or output are not finite is computed again under
the NaN/±inf rule.

Entry points (each takes a call already validated by
:func:`dotattn.decode_semantics.normalize`; device checks and conversions of the caller's
tensors are :mod:`dotattn.decoding`'s):

* :func:`decode_tensors` — torch tensors (CUDA, or CPU under ``TRITON_INTERPRET=1``): the
  kernel itself, for a caller that has validated and appended already.
* :func:`attention_with_kvcache_tensors` — what :func:`dotattn.attention_with_kvcache` runs
  for CUDA tensors (and CPU tensors with ``implementation="triton"`` under the interpreter):
  the append written in place by ``decode_append`` (:func:`write_new_tensors`, which
  :class:`dotattn.KVCache` also uses for device buffers), then :func:`decode_tensors`.
* :func:`decode` — the decode-kernel protocol of :mod:`dotattn.decoding` (a
  :class:`~dotattn.decode_semantics.DecodeCall` of NumPy views of CPU memory, so it needs the
  interpreter): append, rotate q, run :func:`decode_tensors` on tensors sharing that memory.
"""

from __future__ import annotations

import threading

import numpy as np

from ..decode_semantics import SPLIT_SIZE, DecodeCall, apply_rotary, query_positions, rotated_q, rows_a_block, write_new
from ..errors import UnsupportedCallError
from ..semantics import BFLOAT16
from .triton_backend import _kernels, _next_pow2, head_dim_reason, triton_cdiv

__all__ = ["decode_tensors", "attention_with_kvcache_tensors", "write_new_tensors", "decode", "check_head_dims"]

# Chunks the merge kernel reads at once (a constant, so that a row's sum runs in the same order
# in any batch).
MERGE_CHUNKS = 16

# (keys a tile, warps, pipeline stages) of the decode kernel on a GPU, by the number of 16-bit
# terms of its dots (0: float32 caches).  Not the interpreter's: it runs 16-key tiles.  From a
# sweep on an H200 (docs/decoding-log.md, "On a GPU: the triton decode kernel"): 32 × 4 × 4 was
# the fastest or near it in every 16-bit case (128 registers: four programs a multiprocessor),
# 32 × 4 × 3 in float32.
GPU_TILES = {0: (32, 4, 3), 2: (32, 4, 4), 3: (32, 4, 4)}


# ---------------------------------------------------------------------------------
# launching a compiled kernel without Triton's per-call specialization
# ---------------------------------------------------------------------------------

# Triton's launcher works out, on every call, what the kernel is specialized on (each argument's
# type, alignment and divisibility: ~40 arguments here) and hashes it to find the compiled
# kernel — the largest part of the host's time on a small decode call (4 Dec, H200: three
# launches ≈ 0.37 ms of a 1.1 ms call under cProfile; with kept launches 0.29 ms of 0.82, 0.10
# of it the key, made cheaper since).  The first call of a specialization goes through Triton
# and keeps the compiled kernel it returns; later calls with the same key launch that kernel
# directly, as Triton's fused-softmax tutorial does.  FAST_LAUNCH = False always goes through
# Triton (benchmarks/gpu_decode.py --slow-launch compares the two).
FAST_LAUNCH = True
_compiled: dict = {}

# Whether the kernels read q in its own dtype and write the output in q's (True on a GPU):
# None decides by the mode, not under Triton's interpreter, whose float32 → bfloat16 casts
# truncate where torch (and a GPU's store) round to nearest even.  Tests set it to run the
# GPU's way under the interpreter, on float16 and float32.
IN_KERNEL_CASTS: bool | None = None


_NUMBERS = (int, float)
_SCALARS = (int, float, bool, type(None))
_MAX_KEPT = 4096  # kept launches before the dict starts over (a new shape or scale adds one)


def _specialization(args) -> tuple | None:
    """A key at least as fine as Triton's own specialization (with the current device, which
    :func:`launch` adds): the tensors (a prefix of the arguments in these kernels) by dtype and
    16-byte alignment, the numbers after them by type and value.  Finer than Triton's (which
    keys an integer on being 1, a multiple of 16 and its width, a float on nothing): a new
    stride or scale costs one launch through Triton, but the numbers make one tuple instead of
    a Python step each (4 Dec, a Zen 3 CPU: 5.5–8.8 µs for the split kernel's 40 arguments,
    11.6 with a step each).  None (no kept launch) when anything else comes, bools included."""
    n = 0
    for a in args:
        if type(a) in _SCALARS:
            break
        n += 1
    numbers = args[n:]
    for a in numbers:
        if type(a) not in _NUMBERS:
            return None
    # (the types too: 1 == 1.0, but Triton compiles an int 1 and a float apart)
    return tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in args[:n]]), numbers, tuple(map(type, numbers))


def _current_device() -> int:
    import torch

    return torch.cuda.current_device()


def launch(fn, grid, args: tuple, consts: dict, num_warps: int, num_stages: int | None) -> None:
    """``fn[grid](*args, **consts, num_warps=…, num_stages=…)``: the runtime arguments ``args``
    in the kernel's order, every constexpr in ``consts`` (``num_stages=None``: Triton's default)."""
    options = dict(num_warps=num_warps) if num_stages is None else dict(num_warps=num_warps, num_stages=num_stages)
    if not FAST_LAUNCH or _kernels().INTERPRETED:
        fn[grid](*args, **consts, **options)
        return
    spec = _specialization(args)
    # the current device, as Triton keys its own cache: a compiled kernel is loaded per device
    key = (fn, _current_device(), len(grid), num_warps, num_stages, tuple(consts.items()), spec)
    compiled = None if spec is None else _compiled.get(key)
    if compiled is None:
        compiled = fn[grid](*args, **consts, **options)  # Triton's own path: compiles or finds it, and launches
        if spec is not None and compiled is not None and hasattr(compiled, "__getitem__"):
            if len(_compiled) >= _MAX_KEPT:
                _compiled.clear()
            _compiled[key] = (compiled, tuple(consts[p.name] for p in fn.params if p.is_constexpr))
        return
    kernel, constexprs = compiled
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    kernel[grid3](*args, *constexprs)  # a compiled kernel takes every argument, constexprs too, in order


# ---------------------------------------------------------------------------------
# a decode call's launches, planned once per kind of call
# ---------------------------------------------------------------------------------


class _Launch:
    """One kernel launch of a :class:`_Plan`: the kernel, its constexprs and launch options,
    and the numbers (strides, sizes, options) that every call of the plan passes after its
    tensors.  The first launch goes through Triton, which compiles or finds the kernel and
    returns it; later ones run that compiled kernel directly — the plan's key holds all that
    Triton specializes on (the tensors' dtypes and 16-byte alignment, the numbers' values), so
    it is the kernel Triton would find.  ``FAST_LAUNCH = False``: through Triton every time."""

    __slots__ = ("fn", "numbers", "consts", "options", "compiled", "constexprs")

    def __init__(self, fn, numbers: tuple, consts: dict, num_warps: int, num_stages: int | None):
        self.fn, self.numbers, self.consts = fn, numbers, consts
        self.options = dict(num_warps=num_warps) if num_stages is None else dict(num_warps=num_warps,
                                                                                 num_stages=num_stages)
        self.compiled = self.constexprs = None

    def __call__(self, grid: tuple, *tensors) -> None:
        compiled = self.compiled
        if compiled is None or not FAST_LAUNCH:
            kept = self.fn[grid](*tensors, *self.numbers, **self.consts, **self.options)
            if FAST_LAUNCH and not _kernels().INTERPRETED and hasattr(kept, "__getitem__"):
                self.compiled = kept
                self.constexprs = tuple(self.consts[p.name] for p in self.fn.params if p.is_constexpr)
            return
        compiled[grid](*tensors, *self.numbers, *self.constexprs)  # (every argument, constexprs too, in order)


class _Plan:
    """What every decode call of one kind passes unchanged (:func:`_plan_key`): the split-KV
    launches (the plain pass, then the NaN/±inf pass over flagged chunks) and the merge, with
    their numbers, and the layout of the call's float32 scratch.

    The scratch holds, each part at a 16-byte boundary (so that every call's tensors have the
    alignment the plan's kernels were compiled for): the chunks' partial outputs ``(n_chunks,
    B, Hq, Lq, Dv)`` — chunk outermost, so that no stride depends on the number of chunks,
    which grows with the context — their LSEs ``(n_chunks, B, Hq, Lq)``, the kernel's flags
    ``(B·Hkv, n_chunks)`` int32, and the LSE of a call that does not return it.
    """

    __slots__ = ("split", "redo", "merge", "rows", "Dv", "flag_rows", "layouts")

    def __init__(self, q, k_pages, v_pages, block_table, out, lse_strides, *, causal, window, scale, softcap, alibi,
                 split, one_chunk):
        kern = _kernels()
        B, Hq, Lq, D = q.shape
        Hkv, page_size, Dv = k_pages.shape[1], k_pages.shape[2], v_pages.shape[3]
        G = Hq // Hkv
        self.rows, self.Dv, self.flag_rows = B * Hq * Lq, Dv, B * Hkv
        self.layouts: dict = {}  # the scratch's part sizes by (chunks, with an LSE)
        rows = self.rows
        left, right = window if window is not None else (None, None)
        block_d, block_dv = max(16, _next_pow2(D)), max(16, _next_pow2(Dv))
        if one_chunk:  # the split kernel writes the call's output and LSE itself
            targets = (*out.stride()[:3], 0, out.stride()[3], *lse_strides, 0)
        else:  # (n_chunks, B, Hq, Lq, Dv) and (n_chunks, B, Hq, Lq), contiguous
            targets = (Hq * Lq * Dv, Lq * Dv, Dv, rows * Dv, 1, Hq * Lq, Lq, 1, rows)
        numbers = (*q.stride(), *k_pages.stride(), *v_pages.stride(), *block_table.stride(), *targets,
                   Hq, Hkv, G, Lq, D, Dv, page_size, split, float(scale), float(softcap or 0.0), int(left or 0),
                   int(right or 0))
        consts = dict(BLOCK_R=max(16, _next_pow2(G * Lq)), BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=bool(causal),
                      HAS_WL=left is not None, HAS_WR=right is not None, HAS_ALIBI=alibi,
                      HAS_SOFTCAP=softcap is not None, EVEN_D=D == block_d and Dv == block_dv)
        # 16-bit caches: tensor-core dots of q's and p's 16-bit terms (kernels/triton_kernels.py);
        # float32 caches: IEEE dots on the CUDA cores
        terms = {"torch.float16": 2, "torch.bfloat16": 3}.get(str(k_pages.dtype), 0)
        block_n, warps, stages = (16, 4, 1) if kern.INTERPRETED else GPU_TILES[terms]
        # every chunk with plain dots, flagging those with a non-finite score or output; then the
        # flagged ones again under the NaN/±inf rule (the second launch's other programs return at
        # once).  One kernel doing both spilled registers inside the plain loop (4 Dec, sm_90 SASS).
        self.split = _Launch(kern.decode_split, numbers, dict(consts, BLOCK_N=block_n, TERMS=terms, REDO=False),
                             warps, stages)
        self.redo = _Launch(kern.decode_split, numbers,
                            dict(consts, BLOCK_N=16 if kern.INTERPRETED else 32, TERMS=0, REDO=True), 4,
                            1 if kern.INTERPRETED else 3)
        self.merge = None if one_chunk else _Launch(
            kern.decode_merge,
            (Hq * Lq * Dv, Lq * Dv, Dv, rows * Dv, 1, Hq * Lq, Lq, 1, rows, *out.stride(), *lse_strides, Hq, Lq, Dv,
             split),
            dict(BLOCK_C=MERGE_CHUNKS, BLOCK_DV=block_dv), 4, None)

    def scratch(self, n_chunks: int, device, with_lse: bool):
        """``(part_out, part_lse, flags, lse or None)``: views of one new float32 allocation
        (``part_lse`` float64: the split kernel's LSEs)."""
        import torch

        sizes = self.layouts.get((n_chunks, with_lse))
        if sizes is None:  # (each part's size rounded up to 16 bytes)
            parts = n_chunks * self.rows
            sizes = self.layouts[(n_chunks, with_lse)] = (
                _up16(parts * self.Dv), _up16(2 * parts), _up16(self.flag_rows * n_chunks),
                _up16(self.rows) if with_lse else 0)
        # (one split for the four views: ≈ 3 µs, where four slices took ≈ 6)
        part_out, part_lse, flags, lse = torch.empty(sum(sizes), dtype=torch.float32, device=device).split_with_sizes(
            sizes)
        return (part_out, part_lse.view(torch.float64), flags.view(torch.int32),
                lse[:self.rows] if with_lse else None)


def _up16(n: int) -> int:
    """``n`` float32 elements rounded up to a multiple of 16 bytes."""
    return -(-n // 4) * 4


_plans: dict = {}
_MAX_PLANS = 1024  # kept plans before the dict starts over (a program makes few kinds of call)

# The most folded query rows (``G·Lq``) one program holds: its accumulator is a (rows, Dv)
# float32 tile in registers, and the chunks' partial outputs (n_chunks, B, Hq, rows, Dv) float32
# grow with them — a chunked prefill through the decode path (Lq 512, 4 query heads a K/V
# head: 2,048 rows, a 1 MiB accumulator a program; 8.6 GB of partials at 32k keys, Hq 32,
# Dv 128) would not fit a GPU.  Calls of more rows run in blocks of query rows
# (:func:`~dotattn.decode_semantics.rows_a_block`; speculative decoding's Lq ≤ 8 with G ≤ 8
# runs whole).
TILE_ROWS = 64


def _plan_key(tensors: tuple, *options) -> tuple:
    """What a :class:`_Plan` is made from: shapes, strides, dtypes and 16-byte alignment of
    the tensors the caller gives (the scratch's parts are aligned by construction), the options,
    and the device (Triton loads a compiled kernel per device)."""
    return (tensors[0].device, *options, *[(t.dtype, t.shape, t.stride(), t.data_ptr() & 15 == 0) for t in tensors])


def decode_tensors(q, k_pages, v_pages, block_table, kv_lengths, *, max_len: int, causal: bool, window, scale: float,
                   softcap, alibi_slopes, split: int, out=None, lse=None):
    """The split-KV decode of a validated, appended call on torch tensors: ``(out, lse)``.

    ``q (B, Hq, Lq, D)`` (already rotated; any float dtype), ``k_pages (P, Hkv, page_size,
    D)``, ``v_pages (P, Hkv, page_size, Dv)``, ``block_table`` int ``(B, max_pages)``,
    ``kv_lengths`` int ``(B,)`` (keys after the append; ``max_len`` = its maximum, known on
    the host), ``alibi_slopes`` float32 ``(B, Hq)`` or None.  ``out (B, Hq, Lq, Dv)`` — any
    float dtype, any strides: the kernels write it, rounding from float32 — and ``lse (B, Hq,
    Lq)`` float32 are written if given, else made (float32; ``lse`` then from the scratch).
    """
    import torch

    B, Hq, Lq, _ = q.shape
    Dv = v_pages.shape[3]
    dev = q.device
    if out is None:
        out = torch.empty(B, Hq, Lq, Dv, dtype=torch.float32, device=dev)
    if B * Hq * Lq == 0:
        lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=dev) if lse is None else lse
        return out, lse
    block = rows_a_block(Hq // k_pages.shape[1], Lq, causal, window, alibi_slopes, TILE_ROWS)
    if block is not None:
        # blocks of query rows, each writing its rows of out and lse (views); a causal block
        # reads the keys up to its last row's position only
        if lse is None:
            lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=dev)
        for i0 in range(0, Lq, block):
            i1 = min(i0 + block, Lq)
            gap = Lq - i1 if causal else 0
            decode_tensors(q[:, :, i0:i1], k_pages, v_pages, block_table,
                           (kv_lengths - gap).clamp_min(0) if gap else kv_lengths, max_len=max(max_len - gap, 0),
                           causal=causal, window=window, scale=scale, softcap=softcap, alibi_slopes=alibi_slopes,
                           split=split, out=out[:, :, i0:i1], lse=lse[:, :, i0:i1])
        return out, lse
    n_chunks = max(1, triton_cdiv(max_len, split))
    one_chunk = n_chunks == 1
    # an LSE made here comes from the scratch: contiguous and aligned
    lse_strides = (Hq * Lq, Lq, 1) if lse is None else lse.stride()
    given = (q, k_pages, v_pages, block_table, kv_lengths, out)
    if lse is not None:
        given += (lse,)
    if alibi_slopes is not None:
        given += (alibi_slopes,)
    key = _plan_key(given, causal, window, scale, softcap, split, one_chunk, lse is None, alibi_slopes is None)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        plan = _plans[key] = _Plan(q, k_pages, v_pages, block_table, out, lse_strides, causal=causal, window=window,
                                   scale=scale, softcap=softcap, alibi=alibi_slopes is not None, split=split,
                                   one_chunk=one_chunk)
    part_out, part_lse, flags, own_lse = plan.scratch(n_chunks, dev, lse is None)
    lse = own_lse.view(B, Hq, Lq) if lse is None else lse
    slopes = part_lse if alibi_slopes is None else alibi_slopes  # (unread if None)
    grid = (n_chunks, B * k_pages.shape[1], 1)
    if one_chunk:
        plan.split(grid, q, k_pages, v_pages, block_table, kv_lengths, slopes, out, lse, flags)
        plan.redo(grid, q, k_pages, v_pages, block_table, kv_lengths, slopes, out, lse, flags)
        return out, lse
    plan.split(grid, q, k_pages, v_pages, block_table, kv_lengths, slopes, part_out, part_lse, flags)
    plan.redo(grid, q, k_pages, v_pages, block_table, kv_lengths, slopes, part_out, part_lse, flags)
    plan.merge((plan.rows, 1, 1), part_out, part_lse, kv_lengths, out, lse)
    return out, lse


def check_head_dims(call: DecodeCall) -> None:
    """The head dims the kernel takes, those of the prefill kernels (``triton_backend.MAX_HEAD_DIM``):
    each entry point checks before it writes anything (a larger tile would not compile, or not fit
    a GPU's registers and shared memory)."""
    reason = head_dim_reason(call.D, call.Dv)
    if reason:
        raise UnsupportedCallError(
            f"implementation='triton' cannot take this call: the triton decode kernel takes {reason} "
            "(D: the last axis of q, k_cache and k_new; Dv: the last axis of v_cache and v_new)"
        )


def decode(call, reference: bool = False):
    """The :mod:`dotattn.decoding` kernel protocol: append, then ``(out, lse)`` float32 NumPy."""
    import torch

    if reference:
        raise ValueError("the triton decode kernel has no reference mode; use implementation='reference'")
    if call.compute_dtype == np.float64:
        raise ValueError("the triton decode kernel takes float16, bfloat16 or float32 caches, not float64")
    check_head_dims(call)
    write_new(call)
    q = rotated_q(call)

    # Compiled kernels read GPU memory: there the host arrays are copied over (this entry is
    # for CPU callers and tests; CUDA users go through attention_with_kvcache_tensors).
    dev = "cpu" if _kernels().INTERPRETED else "cuda"

    def tensor(x):
        x = x if x.flags.writeable else x.copy()
        if x.dtype == BFLOAT16:  # torch.from_numpy knows no ml_dtypes bfloat16: same bits through int16
            return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16).to(dev)
        return torch.from_numpy(x).to(dev)

    kv_len = np.ascontiguousarray(call.kv_lengths, dtype=np.int64)
    out, lse = decode_tensors(
        tensor(np.ascontiguousarray(q)), tensor(call.k_pages), tensor(call.v_pages),
        tensor(np.ascontiguousarray(call.block_table, dtype=np.int64)), tensor(kv_len),
        max_len=int(kv_len.max(initial=0)), causal=call.causal, window=call.window, scale=call.scale,
        softcap=call.softcap, split=SPLIT_SIZE,
        alibi_slopes=None if call.alibi_slopes is None else tensor(np.ascontiguousarray(call.alibi_slopes)),
    )
    return out.cpu().numpy(), lse.cpu().numpy()


# =================================================================================
# a validated call on torch tensors (CUDA, or CPU with implementation="triton")
# =================================================================================


class _PinnedSlots:
    """Pinned host buffers used in turn for the small host-to-device copies of decode calls.

    A copy from pinned memory runs asynchronously, so a buffer may be refilled only once its
    last copy has left: each slot records an event after its copy and waits on it before its
    next use (a wait only when the GPU runs ``SLOTS`` calls behind).  Pinning a fresh buffer on
    every call (``Tensor.pin_memory``) cost ≈ 40 µs of host time a call (4 Dec, H200 host).
    """

    SLOTS, SLOT_BYTES = 8, 1 << 14

    def __init__(self, device):
        import torch

        self.buffers = [torch.empty(self.SLOT_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(self.SLOTS)]
        self.views = [b.numpy() for b in self.buffers]
        self.events = [None] * self.SLOTS
        self.device, self.turn = device, 0
        self.lock = threading.Lock()

    def send(self, packed: np.ndarray):
        """``packed`` (uint8) as a new uint8 tensor on the device, copied asynchronously."""
        import torch

        n = packed.size
        out = torch.empty(n, dtype=torch.uint8, device=self.device)
        with self.lock:
            i = self.turn
            self.turn = (i + 1) % self.SLOTS
            if self.events[i] is not None:
                self.events[i].synchronize()
            else:
                self.events[i] = torch.cuda.Event()
            self.views[i][:n] = packed
            out.copy_(self.buffers[i][:n], non_blocking=True)
            self.events[i].record()
        return out


_slots: dict = {}
_TORCH_DTYPES: dict = {}


def _torch_dtype(dtype: np.dtype):
    t = _TORCH_DTYPES.get(dtype)
    if t is None:
        import torch

        t = _TORCH_DTYPES[dtype] = torch.from_numpy(np.zeros(0, dtype)).dtype
    return t


def host_to_device(*arrays, device):
    """Host NumPy arrays as tensors on ``device``, in one copy that does not wait for the GPU.

    A copy from pageable memory synchronizes the stream first, so the host would wait for the
    kernels of earlier calls before it launches this call's (host work and GPU work in series,
    not overlapped).  The arrays are packed into one pinned buffer (one of :class:`_PinnedSlots`,
    or for more than its 16 KiB a buffer pinned for this copy, which torch's caching host
    allocator keeps until the copy is done) and sent asynchronously; the results are views of
    the copy in the arrays' own dtypes and shapes.  CPU (interpreter) and meta devices: plain
    tensors of the arrays.
    """
    import torch

    arrays = [np.ascontiguousarray(x) for x in arrays]
    if device.type != "cuda":
        # (a read-only array is copied: torch.as_tensor warned "The given NumPy array is not
        # writable" for the call's read-only host arrays; the kernels never write these)
        return tuple(torch.as_tensor(x if x.flags.writeable else x.copy(), device=device) for x in arrays)
    # each array at a multiple of 16 bytes: every dtype's view of the buffer is aligned, and
    # 16-byte aligned as Triton specializes pointers (the same compiled kernels on every call)
    starts, at = [], 0
    for x in arrays:
        starts.append(at)
        at += -(-x.nbytes // 16) * 16
    packed = np.empty(at, dtype=np.uint8)
    for x, at in zip(arrays, starts):
        packed[at:at + x.nbytes] = x.reshape(-1).view(np.uint8)
    if packed.size <= _PinnedSlots.SLOT_BYTES:
        key = (device.type, device.index if device.index is not None else torch.cuda.current_device())
        slots = _slots.get(key)
        if slots is None:
            slots = _slots[key] = _PinnedSlots(torch.device("cuda", key[1]))
        on_device = slots.send(packed)
    else:
        on_device = torch.from_numpy(packed).pin_memory().to(device, non_blocking=True)
    return tuple(on_device[at:at + x.nbytes].view(_torch_dtype(x.dtype)).view(x.shape)
                 for x, at in zip(arrays, starts))


def _append_pairs(call: DecodeCall, counts: np.ndarray | None) -> np.ndarray:
    """int64 ``(4, n)``: page, slot, sequence and new-token index of each new token to store
    (the first ``counts[b]`` of sequence b, or all ``Lnew``)."""
    B, Lnew = call.B, call.Lnew
    if counts is None:  # (a decode step: every new token, without a search for them)
        pairs = np.empty((4, B, Lnew), dtype=np.int64)
        pairs[2] = np.arange(B)[:, None]
        pairs[3] = np.arange(Lnew)[None, :]
        pos = call.cache_lengths[:, None] + pairs[3]
        pairs[0] = call.block_table[pairs[2], pos // call.page_size]
        pairs[1] = pos % call.page_size
        return pairs.reshape(4, B * Lnew)
    b, j = np.nonzero(np.arange(Lnew)[None, :] < counts[:, None])  # (sequence, new token) pairs to store
    pos = call.cache_lengths[b] + j
    return np.stack([call.block_table[b, pos // call.page_size], pos % call.page_size, b, j]).astype(np.int64)


def _store_new(k_pages, v_pages, k_new, v_new, pairs, n_pairs: int) -> None:
    """The append's copy: ``k_new``/``v_new`` (the caches' dtype) into the caches at ``pairs``
    (:func:`_append_pairs`, on the caches' device) — one launch of ``decode_append``."""
    if n_pairs == 0:
        return
    D, Dv = k_pages.shape[3], v_pages.shape[3]
    launch(_kernels().decode_append, (n_pairs, k_pages.shape[1]),
           (k_new, v_new, k_pages, v_pages, pairs, n_pairs, *k_new.stride(), *v_new.stride(), *k_pages.stride(),
            *v_pages.stride(), D, Dv),
           dict(BLOCK_D=max(16, _next_pow2(D)), BLOCK_DV=max(16, _next_pow2(Dv))), 4, None)


def write_new_tensors(call: DecodeCall, k_pages, v_pages, k_new, v_new, counts: np.ndarray | None = None) -> None:
    """:func:`dotattn.decode_semantics.write_new` into torch tensors on any device.

    ``call`` was validated on stand-ins of these tensors (canonical ``bhld`` views: pages
    ``(P, Hkv, page_size, D)``, new ``(B, Hkv, Lnew, D)``); ``counts`` (B,) stores only the
    first ``counts[b]`` new tokens of sequence b.  Keys are rotated (float32) first when
    ``call.rotary`` is set.  (:func:`attention_with_kvcache_tensors` does the same within its
    own host-to-device copy.)
    """
    if k_new is None or call.Lnew == 0:
        return
    pairs = _append_pairs(call, counts)
    if call.rotary is None:
        (pairs_t,) = host_to_device(pairs, device=k_pages.device)
        _write_new(call, k_pages, v_pages, k_new, v_new, pairs_t, pairs.shape[1], None)
    else:
        pairs_t, every, cos, sin = host_to_device(pairs, _new_positions(call), *_rotary_rows(call), device=k_pages.device)
        _write_new(call, k_pages, v_pages, k_new, v_new, pairs_t, pairs.shape[1], (every, cos, sin))


def _rotary_rows(call: DecodeCall) -> tuple[np.ndarray, np.ndarray]:
    """The call's rotary tables as the device is sent them: float32 (the compute dtype), rows
    ``[0, max kv_length)`` only — every position the call rotates at lies below (the caller's
    tables come as given: ``decode_semantics._check_rotary``)."""
    rows = int(call.kv_lengths.max(initial=0))
    return tuple(np.ascontiguousarray(t[:rows], dtype=call.compute_dtype) for t in call.rotary)


def _new_positions(call: DecodeCall) -> np.ndarray:
    """int64 (B, Lnew): the position of each new token."""
    return call.cache_lengths[:, None] + np.arange(call.Lnew)[None, :]


def _write_new(call: DecodeCall, k_pages, v_pages, k_new, v_new, pairs, n_pairs: int, rotary) -> None:
    """The append on the device: keys rotated (float32, at ``rotary = (positions, cos, sin)``)
    if asked, the new keys/values converted to the caches' dtype by torch (its rounding, on
    any device), then copied in (:func:`_store_new`)."""
    import torch

    k_store = k_new if rotary is None else apply_rotary(k_new.to(torch.float32), *rotary)
    if k_store.dtype != k_pages.dtype:
        k_store = k_store.to(k_pages.dtype)
    if v_new.dtype != v_pages.dtype:
        v_new = v_new.to(v_pages.dtype)
    with torch.no_grad():
        if k_pages.is_meta:  # (no kernel runs on meta tensors: torch's indexing keeps its shape checks)
            k_pages[pairs[0], :, pairs[1]] = k_store[pairs[2], :, pairs[3]]
            v_pages[pairs[0], :, pairs[1]] = v_new[pairs[2], :, pairs[3]]
            return
        _store_new(k_pages, v_pages, k_store, v_new, pairs, n_pairs)
        # written by a kernel autograd did not see: the caches' version counters move as an
        # in-place torch operation's would (views share their base's counter)
        torch.autograd.graph.increment_version((k_pages, v_pages))


def attention_with_kvcache_tensors(call: DecodeCall, q, k_cache, v_cache, k_new, v_new, *, return_lse: bool):
    """:func:`dotattn.attention_with_kvcache` for torch tensors on this kernel.

    ``call`` is :func:`dotattn.decode_semantics.normalize` run by :mod:`dotattn.decoding` on
    stand-ins of these tensors (shapes and dtypes only) and host copies of the small
    arguments; the append (rotated keys) is written into the caller's cache in place, and the
    split-KV kernel reads the cache where it lives.  Every host array of the call (lengths,
    page table, the append's indices, slopes, rotary tables) goes in one copy; on a GPU q is
    read in its own dtype and the output written in q's dtype and the caller's layout by the
    kernels (Triton's interpreter rounds to bfloat16 by truncation, so there torch converts).
    """
    import torch

    check_head_dims(call)  # (before the append)
    dev = q.device
    if dev.type == "cuda" and dev.index != torch.cuda.current_device():
        # Triton launches on the current device (its stream, its loaded kernels): make it q's
        with torch.cuda.device(dev):
            return _attention_with_kvcache_tensors(call, q, k_cache, v_cache, k_new, v_new, return_lse)
    return _attention_with_kvcache_tensors(call, q, k_cache, v_cache, k_new, v_new, return_lse)


def _attention_with_kvcache_tensors(call: DecodeCall, q, k_cache, v_cache, k_new, v_new, return_lse: bool):
    import torch

    layout = call.layout
    dev = q.device

    def canon(t):
        return t if t is None or layout == "bhld" else t.transpose(1, 2)

    qc, kp, vp, kn, vn = (canon(t) for t in (q, k_cache, v_cache, k_new, v_new))
    kv_len = call.kv_lengths
    small = [kv_len, call.block_table]
    append = kn is not None and call.Lnew > 0
    if append:
        pairs = _append_pairs(call, None)
        small.append(pairs)
    if call.alibi_slopes is not None:
        small.append(np.asarray(call.alibi_slopes, dtype=np.float32))
    if call.rotary is not None:
        small += [query_positions(call), *_rotary_rows(call)]
        if append:
            small.append(_new_positions(call))
    sent = iter(host_to_device(*small, device=dev))  # (in the order of `small`)
    kv_len_t, table_t = next(sent), next(sent)
    pairs_t = next(sent) if append else None
    slopes = next(sent) if call.alibi_slopes is not None else None
    q_rotary = (next(sent), next(sent), next(sent)) if call.rotary is not None else None  # (positions, cos, sin)
    if append:
        k_rotary = None if q_rotary is None else (next(sent), *q_rotary[1:])
        _write_new(call, kp, vp, kn, vn, pairs_t, pairs.shape[1], k_rotary)
    if dev.type == "meta":
        # Shapes only, as torch's own operations on meta tensors (no kernel runs: Triton has no
        # meta device; the launch failed with "0 active drivers" without a GPU): the output in
        # q's dtype and the caller's layout, the LSE float32 — what a GPU call returns.
        B, Hq, Lq, Dv = call.B, call.Hq, call.Lq, vp.shape[3]
        out = torch.empty((B, Hq, Lq, Dv) if layout == "bhld" else (B, Lq, Hq, Dv), dtype=q.dtype, device=dev)
        return (out, torch.empty(B, Hq, Lq, dtype=torch.float32, device=dev)) if return_lse else out
    native = IN_KERNEL_CASTS if IN_KERNEL_CASTS is not None else not _kernels().INTERPRETED
    q_in = qc if native else qc.to(torch.float32)
    if q_rotary is not None:
        q_in = apply_rotary(qc.to(torch.float32), *q_rotary)
    B, Hq, Lq, Dv = call.B, call.Hq, call.Lq, vp.shape[3]
    out_dtype = q.dtype if native else torch.float32
    # the output in the caller's layout, written there by the kernels (a bhld view of it)
    if layout == "bhld":
        out = torch.empty(B, Hq, Lq, Dv, dtype=out_dtype, device=dev)
        out_view = out
    else:
        out = torch.empty(B, Lq, Hq, Dv, dtype=out_dtype, device=dev)
        out_view = out.transpose(1, 2)
    lse = torch.empty(B, Hq, Lq, dtype=torch.float32, device=dev) if return_lse else None
    _, lse = decode_tensors(
        q_in, kp, vp, table_t, kv_len_t, max_len=max(kv_len.tolist(), default=0), causal=call.causal, window=call.window,
        scale=call.scale, softcap=call.softcap, split=SPLIT_SIZE, alibi_slopes=slopes, out=out_view, lse=lse,
    )
    if not native:
        out = out.to(q.dtype)
    return (out, lse) if return_lse else out
