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
  the append written in place with torch indexing (:func:`write_new_tensors`, which
  :class:`dotattn.KVCache` also uses for device buffers), then :func:`decode_tensors`.
* :func:`decode` — the decode-kernel protocol of :mod:`dotattn.decoding` (a
  :class:`~dotattn.decode_semantics.DecodeCall` of NumPy views of CPU memory, so it needs the
  interpreter): append, rotate q, run :func:`decode_tensors` on tensors sharing that memory.
"""

from __future__ import annotations

import threading

import numpy as np

from ..decode_semantics import SPLIT_SIZE, DecodeCall, apply_rotary, query_positions, rotated_q, write_new
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


def decode_tensors(q, k_pages, v_pages, block_table, kv_lengths, *, max_len: int, causal: bool, window, scale: float,
                   softcap, alibi_slopes, split: int):
    """``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))`` float32 tensors.

    ``q (B, Hq, Lq, D)`` (already rotated), ``k_pages (P, Hkv, page_size, D)``, ``v_pages
    (P, Hkv, page_size, Dv)``, ``block_table`` int ``(B, max_pages)``, ``kv_lengths`` int
    ``(B,)`` (keys after the append; ``max_len`` = its maximum, known on the host),
    ``alibi_slopes`` float32 ``(B, Hq)`` or None.
    """
    import torch

    kern = _kernels()
    B, Hq, Lq, D = q.shape
    Hkv, page_size, Dv = k_pages.shape[1], k_pages.shape[2], v_pages.shape[3]
    G = Hq // Hkv
    q = q.to(torch.float32)
    n_chunks = max(1, triton_cdiv(max_len, split))
    # the chunks' partial outputs, their LSEs and the kernel's flags: one allocation (each
    # allocation is host time on every call)
    parts = B * Hq * Lq * n_chunks
    scratch = torch.empty(parts * (Dv + 1) + B * Hkv * n_chunks, dtype=torch.float32, device=q.device)
    part_out = scratch[:parts * Dv].view(B, Hq, Lq, n_chunks, Dv)
    part_lse = scratch[parts * Dv:parts * (Dv + 1)].view(B, Hq, Lq, n_chunks)
    flags = scratch[parts * (Dv + 1):].view(torch.int32)
    if q.numel() == 0 or B * Hq * Lq == 0:
        return part_out[..., 0, :].zero_(), part_lse[..., 0].fill_(float("-inf"))
    left, right = window if window is not None else (None, None)
    slopes = part_lse if alibi_slopes is None else alibi_slopes.to(torch.float32).contiguous()  # (unread if None)
    block_d, block_dv = max(16, _next_pow2(D)), max(16, _next_pow2(Dv))
    # 16-bit caches: tensor-core dots of q's and p's 16-bit terms (kernels/triton_kernels.py);
    # float32 caches: IEEE dots on the CUDA cores
    terms = {torch.float16: 2, torch.bfloat16: 3}.get(k_pages.dtype, 0)
    block_n, warps, stages = (16, 4, 1) if kern.INTERPRETED else GPU_TILES[terms]
    args = (q, k_pages, v_pages, block_table, kv_lengths, slopes, part_out, part_lse, flags,
            *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_table.stride(),
            *part_out.stride(), *part_lse.stride(),
            Hq, Hkv, G, Lq, D, Dv, page_size, split, float(scale), float(softcap or 0.0), int(left or 0), int(right or 0))
    consts = dict(BLOCK_R=max(16, _next_pow2(G * Lq)), BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=bool(causal),
                  HAS_WL=left is not None, HAS_WR=right is not None, HAS_ALIBI=alibi_slopes is not None,
                  HAS_SOFTCAP=softcap is not None, EVEN_D=D == block_d and Dv == block_dv)
    grid = (n_chunks, B * Hkv)
    # every chunk with plain dots, flagging those with a non-finite score or output; then the
    # flagged ones again under the NaN/±inf rule (the second launch's other programs return at
    # once).  One kernel doing both spilled registers inside the plain loop (4 Dec, sm_90 SASS).
    launch(kern.decode_split, grid, args, dict(consts, BLOCK_N=block_n, TERMS=terms, REDO=False), warps, stages)
    launch(kern.decode_split, grid, args, dict(consts, BLOCK_N=16 if kern.INTERPRETED else 32, TERMS=0, REDO=True), 4,
           1 if kern.INTERPRETED else 3)
    if n_chunks == 1:
        return part_out[..., 0, :], part_lse[..., 0]
    rows = B * Hq * Lq
    merged = torch.empty(rows * (Dv + 1), dtype=torch.float32, device=q.device)  # out and lse: one allocation
    out, lse = merged[:rows * Dv].view(B, Hq, Lq, Dv), merged[rows * Dv:].view(B, Hq, Lq)
    launch(kern.decode_merge, (rows,),
           (part_out, part_lse, kv_lengths, out, lse, *part_out.stride(), *part_lse.stride(), *out.stride(),
            *lse.stride(), Hq, Lq, Dv, split), dict(BLOCK_C=MERGE_CHUNKS, BLOCK_DV=block_dv), 4, None)
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
        return tuple(torch.as_tensor(x, device=device) for x in arrays)
    # each array at a multiple of 8 bytes, so that every dtype's view of the buffer is aligned
    starts, at = [], 0
    for x in arrays:
        starts.append(at)
        at += -(-x.nbytes // 8) * 8
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


def write_new_tensors(call: DecodeCall, k_pages, v_pages, k_new, v_new, counts: np.ndarray | None = None) -> None:
    """:func:`dotattn.decode_semantics.write_new` into torch tensors on any device.

    ``call`` was validated on stand-ins of these tensors (canonical ``bhld`` views: pages
    ``(P, Hkv, page_size, D)``, new ``(B, Hkv, Lnew, D)``); ``counts`` (B,) stores only the
    first ``counts[b]`` new tokens of sequence b.  Indices are built on the host and moved to
    the caches' device; keys are rotated (float32) first when ``call.rotary`` is set.
    """
    import torch

    if k_new is None or call.Lnew == 0:
        return
    dev = k_pages.device
    stored = np.full(call.B, call.Lnew) if counts is None else counts
    b, j = np.nonzero(np.arange(call.Lnew)[None, :] < stored[:, None])  # (sequence, new token) pairs to store
    pos = call.cache_lengths[b] + j
    index = (call.block_table[b, pos // call.page_size], pos % call.page_size, b, j)
    k_store = k_new
    if call.rotary is None:
        pages, slots, bt, jt = host_to_device(*index, device=dev)
    else:
        every = call.cache_lengths[:, None] + np.arange(call.Lnew)[None, :]  # (B, Lnew)
        pages, slots, bt, jt, every, cos, sin = host_to_device(*index, every, *call.rotary, device=dev)
        k_store = apply_rotary(k_new.to(torch.float32), every, cos, sin)
    with torch.no_grad():
        # advanced indices around a slice: both sides index as (pairs, Hkv, D)
        k_pages[pages, :, slots] = k_store[bt, :, jt].to(k_pages.dtype)
        v_pages[pages, :, slots] = v_new[bt, :, jt].to(v_pages.dtype)


def attention_with_kvcache_tensors(call: DecodeCall, q, k_cache, v_cache, k_new, v_new, *, return_lse: bool):
    """:func:`dotattn.attention_with_kvcache` for torch tensors on this kernel.

    ``call`` is :func:`dotattn.decode_semantics.normalize` run by :mod:`dotattn.decoding` on
    stand-ins of these tensors (shapes and dtypes only) and host copies of the small
    arguments; the append (rotated keys) is written into the caller's cache in place with
    torch indexing, and the split-KV kernel reads the cache where it lives.
    """
    import torch

    check_head_dims(call)  # (before the append)
    layout = call.layout
    dev = q.device

    def canon(t):
        return t if t is None or layout == "bhld" else t.transpose(1, 2)

    qc, kp, vp, kn, vn = (canon(t) for t in (q, k_cache, v_cache, k_new, v_new))
    write_new_tensors(call, kp, vp, kn, vn)
    q32 = qc.to(torch.float32)
    kv_len = np.ascontiguousarray(call.kv_lengths, dtype=np.int64)
    small = [kv_len, np.asarray(call.block_table, dtype=np.int64)]
    if call.alibi_slopes is not None:
        small.append(np.asarray(call.alibi_slopes, dtype=np.float32))
    if call.rotary is not None:
        small += [query_positions(call), *call.rotary]
    kv_len_t, table_t, *rest = host_to_device(*small, device=dev)
    slopes = rest.pop(0) if call.alibi_slopes is not None else None
    if call.rotary is not None:
        q32 = apply_rotary(q32, *rest)
    out, lse = decode_tensors(
        q32, kp, vp, table_t, kv_len_t, max_len=int(kv_len.max(initial=0)), causal=call.causal, window=call.window,
        scale=call.scale, softcap=call.softcap, split=SPLIT_SIZE, alibi_slopes=slopes,
    )
    out = out.to(q.dtype)
    if layout == "blhd":
        out = out.transpose(1, 2)
    out = out.contiguous()
    return (out, lse.contiguous()) if return_lse else out
