"""merge_attention_states: parts over disjoint key sets merge to the whole, exactly."""

from __future__ import annotations

import importlib.util

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
    ],
)
def test_bad_input_names_the_argument(outs, lses, err, words):
    with pytest.raises(err) as info:
        merge_attention_states(outs, lses)
    assert words in str(info.value)


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
