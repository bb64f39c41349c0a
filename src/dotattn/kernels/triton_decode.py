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
* :func:`decode` — the decode-kernel protocol of :mod:`dotattn.decoding` (a
  :class:`~dotattn.decoding.DecodeCall` of NumPy views): append, rotate q, run
  :func:`decode_tensors` on tensors sharing that memory.  CPU memory, so it needs the
  interpreter; :mod:`dotattn.decoding` does not route to it yet (see ``docs/decoding.md``).
"""

from __future__ import annotations

import numpy as np

from .triton_backend import _kernels, _next_pow2, triton_cdiv


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
    import torch

    from ..decoding import SPLIT_SIZE, rotated_q, write_new
    from ..torch._convert import from_numpy

    if reference:
        raise ValueError("the triton decode kernel has no reference mode; use implementation='reference'")
    if call.compute_dtype == np.float64:
        raise ValueError("the triton decode kernel takes float16, bfloat16 or float32 caches, not float64")
    write_new(call)
    q = rotated_q(call)

    def tensor(x):
        return from_numpy(x) if x.flags.writeable else from_numpy(x.copy())

    kv_len = np.ascontiguousarray(call.kv_lengths, dtype=np.int64)
    out, lse = decode_tensors(
        tensor(np.ascontiguousarray(q)), tensor(call.k_pages), tensor(call.v_pages),
        torch.from_numpy(np.ascontiguousarray(call.block_table, dtype=np.int64)), torch.from_numpy(kv_len),
        max_len=int(kv_len.max(initial=0)), causal=call.causal, window=call.window, scale=call.scale,
        softcap=call.softcap, split=SPLIT_SIZE,
        alibi_slopes=None if call.alibi_slopes is None else torch.from_numpy(np.ascontiguousarray(call.alibi_slopes)),
    )
    return out.numpy(), lse.numpy()
