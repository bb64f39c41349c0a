"""merge_attention_states: parts over disjoint key sets merge to the whole, exactly."""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest

import dotattn
from dotattn import merge_attention_states

HAS_TORCH = importlib.util.find_spec("torch") is not None


def _parts(rng, splits, *, B=2, H=3, Lq=5, D=8, dtype=np.float64):
    """Full attention and its parts over ``splits`` (key ranges), reference backend."""
    Lk = splits[-1][1]
    q = rng.standard_normal((B, H, Lq, D)).astype(dtype)
    k = rng.standard_normal((B, H, Lk, D)).astype(dtype)
    v = rng.standard_normal((B, H, Lk, D)).astype(dtype)
    full = dotattn.attention(q, k, v, return_lse=True, implementation="reference")
    parts = [
        dotattn.attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True, implementation="reference")
        for a, b in splits
    ]
    return full, [p[0] for p in parts], [p[1] for p in parts]


@pytest.mark.parametrize("splits", [[(0, 7)], [(0, 3), (3, 7)], [(0, 1), (1, 2), (2, 9), (9, 10)]])
def test_parts_merge_to_the_whole(splits):
    (out, lse), outs, lses = _parts(np.random.default_rng(0), splits)
    m_out, m_lse = merge_attention_states(outs, lses)
    np.testing.assert_allclose(m_out, out, rtol=0, atol=1e-13)
    np.testing.assert_allclose(m_lse, lse, rtol=0, atol=1e-13)
    assert m_out.dtype == np.float64 and m_lse.dtype == np.float64


def test_blhd_layout():
    (out, lse), outs, lses = _parts(np.random.default_rng(1), [(0, 4), (4, 9)])
    m_out, m_lse = merge_attention_states([o.swapaxes(1, 2) for o in outs], lses, layout="blhd")
    np.testing.assert_allclose(m_out, out.swapaxes(1, 2), atol=1e-13)
    np.testing.assert_allclose(m_lse, lse, atol=1e-13)


def test_float32_parts_accumulate_in_float32_and_keep_dtype():
    (out, lse), outs, lses = _parts(np.random.default_rng(2), [(0, 4), (4, 9)])
    m_out, m_lse = merge_attention_states([o.astype(np.float16) for o in outs], [s.astype(np.float32) for s in lses])
    assert m_out.dtype == np.float16 and m_lse.dtype == np.float32
    np.testing.assert_allclose(m_out, out, atol=2e-3)


def test_empty_parts_contribute_nothing_even_with_nan_outputs():
    (out, lse), outs, lses = _parts(np.random.default_rng(3), [(0, 4), (4, 9)])
    empty_out = np.full_like(outs[0], np.nan)
    empty_lse = np.full_like(lses[0], -np.inf)
    m_out, m_lse = merge_attention_states([outs[0], empty_out, outs[1]], [lses[0], empty_lse, lses[1]])
    np.testing.assert_allclose(m_out, out, atol=1e-13)
    np.testing.assert_allclose(m_lse, lse, atol=1e-13)


def test_all_empty_gives_zero_and_minus_inf():
    outs = [np.full((1, 2, 3, 4), np.nan), np.ones((1, 2, 3, 4))]
    lses = [np.full((1, 2, 3), -np.inf)] * 2
    m_out, m_lse = merge_attention_states(outs, lses)
    assert (m_out == 0).all() and np.isneginf(m_lse).all()


def test_nan_lse_poisons_only_its_row():
    outs = [np.ones((1, 1, 2, 3)), np.ones((1, 1, 2, 3))]
    lses = [np.array([[[0.0, np.nan]]]), np.array([[[0.0, 0.0]]])]
    m_out, m_lse = merge_attention_states(outs, lses)
    np.testing.assert_allclose(m_out[0, 0, 0], 1.0)
    assert np.isnan(m_out[0, 0, 1]).all() and np.isnan(m_lse[0, 0, 1])


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_plus_inf_lse_poisons_only_its_row_without_a_warning(library, recwarn):
    outs = [np.ones((1, 1, 3, 2), np.float32), np.full((1, 1, 3, 2), 2.0, np.float32)]
    lses = [np.array([[[np.inf, np.inf, 0.0]]], np.float32), np.array([[[0.0, -np.inf, 0.0]]], np.float32)]
    if library == "torch":
        torch = pytest.importorskip("torch")
        outs, lses = [torch.from_numpy(o) for o in outs], [torch.from_numpy(s) for s in lses]
    m_out, m_lse = (np.asarray(x) for x in merge_attention_states(outs, lses))
    assert np.isnan(m_out[0, 0, :2]).all() and np.isnan(m_lse[0, 0, :2]).all()
    np.testing.assert_allclose(m_out[0, 0, 2], 1.5, rtol=1e-6)
    np.testing.assert_allclose(m_lse[0, 0, 2], np.log(2), rtol=1e-6)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_an_underflowed_part_still_brings_its_infinite_and_nan_entries():
    """A part with keys weighs > 0 however its weight rounds: where it underflows, its ±inf/NaN
    entries still reach the row (docs/semantics.md), on NumPy arrays and torch tensors; an empty
    part (LSE −inf) never does.  (Both merges dropped them until 4 Dec 2026.)"""
    outs = [np.array([[[[1.0, 2.0, 3.0]]]]), np.array([[[[np.nan, np.inf, 4.0]]]]), np.array([[[[np.nan, -np.inf, 5.0]]]])]
    lses = [np.array([[[0.0]]]), np.array([[[-800.0]]]), np.array([[[-np.inf]]])]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out, lse = dotattn.merge_attention_states(outs, lses)
    np.testing.assert_array_equal(np.isnan(out), [[[[True, False, False]]]])
    assert out[0, 0, 0, 1] == np.inf and out[0, 0, 0, 2] == 3.0 and lse[0, 0, 0] == 0.0
    torch = pytest.importorskip("torch")
    t_out, t_lse = dotattn.merge_attention_states([torch.from_numpy(x) for x in outs], [torch.from_numpy(x) for x in lses])
    np.testing.assert_array_equal(t_out.numpy(), out)
    np.testing.assert_array_equal(t_lse.numpy(), lse)


def test_large_lse_does_not_overflow():
    outs = [np.ones((1, 1, 1, 2)), 3 * np.ones((1, 1, 1, 2))]
    lses = [np.array([[[1e4]]]), np.array([[[1e4]]])]
    m_out, m_lse = merge_attention_states(outs, lses)
    np.testing.assert_allclose(m_out, 2.0)
    np.testing.assert_allclose(m_lse, 1e4 + np.log(2))


@pytest.mark.parametrize(
    "outs, lses, err, words",
    [
        ([], [], ValueError, "at least one"),
        (np.zeros((1, 1, 1, 1)), [np.zeros((1, 1, 1))], TypeError, "outs must be a list"),
        ([np.zeros((1, 1, 1, 1))], [], ValueError, "one entry per part"),
        ([np.zeros((1, 1, 2, 1)), np.zeros((1, 1, 3, 1))], [np.zeros((1, 1, 2))] * 2, ValueError, "outs[1]"),
        ([np.zeros((1, 1, 2, 1))], [np.zeros((1, 2, 1))], ValueError, "lses[0] must have shape (1, 1, 2)"),
        ([np.zeros((1, 1, 2, 1), dtype=np.int32)], [np.zeros((1, 1, 2))], TypeError, "outs[0] must have a floating"),
        ([[0.0]], [[0.0]], TypeError, "NumPy arrays or torch tensors"),
        ([np.ma.masked_array(np.zeros((1, 1, 2, 1)))], [np.zeros((1, 1, 2))], TypeError, "outs[0] is a numpy.ma.MaskedArray"),
    ],
)
def test_bad_input_names_the_argument(outs, lses, err, words):
    with pytest.raises(err) as info:
        merge_attention_states(outs, lses)
    assert words in str(info.value)


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
@pytest.mark.parametrize("which", ["outs", "lses"])
@pytest.mark.parametrize("dtype", ["int64", "bool", "uint8", "complex64"])
def test_torch_parts_of_no_floating_dtype_are_refused(which, dtype):
    """A torch dtype with no NumPy float twin was taken for float64 (np.dtype("float64") == None
    holds, so ``None in FLOAT_DTYPES`` did): audit of 6 Dec."""
    import torch

    parts = {"outs": [torch.zeros(1, 1, 2, 3)], "lses": [torch.zeros(1, 1, 2)]}
    parts[which] = [parts[which][0].to(getattr(torch, dtype))]
    with pytest.raises(TypeError, match=rf"{which}\[0\] must have a floating dtype .* got torch.{dtype}"):
        merge_attention_states(parts["outs"], parts["lses"])


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_sparse_torch_parts_are_refused_by_name():
    import torch

    with pytest.raises(TypeError, match=r"outs\[0\] is a torch.sparse_coo tensor"):
        merge_attention_states([torch.zeros(1, 1, 2, 3).to_sparse()], [torch.zeros(1, 1, 2)])


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_torch_matches_numpy_and_differentiates():
    import torch

    (out, lse), outs, lses = _parts(np.random.default_rng(4), [(0, 3), (3, 8)])
    t_outs = [torch.tensor(o, requires_grad=True) for o in outs]
    t_lses = [torch.tensor(s, requires_grad=True) for s in lses]
    m_out, m_lse = merge_attention_states(t_outs, t_lses)
    assert isinstance(m_out, torch.Tensor)
    np.testing.assert_allclose(m_out.detach().numpy(), out, atol=1e-13)
    np.testing.assert_allclose(m_lse.detach().numpy(), lse, atol=1e-13)
    (m_out.sum() + m_lse.sum()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in t_outs + t_lses)
    empty = merge_attention_states([torch.ones(1, 1, 1, 2)], [torch.full((1, 1, 1), float("-inf"))])
    assert (empty[0] == 0).all() and torch.isneginf(empty[1]).all()


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
@pytest.mark.parametrize("fill", [float("nan"), float("inf"), float("-inf"), 0.0])
def test_an_empty_parts_output_never_reaches_the_gradients(fill):
    """An empty part (LSE −inf) contributes nothing whatever its output holds — in the backward
    too: a NaN or ±inf there made every LSE gradient of its row NaN (0 · NaN through the branch
    ``where`` drops), though the forward was right."""
    import torch

    (out, lse), outs, lses = _parts(np.random.default_rng(11), [(0, 4), (4, 9)])
    t_outs = [torch.tensor(o, requires_grad=True) for o in outs]
    t_lses = [torch.tensor(s, requires_grad=True) for s in lses]
    empty_out = torch.full_like(t_outs[0], fill).requires_grad_(True)
    empty_lse = torch.full_like(t_lses[0], float("-inf")).requires_grad_(True)
    m_out, m_lse = merge_attention_states([t_outs[0], empty_out, t_outs[1]], [t_lses[0], empty_lse, t_lses[1]])
    np.testing.assert_allclose(m_out.detach().numpy(), out, atol=1e-13)
    np.testing.assert_allclose(m_lse.detach().numpy(), lse, atol=1e-13)
    (m_out.sum() + m_lse.sum()).backward()
    # the same gradients as the merge without the empty part, and zeros for the empty part
    r_outs = [torch.tensor(o, requires_grad=True) for o in outs]
    r_lses = [torch.tensor(s, requires_grad=True) for s in lses]
    r_out, r_lse = merge_attention_states(r_outs, r_lses)
    (r_out.sum() + r_lse.sum()).backward()
    for got, want in zip(t_outs + t_lses, r_outs + r_lses):
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-13)
    assert (empty_out.grad == 0).all() and (empty_lse.grad == 0).all()


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
@pytest.mark.parametrize("target", ["out", "lse-of-the-other-rows", "both"])
def test_a_row_with_no_part_has_zero_gradients_not_nan(target):
    """A row whose every part is empty (LSE −inf: 0 and −inf out) passes gradient 0 to its
    inputs: until 6 Dec 2026 the merged LSE's log(0) gave inf · 0 = NaN to the row's LSE inputs
    whatever the loss read (even a loss on the other rows' LSEs alone)."""
    import torch

    outs = [torch.randn(1, 1, 3, 2, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    lse_values = torch.tensor([[[[0.5, float("-inf"), 2.0]]], [[[1.0, float("-inf"), float("-inf")]]]], dtype=torch.float64)
    lses = [lse_values[i].clone().requires_grad_(True) for i in range(2)]
    out, lse = merge_attention_states(outs, lses)
    assert torch.isneginf(lse[0, 0, 1]) and (out[0, 0, 1] == 0).all()
    finite_lse = lse[..., [0, 2]]
    loss = {"out": out.sum(), "lse-of-the-other-rows": finite_lse.sum(), "both": out.sum() + finite_lse.sum()}[target]
    loss.backward()
    for t in outs + lses:
        assert t.grad is None or torch.isfinite(t.grad).all(), t.grad
    for t in lses:
        assert t.grad[0, 0, 1] == 0
    if target == "lse-of-the-other-rows":  # d lse / d lseᵢ = the part's weight: row 0 splits, row 2 is all part 0's
        w0 = 1 / (1 + np.exp(0.5))
        torch.testing.assert_close(lses[0].grad[0, 0, [0, 2]], torch.tensor([w0, 1.0], dtype=torch.float64))
        torch.testing.assert_close(lses[1].grad[0, 0, [0, 2]], torch.tensor([1 - w0, 0.0], dtype=torch.float64))


# =================================================================================
# random partitions (hypothesis)
# =================================================================================

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import helpers as H  # noqa: E402


@st.composite
def partitions(draw):
    """``(q, k, v, kv_lengths, bounds, dtype)``: keys cut into consecutive parts (some may be
    empty, or fully masked by kv_lengths for some sequences)."""
    dtype = draw(st.sampled_from(H.DTYPES))
    B, Hh, Lq = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 6))
    Lk, D, Dv = draw(st.integers(0, 80)), draw(st.integers(1, 24)), draw(st.integers(1, 24))
    cuts = sorted(draw(st.lists(st.integers(0, Lk), max_size=4)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal(s).astype(dtype) for s in ((B, Hh, Lq, D), (B, Hh, Lk, D), (B, Hh, Lk, Dv)))
    kv_lengths = rng.integers(0, Lk + 1, size=B) if draw(st.booleans()) else None
    return q, k, v, kv_lengths, [0, *cuts, Lk], dtype


@settings(max_examples=150)
@given(case=partitions())
def test_random_partitions_merge_to_the_whole(case):
    """Parts computed in the input dtype and merged give the whole attention within the tolerance
    rule (against float64, 2× the naive whole in that dtype); rows no part sees are 0, LSE −inf."""
    q, k, v, kv_lengths, bounds, dtype = case
    outs, lses = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        part_lengths = None if kv_lengths is None else np.clip(kv_lengths - a, 0, b - a)
        o, s = dotattn.attention(q, k[:, :, a:b], v[:, :, a:b], kv_lengths=part_lengths, return_lse=True,
                                 scale=1.0 / np.sqrt(q.shape[-1]), implementation="numpy")
        outs.append(o)
        lses.append(s)
    out, lse = merge_attention_states(outs, lses)
    assert out.dtype == dtype and lse.dtype == (np.float64 if dtype == np.float64 else np.float32)
    ref_out, ref_lse = H.reference(q, k, v, kv_lengths=kv_lengths)
    naive_out, naive_lse = H.naive(q, k, v, kv_lengths=kv_lengths)
    H.assert_close_to_reference(out, ref_out, naive_out, name="merged out", factor=2.0)
    empty = np.isneginf(ref_lse)
    assert (np.isneginf(lse) == empty).all() and (out[empty] == 0).all()
    H.assert_close_to_reference(lse, ref_lse, naive_lse, name="merged lse")


def test_parts_of_different_dtypes_merge_to_the_widest_in_any_order():
    """The output took ``outs[0]``'s dtype: float16 parts before a float32 one were rounded to
    float16, the same parts in the other order were not (a merge has no order)."""
    rng = np.random.default_rng(3)
    a = rng.standard_normal((1, 2, 3, 4)).astype(np.float32)
    lse_a, lse_b = rng.standard_normal((2, 1, 2, 3)).astype(np.float32)
    for low, wide in ((np.float16, np.float32), (np.float32, np.float64), (np.float16, np.float64)):
        b = rng.standard_normal((1, 2, 3, 4)).astype(low)
        one, _ = merge_attention_states([b, a.astype(wide)], [lse_b, lse_a])
        other, _ = merge_attention_states([a.astype(wide), b], [lse_a, lse_b])
        assert one.dtype == other.dtype == wide
        np.testing.assert_array_equal(one, other)
    same, _ = merge_attention_states([a.astype(np.float16)] * 2, [lse_a, lse_b])
    assert same.dtype == np.float16  # parts of one dtype keep it
    bf16 = dotattn.semantics.FLOAT_DTYPES[1]
    mixed, _ = merge_attention_states([a.astype(np.float16), a.astype(bf16)], [lse_a, lse_b])
    assert mixed.dtype == np.float32  # float16 beside bfloat16: float32, as NumPy and torch promote


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_torch_parts_of_different_dtypes_merge_to_the_widest_in_any_order():
    import torch

    a = torch.randn(1, 2, 3, 4)
    lse = torch.zeros(1, 2, 3)
    for low, wide in ((torch.float16, torch.float32), (torch.bfloat16, torch.float64), (torch.float16, torch.bfloat16)):
        out1, _ = merge_attention_states([a.to(low), a.to(wide)], [lse, lse])
        out2, _ = merge_attention_states([a.to(wide), a.to(low)], [lse, lse])
        want = torch.promote_types(low, wide)
        assert out1.dtype == out2.dtype == want


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_a_merge_in_one_block_and_in_many_gives_the_same_bits(library, dtype, layout, monkeypatch):
    """The merge weighs parts into its accumulator whole when it fits one block (≈ 1 MiB: small
    merges skip the row views) and in blocks of rows otherwise; both give the same bits —
    blocks of 7 rows with a partial last one, strided parts, rows whose weight underflows,
    −inf (empty) parts and NaN / ±inf values included."""
    if library == "torch" and not HAS_TORCH:
        pytest.skip("torch not installed")
    from dotattn.kernels import _merge

    rng = np.random.default_rng(11)
    shape = (2, 5, 9, 6)  # (B, H, L, D) in bhld: 90 rows of 6
    bf16 = dotattn.semantics.FLOAT_DTYPES[1]
    dt = bf16 if dtype == "bfloat16" else np.dtype(dtype)
    outs = [rng.standard_normal(shape).astype(dt) for _ in range(3)]
    outs[0].flat[::17] = np.nan
    outs[2].flat[5::23] = np.inf
    outs[1] = np.ascontiguousarray(np.swapaxes(outs[1], 0, 1)).swapaxes(0, 1)  # strided
    lse_dt = np.float64 if dtype == "float64" else np.float32
    lses = [rng.standard_normal(shape[:3]).astype(lse_dt) for _ in range(3)]
    lses[2][0] = -200.0 if dtype != "float64" else -2000.0  # weights that underflow to 0
    lses[1][1, 2] = -np.inf  # an empty part on some rows
    if layout == "blhd":
        outs = [x.swapaxes(1, 2) for x in outs]
        lses = [x.swapaxes(1, 2).swapaxes(1, 2) for x in lses]  # lses stay (B, H, L)
    if library == "torch":
        import torch

        outs = [torch.from_numpy(np.ascontiguousarray(x).view(np.uint16)).view(torch.bfloat16) if dtype == "bfloat16"
                else torch.from_numpy(np.ascontiguousarray(x)) for x in outs]
        lses = [torch.from_numpy(x) for x in lses]

    def merged():
        if library == "torch":
            import torch

            with torch.no_grad():
                o, s = merge_attention_states(outs, lses, layout=layout)
            return (o.float() if dtype == "bfloat16" else o).numpy(), s.numpy()
        o, s = merge_attention_states(outs, lses, layout=layout)
        return o.astype(np.float32) if dtype == "bfloat16" else o, s

    whole = merged()
    monkeypatch.setattr(_merge, "_MERGE_BLOCK_BYTES", 7 * 6 * (8 if dtype == "float64" else 4))
    blocks = merged()
    np.testing.assert_array_equal(whole[0], blocks[0])
    np.testing.assert_array_equal(whole[1], blocks[1])
    assert np.isnan(whole[0]).any() and np.isinf(whole[0]).any()  # the cases reached the result
