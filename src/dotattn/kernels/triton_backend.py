"""The ``triton`` backend: fused FlashAttention-2 kernels on torch tensors (CUDA).

Unlike the NumPy backends it consumes tensors, not the NumPy arrays of an
:class:`~dotattn.semantics.AttentionCall`.  The torch front end still builds the call
through :func:`dotattn.semantics.normalize` — for CUDA tensors from zero-stride NumPy
stand-ins that carry only shape and dtype (plus the small index arrays copied to the host) —
so every check and every resolved option (default scale, causal kind, window, lengths,
segment ids, ALiBi slopes, dropout seed) comes from the semantics module.  This module only
lays the caller's tensors out canonically (views, no copies: ``mask``/``bias`` broadcast
with stride 0) and launches :mod:`dotattn.kernels.triton_kernels`.

Where it runs:

* CUDA tensors, when ``triton`` is installed and a CUDA device is present; dispatch puts it
  ahead of every CPU backend for them.
* CPU tensors under ``TRITON_INTERPRET=1`` (set before the first triton call) with
  ``implementation="triton"``: Triton's interpreter runs the same kernels through NumPy —
  how the tests, and anyone without a GPU, reach them.  It is slow (one program at a time).

Nothing here imports torch or triton at module import: ``dotattn info`` asks
:meth:`TritonBackend.available` without importing either.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys

from ..semantics import AttentionCall, to_canonical
from .dropout import seed_key

NAME = "triton"
MAX_HEAD_DIM = 256
# Tile size under Triton's interpreter: its cost is per operation, not per element, so few
# large tiles are fastest; 16 (tl.dot's minimum) keeps test shapes of ~40 tokens multi-block.
INTERPRETER_BLOCK = 16


def interpret_requested() -> bool:
    """``TRITON_INTERPRET`` as Triton reads it (``1``/``true``/``on``/``yes``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _cuda_present() -> bool:
    """A CUDA device without importing torch when it is not imported yet (``dotattn info``)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    if sys.platform.startswith("linux"):
        # The NVIDIA driver lists its GPUs here; reading it initializes nothing (no CUDA
        # context, so a later fork stays safe).
        try:
            return bool(os.listdir("/proc/driver/nvidia/gpus"))
        except OSError:
            return False
    return importlib.util.find_spec("torch") is not None and __import__("torch").cuda.is_available()


def _kernels():
    from . import triton_kernels

    return triton_kernels


def head_dim_reason(D: int, Dv: int) -> str | None:
    """Why the triton kernels cannot take head dims ``D`` (q, k) and ``Dv`` (v) — None when they
    can: :data:`MAX_HEAD_DIM` for ``attention()``'s kernels and the decode kernel alike."""
    if max(D, Dv) > MAX_HEAD_DIM:
        return f"head dims up to {MAX_HEAD_DIM}, got D={D}, Dv={Dv}"
    return None


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _launch_config(kind: str, block_d: int, itemsize: int, interpreted: bool) -> dict:
    """Tile sizes and warps.  The interpreter gets INTERPRETER_BLOCK-sized tiles.  The GPU
    choices follow the Triton tutorial's ranges and are not tuned here (no GPU was available
    to measure them); float32 gets small tiles, since its IEEE dots run on CUDA cores and big
    tiles only add registers and compile time (a 64×64×128 float32 backward tile takes minutes
    to compile)."""
    if interpreted:
        return dict(BLOCK_M=INTERPRETER_BLOCK, BLOCK_N=INTERPRETER_BLOCK, num_warps=1, num_stages=1)
    if itemsize >= 4:
        return dict(BLOCK_M=64 if kind == "fwd" else 32, BLOCK_N=32, num_warps=4, num_stages=1)
    if kind == "fwd":
        if block_d <= 64:
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
        if block_d <= 128:
            return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2)
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=1)
    if block_d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=1)
    return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)


class _Launch:
    """Per-call kernel arguments shared by the forward, the backward and the weights."""

    def __init__(self, call: AttentionCall, q, k, v, mask, bias):
        import torch

        self.call = call
        self.torch = torch
        self.device = q.device
        self.q = to_canonical(q, call.layout)
        self.k = to_canonical(k, call.layout)
        self.v = to_canonical(v, call.layout) if v is not None else None
        full = call.batch_shape + (call.Hq, call.Lq, call.Lk)
        canon = (call.B, call.Hq, call.Lq, call.Lk)
        dummy = torch.empty((1,), dtype=torch.uint8, device=self.device)
        self.mask = self.bias = dummy
        self.mask_strides = self.bias_strides = (0, 0, 0, 0)
        if call.mask is not None:
            # bool → uint8 (same bytes); broadcast dims keep stride 0, so nothing is materialized.
            m = mask.expand(full).reshape(canon).view(torch.uint8)
            self.mask, self.mask_strides = m, m.stride()
        if call.bias is not None:
            bt = bias.detach().expand(full).reshape(canon)
            self.bias, self.bias_strides = bt, bt.stride()

        def small(x, dtype):
            return dummy if x is None else torch.as_tensor(x, dtype=dtype).to(self.device).contiguous()

        self.q_len = small(call.q_lengths, torch.int64)
        self.kv_len = small(call.kv_lengths, torch.int64)
        self.q_seg = small(call.q_segment_ids, torch.int64)
        self.kv_seg = small(call.kv_segment_ids, torch.int64)
        self.slopes = small(call.alibi_slopes, torch.float32)
        # Block geometry (a block of a larger problem; zeros/own sizes otherwise): see _geometry.
        self.geom = torch.tensor(
            [call.position_shift, call.top_left_offset, *call.dropout_geometry], dtype=torch.int64
        ).to(self.device)
        left, right = call.window if call.window is not None else (None, None)
        self.block_d = max(16, _next_pow2(call.D))
        self.block_dv = max(16, _next_pow2(call.Dv))
        if call.dropout_p > 0.0:
            key = int(seed_key(call.seed))
            self.seed_key = key - (1 << 64) if key >= 1 << 63 else key  # int64 bits of the uint64 key
            # keep ⇔ (z >> 11)·2⁻⁵³ ≥ p ⇔ (z >> 11) ≥ ceil(p·2⁵³): p·2⁵³ is exact in float64.
            self.threshold = math.ceil(call.dropout_p * 2.0**53)
            self.drop_scale = 1.0 / (1.0 - call.dropout_p)
        else:
            self.seed_key, self.threshold, self.drop_scale = 0, 0, 1.0
        self.scalars = dict(
            scale=float(call.scale),
            softcap=float(call.softcap or 0.0),
            win_left=int(left or 0),
            win_right=int(right or 0),
        )
        self.flags = dict(
            CAUSAL={None: 0, "bottom_right": 1, "top_left": 2}[call.causal],
            HAS_WL=left is not None,
            HAS_WR=right is not None,
            HAS_QLEN=call.q_lengths is not None,
            HAS_KVLEN=call.kv_lengths is not None,
            HAS_SEG=call.q_segment_ids is not None,
            HAS_MASK=call.mask is not None,
            HAS_BIAS=call.bias is not None,
            HAS_ALIBI=call.alibi_slopes is not None,
            HAS_SOFTCAP=call.softcap is not None,
        )
        self.kern = _kernels()
        self.itemsize = self.q.element_size()

    def config(self, kind: str) -> dict:
        return _launch_config(kind, max(self.block_d, self.block_dv), self.itemsize, self.kern.INTERPRETED)

    def option_args(self) -> tuple:
        return (*self.mask_strides, *self.bias_strides)


def _alloc_caller(call: AttentionCall, like, last_dim: int, dtype):
    """An uninitialized output in the caller's layout, and its canonical (B, H, L, X) view.

    Writing through the view fills the caller-shaped tensor directly: no transpose copy for
    ``layout="blhd"``.
    """
    import torch

    shape = list(like.shape)
    shape[-1] = last_dim
    t = torch.empty(shape, dtype=dtype, device=like.device)
    return t, to_canonical(t, call.layout)


def forward(call: AttentionCall, q, k, v, mask, bias):
    """``(out, lse)``: out shaped as the caller's q with v's head dim, lse canonical (B, Hq, Lq) float32."""
    import torch

    L = _Launch(call, q, k, v, mask, bias)
    out_t, out = _alloc_caller(call, q, call.Dv, q.dtype)
    lse = torch.empty((call.B, call.Hq, call.Lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        lse.fill_(float("-inf"))
        return out_t, lse
    cfg = L.config("fwd")
    grid = (triton_cdiv(call.Lq, cfg["BLOCK_M"]), call.B * call.Hq)
    L.kern.attn_fwd[grid](
        L.q, L.k, L.v, out, lse, L.mask, L.bias, L.slopes, L.q_len, L.kv_len, L.q_seg, L.kv_seg, L.geom,
        *L.q.stride(), *L.k.stride(), *L.v.stride(), *out.stride(), *L.option_args(),
        call.Hq, call.group, call.Lq, call.Lk, call.D, call.Dv, L.scalars["scale"], L.scalars["softcap"],
        L.scalars["win_left"], L.scalars["win_right"], L.seed_key, L.threshold, L.drop_scale,
        BLOCK_D=L.block_d, BLOCK_DV=L.block_dv, DROPOUT=call.dropout_p > 0.0, **L.flags, **cfg,
    )
    return out_t, lse


def backward(call: AttentionCall, q, k, v, out, lse, dout, dlse, mask, bias, want_dbias: bool):
    """``(dq, dk, dv, dbias | None)``: grads shaped as the caller's q, k, v; dbias (B, Hq, Lq, Lk) float32."""
    import torch

    L = _Launch(call, q, k, v, mask, bias)
    out_c = to_canonical(out, call.layout)
    dout_c = to_canonical(dout, call.layout)
    lse_c = lse.reshape(call.B, call.Hq, call.Lq).to(torch.float32).contiguous()
    dq_t, dq = _alloc_caller(call, q, call.D, q.dtype)
    dk_t, dk = _alloc_caller(call, k, call.D, k.dtype)
    dv_t, dv = _alloc_caller(call, v, call.Dv, v.dtype)
    dbias = torch.zeros((call.B, call.Hq, call.Lq, call.Lk), dtype=torch.float32, device=q.device) if want_dbias else None
    if dq.numel() == 0 or dk.numel() == 0:
        for g in (dq, dk, dv):
            g.zero_()
        return dq_t, dk_t, dv_t, dbias
    dlse_c = None
    if dlse is not None:
        dlse_c = dlse.reshape(call.B, call.Hq, call.Lq).to(torch.float32).contiguous()
    delta = torch.empty((call.B, call.Hq, call.Lq), dtype=torch.float32, device=q.device)
    cfg = L.config("bwd")
    bm = cfg["BLOCK_M"]
    L.kern.attn_bwd_delta[(triton_cdiv(call.Lq, bm), call.B * call.Hq)](
        out_c, dout_c, dlse_c if dlse_c is not None else delta, delta, L.q_len, *out_c.stride(), *dout_c.stride(),
        call.Hq, call.Lq, call.Dv,
        BLOCK_M=bm, BLOCK_DV=L.block_dv, HAS_QLEN=L.flags["HAS_QLEN"], HAS_DLSE=dlse_c is not None,
        num_warps=cfg["num_warps"],
    )
    common = (
        call.Lq, call.Lk, call.D, call.Dv, L.scalars["scale"], L.scalars["softcap"], L.scalars["win_left"],
        L.scalars["win_right"], L.seed_key, L.threshold, L.drop_scale,
    )
    consts = dict(BLOCK_D=L.block_d, BLOCK_DV=L.block_dv, DROPOUT=call.dropout_p > 0.0, **L.flags, **cfg)
    L.kern.attn_bwd_dkdv[(triton_cdiv(call.Lk, cfg["BLOCK_N"]), call.B * call.Hkv)](
        L.q, L.k, L.v, dout_c, lse_c, delta, dk, dv, dbias if dbias is not None else delta,
        L.mask, L.bias, L.slopes, L.q_len, L.kv_len, L.q_seg, L.kv_seg, L.geom,
        *L.q.stride(), *L.k.stride(), *L.v.stride(), *dout_c.stride(), *dk.stride(), *dv.stride(),
        *L.option_args(), call.Hq, call.Hkv, call.group, *common, WANT_DBIAS=want_dbias, **consts,
    )
    L.kern.attn_bwd_dq[(triton_cdiv(call.Lq, bm), call.B * call.Hq)](
        L.q, L.k, L.v, dout_c, lse_c, delta, dq, L.mask, L.bias, L.slopes, L.q_len, L.kv_len, L.q_seg, L.kv_seg, L.geom,
        *L.q.stride(), *L.k.stride(), *L.v.stride(), *dout_c.stride(), *dq.stride(),
        *L.option_args(), call.Hq, call.group, *common, **consts,
    )
    return dq_t, dk_t, dv_t, dbias


def weights(call: AttentionCall, q, k, mask, bias, lse):
    """Pre-dropout probabilities (B, Hq, Lq, Lk) float32 from the canonical LSE."""
    import torch

    L = _Launch(call, q, k, None, mask, bias)
    w = torch.zeros((call.B, call.Hq, call.Lq, call.Lk), dtype=torch.float32, device=q.device)
    if w.numel() == 0:
        return w
    cfg = L.config("fwd")
    flags = dict(L.flags)
    L.kern.attn_weights[(triton_cdiv(call.Lq, cfg["BLOCK_M"]), call.B * call.Hq)](
        L.q, L.k, lse.contiguous(), w, L.mask, L.bias, L.slopes, L.q_len, L.kv_len, L.q_seg, L.kv_seg, L.geom,
        *L.q.stride(), *L.k.stride(), *L.option_args(),
        call.Hq, call.group, call.Lq, call.Lk, call.D, L.scalars["scale"], L.scalars["softcap"],
        L.scalars["win_left"], L.scalars["win_right"],
        BLOCK_D=L.block_d, **flags, **cfg,
    )
    # As the numpy backend: the float32 LSE's rounding is removed by renormalizing each row
    # (rows with no visible key stay 0).
    total = w.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, w / torch.where(total > 0, total, 1.0), w)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class TritonBackend:
    """Fused Triton kernels on torch tensors: every option, O(N) memory, deterministic backward."""

    name = NAME
    takes_tensors = "torch"  # consumes torch tensors, not the call's NumPy arrays

    @property
    def description(self) -> str:
        if interpret_requested():
            return "fused FlashAttention-2 kernels in Triton, run by Triton's interpreter on CPU tensors (TRITON_INTERPRET=1)"
        return "fused FlashAttention-2 kernels in Triton on CUDA tensors (dotattn.torch)"

    def available(self) -> tuple[bool, str]:
        if importlib.util.find_spec("triton") is None:
            return False, "triton not installed (pip install 'dotattn[triton]')"
        if importlib.util.find_spec("torch") is None:
            return False, "torch not installed (the triton backend runs on torch tensors)"
        if interpret_requested() or _cuda_present():
            return True, self.description
        return False, (
            "no CUDA device (TRITON_INTERPRET=1 runs these kernels on CPU tensors through Triton's "
            "interpreter, with implementation='triton')"
        )

    def device_reasons(self, device: str, forced: bool) -> list[str]:
        """Why tensors on ``device`` cannot run here ([] = they can)."""
        mod = sys.modules.get(__package__ + ".triton_kernels")
        interpreted = mod.INTERPRETED if mod is not None else interpret_requested()
        if device == "cuda":
            if interpreted:
                return ["Triton's interpreter is on (TRITON_INTERPRET=1), and it takes CPU tensors, not CUDA ones"]
            return []
        if device == "cpu":
            if not interpreted:
                return ["CPU tensors run only through Triton's interpreter: set TRITON_INTERPRET=1 before the first call"]
            std = sys.modules.get("triton.language.standard")
            if mod is None and std is not None and type(std.zeros).__name__ != "InterpretedFunction":
                # Triton's own library was built in compiled mode: the interpreter would fail inside.
                return ["TRITON_INTERPRET=1 was set after triton was imported (torch.compile imports it): "
                        "set it before importing torch or triton"]
            if not forced:
                return ["CPU tensors go to the CPU backends unless implementation='triton' is asked for"]
            return []
        return [f"runs on CUDA tensors; these are on {device!r}"]

    def unsupported_reasons(self, call: AttentionCall) -> list[str]:
        reasons = []
        if call.extras:
            reasons.append(f"does not take {', '.join(sorted(call.extras))} (the 'cpu' backend does)")
        if call.dtype.name == "float64":
            reasons.append("takes float16, bfloat16 or float32, not float64 (the CPU backends take float64)")
        head_dims = head_dim_reason(call.D, call.Dv)
        if head_dims:
            reasons.append(head_dims)
        return reasons

    # Tensor entry points (the torch front end calls these; see the module docstring).  The
    # kernels read the tensors' memory: a lazily negated view (``z.conj().imag``, torch's
    # negative bit) holds the values' negatives there, so such tensors are resolved first, as
    # the CPU path's NumPy views (torch/_convert.to_numpy) and the decode path are — it read
    # them un-negated until 7 Dec 2026 (outputs 0.99 off).
    def forward_tensors(self, call, q, k, v, mask, bias):
        return forward(call, *_resolved(q, k, v, mask, bias))

    def backward_tensors(self, call, q, k, v, out, lse, dout, dlse, mask, bias, want_dbias):
        return backward(call, *_resolved(q, k, v, out, lse, dout, dlse, mask, bias), want_dbias)

    def weights_tensors(self, call, q, k, mask, bias, lse):
        return weights(call, *_resolved(q, k, mask, bias, lse))


def _resolved(*tensors):
    """The tensors with torch's lazy negation and conjugation bits resolved (None kept; a
    tensor without them is returned as it is, no copy)."""
    return [t if t is None or not (t.is_neg() or t.is_conj()) else t.resolve_neg().resolve_conj() for t in tensors]
