"""torch.compile(fullgraph=True) traces through dotattn's custom operators and matches eager.

Most tests compile with the ``aot_eager`` backend (the same Dynamo + AOTAutograd tracing,
without Inductor's code generation, so they take seconds); one compiles with Inductor.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch.nn.functional")  # a real PyTorch, not the tests/torch directory

import torch  # noqa: E402
from torch import nn  # noqa: E402

import dotattn  # noqa: E402
import dotattn.torch  # noqa: E402
from dotattn.torch import MultiHeadAttention  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class ToyAttention(nn.Module):
    """A projection, dotattn.attention with several options, and the LSE in the loss."""

    def __init__(self, width=16, heads=2, head_dim=8):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(width, 3 * heads * head_dim, dtype=torch.float64)
        self.bias = nn.Parameter(torch.randn(1, heads, 1, 10, dtype=torch.float64))

    def forward(self, x, lengths):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(-3)  # (B, L, H, hd) each
        out, lse = dotattn.attention(
            q, k, v, layout="blhd", causal=True, window=(4, None), bias=self.bias, kv_lengths=lengths,
            q_lengths=lengths, softcap=20.0, return_lse=True,
        )
        return out.flatten(-2), lse


def _loss(out, lse):
    return out.square().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_module_matches_eager_forward_and_gradients(backend):
    torch.manual_seed(0)
    model = ToyAttention()
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    lengths = torch.tensor([10, 7])
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out_c, lse_c = compiled(x, lengths)
    _loss(out_c, lse_c).backward()
    grads_c = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out_e, lse_e = model(x, lengths)
    _loss(out_e, lse_e).backward()
    torch.testing.assert_close(out_c, out_e, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse_c, lse_e, rtol=1e-12, atol=1e-12)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads_c[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_compiled_multihead_attention_matches_eager():
    torch.manual_seed(1)
    mha = MultiHeadAttention(16, 4, num_kv_heads=2)
    x, mem = torch.randn(2, 6, 16), torch.randn(2, 9, 16)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1, 5:] = False

    def step(x, mem):
        y, w = mha(x, mem, key_mask=key_mask, need_weights=True)
        return y, w

    y_c, w_c = torch.compile(step, fullgraph=True, backend="aot_eager")(x, mem)
    y_e, w_e = step(x, mem)
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(w_c, w_e)
    assert torch.all(w_c[1, :, 5:] == 0)


def test_compiled_dropout_draws_a_new_seed_each_call():
    """The seed comes from torch's generator inside the graph, not a constant baked at trace time."""
    q = torch.randn(1, 2, 8, 4)

    def f(q):
        return dotattn.attention(q, q, q, dropout_p=0.5)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    a = compiled(q)
    b = compiled(q)
    torch.manual_seed(3)
    c = compiled(q)
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


def test_operators_pass_torch_library_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch agree."""
    q = torch.randn(2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 6, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 6, 7, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 4])
    args = (q, k, v, None, bias, None, None, lengths, None, None, None,
            "bottom_right", 2, None, None, None, 0.0, "bhld", None, True, 1 << 30)
    torch.library.opcheck(torch.ops.dotattn.attention_fwd.default, args)
    out, lse, _ = torch.ops.dotattn.attention_fwd(*args)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    bwd_args = (dout, dlse, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, bias.detach(),
                None, None, lengths, None, None, None, "bottom_right", 2, None, None, None, 0.0, "bhld", None, True)
    torch.library.opcheck(torch.ops.dotattn.attention_bwd.default, bwd_args)


def test_dynamic_shapes_need_no_recompile_per_length():
    """The fake implementations use shape arithmetic only, so symbolic lengths trace."""
    counts = []

    def count_backend(gm, example_inputs):
        counts.append(1)
        return gm

    def f(q, k, v):
        out, lse = dotattn.attention(q, k, v, causal=True, layout="blhd", return_lse=True)
        return out, lse

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=count_backend)
    for L in (5, 7, 11):
        q, k, v = (torch.randn(2, L, 2, 4) for _ in range(3))
        out_c, lse_c = compiled(q, k, v)
        out_e, lse_e = f(q, k, v)
        torch.testing.assert_close(out_c, out_e)
        torch.testing.assert_close(lse_c, lse_e)
    assert len(counts) == 1
