"""Split-KV decoding in Triton ("flash decoding") for ``attention_with_kvcache``.

The kernel (:func:`dotattn.kernels.triton_kernels.decode_split`) gives each (chunk of
:data:`dotattn.decoding.SPLIT_SIZE` key positions, sequence, K/V head) one program: the
``G·Lq`` query rows of the head's GQA group are folded into the rows of one tile, keys are
read through the page table (a contiguous cache is one page per sequence), and the chunk's
partial output and LSE are merged over chunks by :func:`dotattn.merge_attention_states`.
Chunk boundaries are the fixed positions ``[c·S, (c+1)·S)`` of the NumPy/Numba decode
kernels, so a sequence is computed the same way in any batch.  Math in float32 (IEEE dots):
decoding reads the cache once and is memory-bound.

Two entry points:

* :func:`decode_tensors` — torch tensors (CUDA, or CPU under ``TRITON_INTERPRET=1``): the
  kernel itself, for a caller that has validated and appended already.
* :func:`attention_with_kvcache_tensors` — what :func:`dotattn.attention_with_kvcache` runs
  for CUDA tensors (and CPU tensors with ``implementation="triton"`` under the interpreter):
  :func:`dotattn.decoding.normalize` validates on stand-ins, the append is written in place
  with torch indexing, then :func:`decode_tensors`.
* :func:`decode` — the decode-kernel protocol of :mod:`dotattn.decoding` (a
  :class:`~dotattn.decoding.DecodeCall` of NumPy views of CPU memory, so it needs the
  interpreter): append, rotate q, run :func:`decode_tensors` on tensors sharing that memory.
"""

from __future__ import annotations

import numpy as np

from .triton_backend import _kernels, _next_pow2, triton_cdiv

__all__ = ["decode_tensors", "attention_with_kvcache_tensors", "decode"]


def decode_tensors(q, k_pages, v_pages, block_table, kv_lengths, *, max_len: int, causal: bool, window, scale: float,
                   softcap, alibi_slopes, split: int):
    """``(out (B, Hq, Lq, Dv), lse (B, Hq, Lq))`` float32 tensors.

    ``q (B, Hq, Lq, D)`` (already rotated), ``k_pages (P, Hkv, page_size, D)``, ``v_pages
    (P, Hkv, page_size, Dv)``, ``block_table`` int ``(B, max_pages)``, ``kv_lengths`` int
    ``(B,)`` (keys after the append; ``max_len`` = its maximum, known on the host),
    ``alibi_slopes`` float32 ``(B, Hq)`` or None.
    """
    import torch

    from ..merge import merge_attention_states

    kern = _kernels()
    B, Hq, Lq, D = q.shape
    Hkv, page_size, Dv = k_pages.shape[1], k_pages.shape[2], v_pages.shape[3]
    G = Hq // Hkv
    q = q.to(torch.float32)
    n_chunks = max(1, triton_cdiv(max_len, split))
    part_out = torch.empty((B, Hq, Lq, n_chunks, Dv), dtype=torch.float32, device=q.device)
    part_lse = torch.empty((B, Hq, Lq, n_chunks), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or B * Hq * Lq == 0:
        return part_out[..., 0, :].zero_(), part_lse[..., 0].fill_(float("-inf"))
    left, right = window if window is not None else (None, None)
    dummy = torch.empty((1,), dtype=torch.float32, device=q.device)
    slopes = dummy if alibi_slopes is None else alibi_slopes.to(torch.float32).contiguous()
    block_n = 16 if kern.INTERPRETED else 64
    kern.decode_split[(n_chunks, B * Hkv)](
        q, k_pages, v_pages, block_table, kv_lengths, slopes, part_out, part_lse,
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_table.stride(),
        *part_out.stride(), *part_lse.stride(),
        Hq, Hkv, G, Lq, D, Dv, page_size, split, float(scale), float(softcap or 0.0), int(left or 0), int(right or 0),
        BLOCK_R=max(16, _next_pow2(G * Lq)), BLOCK_N=block_n, BLOCK_D=max(16, _next_pow2(D)),
        BLOCK_DV=max(16, _next_pow2(Dv)), CAUSAL=bool(causal), HAS_WL=left is not None, HAS_WR=right is not None,
        HAS_ALIBI=alibi_slopes is not None, HAS_SOFTCAP=softcap is not None,
        num_warps=4,
    )
    if n_chunks == 1:
        return part_out[..., 0, :], part_lse[..., 0]
    return merge_attention_states(
        [part_out[..., c, :] for c in range(n_chunks)], [part_lse[..., c] for c in range(n_chunks)]
    )


def decode(call, reference: bool = False):
    """The :mod:`dotattn.decoding` kernel protocol: append, then ``(out, lse)`` float32 NumPy."""
    from ..decoding import SPLIT_SIZE, rotated_q, write_new
    from ..torch._convert import from_numpy

    if reference:
        raise ValueError("the triton decode kernel has no reference mode; use implementation='reference'")
    if call.compute_dtype == np.float64:
        raise ValueError("the triton decode kernel takes float16, bfloat16 or float32 caches, not float64")
    write_new(call)
    q = rotated_q(call)

    # Compiled kernels read GPU memory: there the host arrays are copied over (this entry is
    # for CPU callers and tests; CUDA users go through attention_with_kvcache_tensors).
    dev = "cpu" if _kernels().INTERPRETED else "cuda"

    def tensor(x):
        return (from_numpy(x) if x.flags.writeable else from_numpy(x.copy())).to(dev)

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
# attention_with_kvcache on torch tensors (CUDA, or CPU with implementation="triton")
# =================================================================================


def _host(name: str, x):
    """Small arguments (lengths, page table, slopes, rotary tables) as host NumPy arrays."""
    import torch

    from ..torch._convert import to_numpy

    if isinstance(x, torch.Tensor):
        return to_numpy(name, x.detach().cpu())
    return x


def _rope(x, positions, cos, sin):
    """RoPE "rotate half" on torch tensors: :func:`dotattn.decoding.apply_rotary`'s definition
    (``x (B, H, L, D)`` float32, ``positions (B, L)``, ``cos``/``sin`` ``(P, R)``)."""
    R = cos.shape[1]
    c = cos[positions][:, None]  # (B, 1, L, R)
    s = sin[positions][:, None]
    out = x.clone()
    x1, x2 = x[..., :R], x[..., R : 2 * R]
    out[..., :R] = x1 * c - x2 * s
    out[..., R : 2 * R] = x2 * c + x1 * s
    return out


def attention_with_kvcache_tensors(q, k_cache, v_cache, k_new, v_new, *, cache_lengths, block_table, causal, window,
                                   scale, softcap, alibi_slopes, rotary, return_lse, layout):
    """:func:`dotattn.decoding.attention_with_kvcache` for torch tensors on this kernel.

    Validation is :func:`dotattn.decoding.normalize` itself, run on zero-stride stand-ins of
    the large tensors (shape and dtype only) and host copies of the small ones; then the
    append (rotated keys) is written into the caller's cache in place with torch indexing, and
    the split-KV kernel reads the cache where it lives.
    """
    import torch

    from .. import decoding
    from ..errors import AttentionValueError
    from ..torch._convert import check_device, standin

    big = dict(q=q, k_cache=k_cache, v_cache=v_cache, k_new=k_new, v_new=v_new)
    for name, t in big.items():
        if t is not None:
            check_device(name, t)
            if t.device != q.device:
                raise AttentionValueError(
                    f"{name} is on device {str(t.device)!r} but q is on {str(q.device)!r}; "
                    "q, the caches and the new keys/values must share one device"
                )

    def stand(name, t):
        if t is None:
            return None
        # normalize() refuses read-only caches when it must write into them; the stand-in
        # is never written (the append below writes the tensors).
        return standin(name, t, writeable=name in ("k_cache", "v_cache"))

    if rotary is not None and isinstance(rotary, (tuple, list)):
        rotary = tuple(_host(f"rotary[{i}]", x) for i, x in enumerate(rotary))
    call = decoding.normalize(
        *(stand(n, t) for n, t in big.items()), cache_lengths=_host("cache_lengths", cache_lengths),
        block_table=_host("block_table", block_table), causal=causal, window=window, scale=scale, softcap=softcap,
        alibi_slopes=_host("alibi_slopes", alibi_slopes), rotary=rotary, layout=layout,
    )
    if call.cache_dtype == np.float64:
        raise AttentionValueError(
            "float64 caches run on the CPU decode kernels only (the triton decode kernel computes in float32)"
        )
    dev = q.device

    def canon(t):
        return t if t is None or layout == "bhld" else t.transpose(1, 2)

    qc, kp, vp, kn, vn = (canon(t) for t in (q, k_cache, v_cache, k_new, v_new))
    if call.Lnew:
        pos = call.cache_lengths[:, None] + np.arange(call.Lnew)[None, :]  # (B, Lnew) positions of the new tokens
        pages = torch.as_tensor(np.take_along_axis(call.block_table, pos // call.page_size, axis=1), device=dev)
        slots = torch.as_tensor(pos % call.page_size, device=dev)
        k_store = kn
        if call.rotary is not None:
            cos, sin = (torch.as_tensor(x, device=dev) for x in call.rotary)
            k_store = _rope(kn.to(torch.float32), torch.as_tensor(pos, device=dev), cos, sin)
        with torch.no_grad():
            # advanced indices around a slice: the indexed shape is (B, Lnew, Hkv, D), as in decoding.write_new
            kp[pages, :, slots] = k_store.transpose(1, 2).to(kp.dtype)
            vp[pages, :, slots] = vn.transpose(1, 2).to(vp.dtype)
    q32 = qc.to(torch.float32)
    if call.rotary is not None:
        cos, sin = (torch.as_tensor(x, device=dev) for x in call.rotary)
        q32 = _rope(q32, torch.as_tensor(decoding.query_positions(call), device=dev), cos, sin)
    kv_len = np.ascontiguousarray(call.kv_lengths, dtype=np.int64)
    out, lse = decode_tensors(
        q32, kp, vp, torch.as_tensor(call.block_table, device=dev), torch.as_tensor(kv_len, device=dev),
        max_len=int(kv_len.max(initial=0)), causal=call.causal, window=call.window, scale=call.scale,
        softcap=call.softcap, split=decoding.SPLIT_SIZE,
        alibi_slopes=None if call.alibi_slopes is None else torch.as_tensor(call.alibi_slopes, device=dev),
    )
    out = out.to(q.dtype)
    if layout == "blhd":
        out = out.transpose(1, 2)
    out = out.contiguous()
    return (out, lse.contiguous()) if return_lse else out
