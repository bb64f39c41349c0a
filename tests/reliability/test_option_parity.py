"""One rule for options in every front end: the same bad option gets the same kind of error,
naming the user's argument, from NumPy, PyTorch, JAX and TensorFlow and from the layers."""

from __future__ import annotations

import helpers as H
import numpy as np
import pytest

import dotattn
from dotattn.errors import AttentionTypeError, AttentionValueError, DotAttnError

FRONT_ENDS = ["numpy", "torch", "jax", "tensorflow"]


def _convert(front_end, *arrays):
    if front_end == "torch":
        torch = pytest.importorskip("torch")
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    if front_end == "jax":
        jnp = pytest.importorskip("jax.numpy")
        return [jnp.asarray(a) for a in arrays]
    if front_end == "tensorflow":
        tf = H.import_tensorflow()
        return [tf.constant(a) for a in arrays]
    return list(arrays)


BAD_OPTIONS = [
    (dict(return_lse="no"), AttentionTypeError, "return_lse must be True or False"),
    (dict(return_lse=1), AttentionTypeError, "return_lse must be True or False"),
    (dict(return_weights=0.0), AttentionTypeError, "return_weights must be True or False"),
    (dict(return_weights=True, max_weights_bytes=0), AttentionValueError, "over max_weights_bytes=0"),
    (dict(return_weights=True, max_weights_bytes=-5), AttentionValueError, "max_weights_bytes must be ≥ 0"),
    (dict(return_weights=True, max_weights_bytes=1.5), AttentionTypeError, "max_weights_bytes must be an int"),
    (dict(window=(10**30, -1)), AttentionValueError, "window right side must be ≥ 0 or None, got -1"),
    (dict(dropout_p=0.1, seed=-1), AttentionValueError, "seed must be in"),
    (dict(dropout_p=0.1, seed="abc"), AttentionTypeError, "seed must be an int"),
    (dict(dropout_p=0.1, seed=1.5), AttentionTypeError, "seed must be an int"),
    (dict(dropout_p=0.1, seed=2**63), AttentionValueError, "seed must be in"),
    (dict(scale=10**400), AttentionValueError, "scale must be a finite number"),
]


@pytest.mark.parametrize("front_end", FRONT_ENDS)
@pytest.mark.parametrize("options,error,words", BAD_OPTIONS, ids=lambda x: repr(x)[:40] if isinstance(x, dict) else "")
def test_bad_options_are_refused_alike(front_end, options, error, words):
    q, k, v = _convert(front_end, *H.random_qkv(0))
    with pytest.raises(error, match=words):
        dotattn.attention(q, k, v, **options)


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_weights_limit_is_the_same_everywhere(front_end):
    q, k, v = _convert(front_end, *H.random_qkv(0))
    _, w = dotattn.attention(q, k, v, return_weights=True, max_weights_bytes=2 * 2 * 5 * 5 * 4)
    assert tuple(w.shape) == (2, 2, 5, 5)


def test_tensorflow_seed_tensor_is_named():
    """A seed given as a TF tensor (how tf.function passes one) is checked as a Python one."""
    tf = H.import_tensorflow()
    q, k, v = _convert("tensorflow", *H.random_qkv(0))
    with pytest.raises(AttentionValueError, match=r"seed must be in \[0, 2\*\*63\), got -1"):
        dotattn.attention(q, k, v, dropout_p=0.1, seed=tf.constant(-1))
    with pytest.raises(AttentionTypeError, match="seed must be an int or an integer scalar tensor, got float32"):
        dotattn.attention(q, k, v, dropout_p=0.1, seed=tf.constant(1.5))


@pytest.mark.parametrize("seed", [-1, "abc", 1.5, True, 2**63])
def test_layer_seed_is_named(seed):
    with pytest.raises(DotAttnError, match="seed"):
        dotattn.MultiHeadAttention(8, 2, seed=seed)


def test_layer_batch_mismatch_names_query_and_key():
    mha = dotattn.MultiHeadAttention(8, 2)
    with pytest.raises(AttentionValueError, match=r"query and key .*query\(2, 10, 8\).*key\(3, 12, 8\)"):
        mha(np.zeros((2, 10, 8), np.float32), np.zeros((3, 12, 8), np.float32))


def test_layer_flags_are_bools():
    with pytest.raises(AttentionTypeError, match="bias must be True or False"):
        dotattn.MultiHeadAttention(8, 2, bias="yes")
    mha = dotattn.MultiHeadAttention(8, 2)
    with pytest.raises(AttentionTypeError, match="return_weights must be True or False"):
        mha(np.zeros((1, 3, 8), np.float32), return_weights="no")


def test_backward_flag_is_a_bool():
    q, k, v = H.random_qkv(0)
    out, lse = dotattn.attention(q, k, v, return_lse=True)
    with pytest.raises(AttentionTypeError, match="return_dbias must be True or False"):
        dotattn.attention_backward(q, k, v, out, lse, out, return_dbias="no")


def test_sparse_torch_tensors_are_named():
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(x) for x in H.random_qkv(0))
    with pytest.raises(AttentionTypeError, match="k is a torch.sparse_coo tensor.*k.to_dense"):
        dotattn.attention(q, k.to_sparse(), v)
    with pytest.raises(AttentionTypeError, match="mask is a torch.sparse_coo tensor"):
        dotattn.attention(q, k, v, mask=torch.ones(5, 5, dtype=torch.bool).to_sparse())


def test_attention_map_has_a_size_guard():
    q = np.zeros((1, 1, 3, 4), np.float32)
    call = np.lib.stride_tricks.as_strided  # a huge (never touched) key array: only its shape matters
    k = call(np.zeros(1, np.float32), shape=(1, 1, 2**20, 4), strides=(0, 0, 0, 0))
    with pytest.raises(AttentionValueError, match="attention_map would materialize .* over max_weights_bytes=1000"):
        dotattn.attention_map(q, k, pool=(1, 1), max_weights_bytes=1000)
    with pytest.raises(AttentionValueError, match="max_weights_bytes=1073741824"):
        k_big = call(np.zeros(1, np.float32), shape=(64, 1, 2**12, 4), strides=(0, 0, 0, 0))
        dotattn.attention_map(np.zeros((64, 1, 2**12, 4), np.float32), k_big, pool=(1, 1))


def test_torch_layer_names_its_arguments():
    torch = pytest.importorskip("torch")
    from dotattn.torch import MultiHeadAttention

    mha = MultiHeadAttention(8, 2)
    with pytest.raises(AttentionValueError, match=r"query and key must have the same batch size.*query\(2, 10, 8\).*key\(3, 12, 8\)"):
        mha(torch.zeros(2, 10, 8), torch.zeros(3, 12, 8))
    with pytest.raises(AttentionTypeError, match="need_weights must be True or False"):
        mha(torch.zeros(2, 10, 8), need_weights="yes")
