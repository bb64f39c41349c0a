"""dotattn.torch.MultiHeadAttention and the Transformer layers against torch.nn.

``from_torch`` copies of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` /
``nn.TransformerDecoderLayer`` must give the same outputs, attention weights and parameter
gradients (float64, so any difference is a bug, not rounding).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch.nn.functional")  # a real PyTorch, not the tests/torch directory

import torch  # noqa: E402
from torch import nn  # noqa: E402

from dotattn.errors import AttentionTypeError, AttentionValueError  # noqa: E402
from dotattn.torch import MultiHeadAttention, TransformerDecoderLayer, TransformerEncoderLayer  # noqa: E402

F64 = torch.float64
E, H = 12, 3


def close(a, b, name, tol=1e-12):
    assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.abs().max().item() if b.numel() else 0.0)
    assert err <= tol * scale, f"{name}: max abs difference {err:.3g} > {tol * scale:.3g}"


def torch_param_grads(m: nn.MultiheadAttention) -> dict:
    """Parameter gradients of an nn.MultiheadAttention, unpacked and named as ours are."""
    if m._qkv_same_embed_dim:
        w = m.in_proj_weight.grad.chunk(3)
    else:
        w = (m.q_proj_weight.grad, m.k_proj_weight.grad, m.v_proj_weight.grad)
    grads = {"q_proj.weight": w[0], "k_proj.weight": w[1], "v_proj.weight": w[2]}
    grads["out_proj.weight"] = m.out_proj.weight.grad
    if m.in_proj_bias is not None:
        b = m.in_proj_bias.grad.chunk(3)
        grads |= {"q_proj.bias": b[0], "k_proj.bias": b[1], "v_proj.bias": b[2], "out_proj.bias": m.out_proj.bias.grad}
    return grads


def our_param_grads(m: MultiHeadAttention) -> dict:
    return {name: p.grad for name, p in m.named_parameters()}


MHA_CASES = {
    # id: (nn.MultiheadAttention kwargs, cross-attention?, key padding?, attn_mask kind, need_weights, average)
    "self-batch-first": (dict(batch_first=True), False, False, None, True, True),
    "self-seq-first": (dict(batch_first=False), False, False, None, True, False),
    "self-padding-boolmask": (dict(batch_first=True), False, True, "bool", True, True),
    "cross-kdim-vdim": (dict(batch_first=True, kdim=5, vdim=7), True, True, None, True, False),
    "cross-kdim-seq-first-float-mask": (dict(batch_first=False, kdim=5, vdim=7), True, False, "float", True, True),
    "cross-same-dim-3d-mask": (dict(batch_first=True), True, True, "bool3d", True, False),
    "no-bias-no-weights": (dict(batch_first=True, bias=False), True, True, "bool", False, True),
}


def _mha_inputs(kwargs, cross, seed=0, B=2, Lq=5, Lk=7):
    g = torch.Generator().manual_seed(seed)
    batch_first = kwargs["batch_first"]

    def seq(L, width):
        shape = (B, L, width) if batch_first else (L, B, width)
        return torch.randn(shape, generator=g, dtype=F64, requires_grad=True)

    query = seq(Lq, E)
    if not cross:
        return query, None, None, Lq
    return query, seq(Lk, kwargs.get("kdim") or E), seq(Lk, kwargs.get("vdim") or E), Lk


@pytest.mark.parametrize("case_id", list(MHA_CASES))
def test_from_torch_matches_nn_multihead_attention(case_id):
    kwargs, cross, padding, mask_kind, need_weights, average = MHA_CASES[case_id]
    torch.manual_seed(1)
    theirs = nn.MultiheadAttention(E, H, dtype=F64, **kwargs)
    if theirs.in_proj_bias is not None:  # torch zero-initialises biases; make them count
        with torch.no_grad():
            theirs.in_proj_bias.normal_()
            theirs.out_proj.bias.normal_()
    ours = MultiHeadAttention.from_torch(theirs)
    assert ours.batch_first == kwargs["batch_first"]
    query, key, value, Lk = _mha_inputs(kwargs, cross)
    B, Lq = 2, 5
    torch_kw, our_kw = {}, {}
    if padding:
        kpm = torch.zeros(B, Lk, dtype=torch.bool)
        kpm[1, -3:] = True  # True = padding, torch's polarity
        torch_kw["key_padding_mask"], our_kw["key_mask"] = kpm, ~kpm
    if mask_kind == "bool":
        am = torch.rand(Lq, Lk, generator=torch.Generator().manual_seed(3)) < 0.3
        am[:, 0] = False
        torch_kw["attn_mask"], our_kw["attn_mask"] = am, ~am
    elif mask_kind == "bool3d":
        am = torch.rand(B * H, Lq, Lk, generator=torch.Generator().manual_seed(3)) < 0.3
        am[..., 0] = False
        torch_kw["attn_mask"], our_kw["attn_mask"] = am, ~am
    elif mask_kind == "float":
        am = torch.randn(Lq, Lk, dtype=F64)
        torch_kw["attn_mask"] = our_kw["attn_mask"] = am
    y0, w0 = theirs(query, key if cross else query, value if cross else query, need_weights=need_weights,
                    average_attn_weights=average, **torch_kw)
    y1, w1 = ours(query, key, value, need_weights=need_weights, average_attn_weights=average, **our_kw)
    close(y1, y0, "out")
    if need_weights:
        close(w1, w0, "weights")
        assert w1.dtype == w0.dtype
    else:
        assert w1 is None
    dy = torch.randn_like(y0)
    inputs = [x for x in (query, key, value) if x is not None]
    g0 = torch.autograd.grad(y0, inputs, dy, retain_graph=True)
    g1 = torch.autograd.grad(y1, inputs, dy, retain_graph=True)
    for name, a, b in zip(("dquery", "dkey", "dvalue")[: len(inputs)], g1, g0, strict=True):
        close(a, b, name)
    y0.backward(dy)
    y1.backward(dy)
    ours_g, theirs_g = our_param_grads(ours), torch_param_grads(theirs)
    assert ours_g.keys() == theirs_g.keys()
    for name, g in ours_g.items():
        close(g, theirs_g[name], f"d {name}")


def test_to_torch_round_trip_and_unbatched_inputs():
    torch.manual_seed(2)
    ours = MultiHeadAttention(E, H, kdim=4, vdim=6, dtype=F64)
    theirs = ours.to_torch()
    assert isinstance(theirs, nn.MultiheadAttention) and theirs.batch_first
    x, kv_k, kv_v = torch.randn(5, E, dtype=F64), torch.randn(8, 4, dtype=F64), torch.randn(8, 6, dtype=F64)
    y0, w0 = theirs(x, kv_k, kv_v, average_attn_weights=False)
    y1, w1 = ours(x, kv_k, kv_v, need_weights=True, average_attn_weights=False)
    close(y1, y0, "out")
    close(w1, w0, "weights")
    back = MultiHeadAttention.from_torch(theirs)
    for (n0, p0), (n1, p1) in zip(ours.named_parameters(), back.named_parameters(), strict=True):
        assert n0 == n1 and torch.equal(p0, p1), n0


def test_grouped_query_attention_equals_repeated_kv_heads():
    """num_kv_heads=1 behaves as an ordinary MHA whose K/V projections repeat one head."""
    torch.manual_seed(3)
    gqa = MultiHeadAttention(E, H, num_kv_heads=1, dtype=F64)
    assert gqa.k_proj.weight.shape == (E // H, E)
    full = MultiHeadAttention(E, H, dtype=F64)
    with torch.no_grad():
        full.q_proj.load_state_dict(gqa.q_proj.state_dict())
        full.out_proj.load_state_dict(gqa.out_proj.state_dict())
        for src, dst in ((gqa.k_proj, full.k_proj), (gqa.v_proj, full.v_proj)):
            dst.weight.copy_(src.weight.repeat(H, 1))
            dst.bias.copy_(src.bias.repeat(H))
    x = torch.randn(2, 6, E, dtype=F64)
    y0, w0 = full(x, causal=True, need_weights=True)
    y1, w1 = gqa(x, causal=True, need_weights=True)
    close(y1, y0, "out")
    close(w1, w0, "weights")
    with pytest.raises(AttentionValueError, match="grouped-query"):
        gqa.to_torch()


def test_kv_lengths_equal_key_mask_and_zero_padded_self_attention_rows():
    torch.manual_seed(4)
    m = MultiHeadAttention(E, H, dtype=F64)
    x, mem = torch.randn(2, 5, E, dtype=F64), torch.randn(2, 7, E, dtype=F64)
    lengths = torch.tensor([7, 4])
    key_mask = torch.arange(7)[None, :] < lengths[:, None]
    close(m(x, mem, kv_lengths=lengths)[0], m(x, mem, key_mask=key_mask)[0], "cross-attention")
    # self-attention: padded query rows are padding too; their attention output is 0
    lengths = torch.tensor([5, 3])
    y, _ = m(x, kv_lengths=lengths)
    y_masked, _ = m(x, key_mask=torch.arange(5)[None, :] < lengths[:, None])
    close(y[1, :3], y_masked[1, :3], "real rows")
    close(y[1, 3:], m.out_proj.bias.expand(2, E), "padded rows = out_proj.bias")


def test_dropout_only_in_training_and_reproducible():
    torch.manual_seed(5)
    m = MultiHeadAttention(E, H, dropout=0.5)
    x = torch.randn(2, 6, E)
    m.eval()
    a, _ = m(x)
    b, _ = m(x)
    assert torch.equal(a, b)
    m.train()
    torch.manual_seed(0)
    c, _ = m(x)
    torch.manual_seed(0)
    d, _ = m(x)
    assert torch.equal(c, d) and not torch.allclose(a, c)
    c.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_encoder_layer_matches_torch(norm_first):
    torch.manual_seed(6)
    theirs = nn.TransformerEncoderLayer(E, H, 24, dropout=0.0, activation="gelu", batch_first=True,
                                        norm_first=norm_first, dtype=F64)
    ours = TransformerEncoderLayer.from_torch(theirs)
    x = torch.randn(2, 5, E, dtype=F64, requires_grad=True)
    kpm = torch.tensor([[False] * 5, [False, False, False, True, True]])
    y0 = theirs(x, src_key_padding_mask=kpm)
    y1 = ours(x, key_mask=~kpm)
    close(y1, y0, "out")
    g0, = torch.autograd.grad(y0.sum(), x)
    g1, = torch.autograd.grad(y1.sum(), x)
    close(g1, g0, "dx")


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_decoder_layer_matches_torch(norm_first):
    torch.manual_seed(7)
    theirs = nn.TransformerDecoderLayer(E, H, 24, dropout=0.0, batch_first=True, norm_first=norm_first, dtype=F64)
    ours = TransformerDecoderLayer.from_torch(theirs)
    tgt = torch.randn(2, 6, E, dtype=F64)
    memory = torch.randn(2, 4, E, dtype=F64, requires_grad=True)
    mem_pad = torch.tensor([[False] * 4, [False, False, True, True]])
    causal_mask = nn.Transformer.generate_square_subsequent_mask(6, dtype=F64)
    y0 = theirs(tgt, memory, tgt_mask=causal_mask, memory_key_padding_mask=mem_pad)
    y1, cross = ours(tgt, memory, memory_kv_lengths=torch.tensor([4, 2]), need_weights=True)
    close(y1, y0, "out")
    assert cross.shape == (2, 6, 4) and torch.all(cross[1, :, 2:] == 0)
    close(cross.sum(-1), torch.ones(2, 6, dtype=F64), "cross weights sum to 1")
    g0, = torch.autograd.grad(y0.sum(), memory)
    g1, = torch.autograd.grad(y1.sum(), memory)
    close(g1, g0, "dmemory")


def test_tiny_encoder_decoder_learns_to_copy():
    """The layers train: a 1+1-layer encoder–decoder learns to copy a short sequence.

    The layers pin the ``numpy`` backend, which also shows that ``implementation=`` reaches
    the attention calls (an unknown name fails: test_layer_and_module_errors)."""
    torch.manual_seed(8)
    vocab, d = 8, 16
    emb = nn.Embedding(vocab, d)
    pos = nn.Parameter(torch.randn(6, d) * 0.1)
    enc = TransformerEncoderLayer(d, 2, 32, dropout=0.0, norm_first=True, implementation="numpy")
    dec = TransformerDecoderLayer(d, 2, 32, dropout=0.0, norm_first=True, implementation="numpy")
    head = nn.Linear(d, vocab)
    params = [*emb.parameters(), pos, *enc.parameters(), *dec.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, lr=3e-2)
    for _ in range(60):
        src = torch.randint(1, vocab, (32, 5))
        tgt_in = torch.cat([torch.zeros(32, 1, dtype=torch.long), src[:, :-1]], dim=1)  # 0 = start token
        memory = enc(emb(src) + pos[:5])
        logits = head(dec(emb(tgt_in) + pos[:5], memory))
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), src.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3, f"copy task did not train: final loss {loss.item():.3f}"


def test_layer_and_module_errors():
    with pytest.raises(AttentionValueError, match="multiple of num_heads"):
        MultiHeadAttention(10, 3)
    with pytest.raises(AttentionValueError, match="multiple of num_kv_heads"):
        MultiHeadAttention(12, 4, num_kv_heads=3)
    with pytest.raises(AttentionValueError, match="dropout"):
        MultiHeadAttention(12, 4, dropout=1.0)
    with pytest.raises(AttentionTypeError, match="nn.MultiheadAttention"):
        MultiHeadAttention.from_torch(nn.Linear(3, 3))
    with pytest.raises(AttentionValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(E, H, add_bias_kv=True))
    with pytest.raises(AttentionValueError, match="add_zero_attn"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(E, H, add_zero_attn=True))
    with pytest.raises(AttentionValueError, match="activation"):
        TransformerEncoderLayer(E, H, activation="swish")
    with pytest.raises(AttentionValueError, match="implementation must be None or one of"):
        MultiHeadAttention(E, H, implementation="gpu")(torch.randn(2, 5, E))
    m = MultiHeadAttention(E, H)
    x = torch.randn(2, 5, E)
    with pytest.raises(AttentionTypeError, match="key_padding_mask"):
        m(x, key_mask=torch.zeros(2, 5))
    with pytest.raises(AttentionValueError, match=r"key_mask must have shape \(B, Lk\) = \(2, 5\)"):
        m(x, key_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(AttentionValueError, match=r"\(B·H, Lq, Lk\)"):
        m(x, attn_mask=torch.ones(4, 5, 5, dtype=torch.bool))
    with pytest.raises(AttentionTypeError, match="attn_mask must be bool"):
        m(x, attn_mask=torch.ones(5, 5, dtype=torch.int64))
    with pytest.raises(AttentionValueError, match="3-D"):
        m(torch.randn(1, 2, 5, E))
