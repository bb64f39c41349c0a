"""Every refused decode call: a clear error naming the argument, and the cache left unchanged."""

from __future__ import annotations

import numpy as np
import pytest

import decode_cases as C
import dotattn
import helpers as H
from dotattn import AttentionTypeError, AttentionValueError, decode_semantics


def _paged():
    return C.make_case(1, B=2, lengths=[5, 9], page_size=4, capacity=12)


def _contig():
    return C.make_case(1, B=2, lengths=[5, 9], capacity=12)


def _with(case, **changes):
    args = dict(q=case.q, k_cache=case.k_cache, v_cache=case.v_cache, k_new=case.k_new, v_new=case.v_new)
    kwargs = case.kwargs()
    for name, value in changes.items():
        (args if name in args else kwargs)[name] = value
    return args, kwargs


def _table(case, fix):
    t = case.block_table.copy()
    fix(t)
    return t


def _uint64_table(case, page):
    """The case's table as uint64 (unused entries 0) with ``page`` at [0, 0]: a value past int64
    is reported as given, not as the negative number a cast to int64 makes of it."""
    t = np.where(case.block_table < 0, 0, case.block_table).astype(np.uint64)
    t[0, 0] = page
    return t


# (id, case maker, changes as a function of the case, error type, words the message must hold)
BAD = [
    ("q-not-4d", _contig, lambda c: dict(q=c.q[0]), AttentionValueError, ["q", "4-D"]),
    ("q-list", _contig, lambda c: dict(q=c.q.tolist()), AttentionTypeError, ["q"]),
    ("int-cache", _contig, lambda c: dict(k_cache=np.zeros(c.k_cache.shape, np.int32)), AttentionTypeError, ["k_cache", "dtype"]),
    ("cache-dtypes-differ", _contig, lambda c: dict(v_cache=c.v_cache.astype(np.float64)), AttentionTypeError, ["v_cache"]),
    ("q-f64-cache-f32", _contig, lambda c: dict(q=c.q.astype(np.float64)), AttentionTypeError, ["q", "float32"]),
    ("cache-batch", _contig, lambda c: dict(k_cache=c.k_cache[:1], v_cache=c.v_cache[:1]), AttentionValueError, ["k_cache", "B=2"]),
    ("cache-head-dim", _contig, lambda c: dict(k_cache=c.k_cache[..., :-1], v_cache=c.v_cache[..., :-1]), AttentionValueError, ["k_cache", "D="]),
    ("kv-cache-shapes", _contig, lambda c: dict(v_cache=c.v_cache[:, :, :-1]), AttentionValueError, ["k_cache", "v_cache"]),
    ("gqa-heads", _contig, lambda c: dict(q=c.q[:, :3]), AttentionValueError, ["heads", "multiple"]),
    ("k-new-without-v", _contig, lambda c: dict(v_new=None), AttentionValueError, ["k_new", "v_new"]),
    ("v-new-without-k", _contig, lambda c: dict(k_new=None), AttentionValueError, ["v_new", "k_new"]),
    ("k-new-shape", _contig, lambda c: dict(k_new=c.k_new[:, :1]), AttentionValueError, ["k_new", "Hkv=2"]),
    ("new-lengths-differ", _contig, lambda c: dict(k_new=np.concatenate([c.k_new, c.k_new], 2)), AttentionValueError, ["k_new", "v_new"]),
    ("k-new-dtype", _contig, lambda c: dict(k_new=c.k_new.astype(np.float16)), AttentionTypeError, ["k_new", "dtype"]),
    ("lengths-beyond-capacity", _contig, lambda c: dict(cache_lengths=[5, 12]), AttentionValueError, ["sequence 1", "capacity"]),
    ("lengths-beyond-pages", _paged, lambda c: dict(cache_lengths=[5, 12]), AttentionValueError, ["sequence 1", "pages"]),
    # lengths + Lnew past int64 must not wrap below the capacity (it did: an IndexError deep in the call)
    ("lengths-int64-max", _contig, lambda c: dict(cache_lengths=np.array([5, 2**63 - 1])), AttentionValueError, ["sequence 1", "capacity"]),
    ("lengths-int64-max-paged", _paged, lambda c: dict(cache_lengths=np.array([2**63 - 1, 3])), AttentionValueError, ["sequence 0", "pages"]),
    ("negative-length", _contig, lambda c: dict(cache_lengths=[-1, 3]), AttentionValueError, ["cache_lengths[0]", "≥ 0"]),
    ("float-lengths", _contig, lambda c: dict(cache_lengths=np.array([5.0, 9.0])), AttentionTypeError, ["cache_lengths", "integers"]),
    ("bool-lengths", _contig, lambda c: dict(cache_lengths=np.array([True, False])), AttentionTypeError, ["cache_lengths", "integers"]),
    ("lengths-shape", _contig, lambda c: dict(cache_lengths=[5, 9, 1]), AttentionValueError, ["cache_lengths", "shape"]),
    ("no-lengths", _contig, lambda c: dict(cache_lengths=None), AttentionValueError, ["cache_lengths"]),
    ("page-outside-pool", _paged, lambda c: dict(block_table=_table(c, lambda t: t.__setitem__((1, 0), 10**6))), AttentionValueError, ["block_table[1, 0]", "pool"]),
    ("page-negative", _paged, lambda c: dict(block_table=_table(c, lambda t: t.__setitem__((0, 1), -1))), AttentionValueError, ["block_table[0, 1]", "pool"]),
    ("page-repeated", _paged, lambda c: dict(block_table=_table(c, lambda t: t.__setitem__((1, 2), t[0, 0]))), AttentionValueError, ["block_table", "repeats page"]),
    ("table-float", _paged, lambda c: dict(block_table=c.block_table.astype(np.float32)), AttentionTypeError, ["block_table", "integers"]),
    ("table-shape", _paged, lambda c: dict(block_table=c.block_table[:1]), AttentionValueError, ["block_table", "(B, max_pages)"]),
    ("window-minus-one", _contig, lambda c: dict(window=(-1, 0)), AttentionValueError, ["window", "None"]),
    ("softcap-zero", _contig, lambda c: dict(softcap=0.0), AttentionValueError, ["softcap", "None"]),
    ("scale-nan", _contig, lambda c: dict(scale=float("nan")), AttentionValueError, ["scale"]),
    ("top-left", _contig, lambda c: dict(causal="top_left"), AttentionValueError, ["causal"]),
    ("alibi-shape", _contig, lambda c: dict(alibi_slopes=np.ones(3)), AttentionValueError, ["alibi_slopes"]),
    ("layout", _contig, lambda c: dict(layout="bshd"), AttentionValueError, ["layout"]),
    ("rotary-not-pair", _contig, lambda c: dict(rotary=np.ones((4, 4))), AttentionValueError, ["rotary"]),
    ("rotary-too-wide", _contig, lambda c: dict(rotary=C.rope_tables(64, 9)), AttentionValueError, ["rotary", "rotary_dim"]),
    ("rotary-too-short", _contig, lambda c: dict(rotary=C.rope_tables(8, 4)), AttentionValueError, ["rotary", "position"]),
    ("implementation", _contig, lambda c: dict(implementation="cuda"), AttentionValueError, ["implementation", "numpy", "'triton'"]),
    ("return-lse", _contig, lambda c: dict(return_lse="yes"), AttentionTypeError, ["return_lse"]),
    # audit of 6 Dec: each of these was accepted, or failed with an error not naming the argument
    ("timedelta-lengths", _contig, lambda c: dict(cache_lengths=np.array([5, 9], "m8[s]")), AttentionTypeError, ["cache_lengths", "integers"]),
    ("table-uint64-past-int64", _paged, lambda c: dict(block_table=_uint64_table(c, 2**63 + 1)),
     AttentionValueError, ["block_table", "int64", str(2**63 + 1)]),
    ("implementation-triton-on-numpy", _contig, lambda c: dict(implementation="triton"), AttentionValueError, ["triton", "NumPy arrays"]),
    ("implementation-list", _contig, lambda c: dict(implementation=["cpu"]), AttentionTypeError, ["implementation", "list"]),
    ("masked-q", _contig, lambda c: dict(q=np.ma.masked_array(c.q, mask=False)), AttentionTypeError, ["q", "MaskedArray"]),
    ("masked-k-new", _contig, lambda c: dict(k_new=np.ma.masked_array(c.k_new, mask=True)), AttentionTypeError, ["k_new", "MaskedArray"]),
    # review of 7 Dec: masked small arguments were read without their masks; ragged lists and
    # a bool in a list of lengths reached NumPy (an error naming no argument, or [1, 2])
    ("masked-lengths", _contig, lambda c: dict(cache_lengths=np.ma.masked_array([5, 9], mask=[True, False])),
     AttentionTypeError, ["cache_lengths", "MaskedArray"]),
    ("masked-table", _paged, lambda c: dict(block_table=np.ma.masked_array(c.block_table, mask=False)),
     AttentionTypeError, ["block_table", "MaskedArray"]),
    ("masked-alibi", _contig, lambda c: dict(alibi_slopes=np.ma.masked_array(np.ones(c.q.shape[1]), mask=False)),
     AttentionTypeError, ["alibi_slopes", "MaskedArray"]),
    ("masked-rotary", _contig, lambda c: dict(rotary=tuple(np.ma.masked_array(t, mask=False) for t in C.rope_tables(64, 4))),
     AttentionTypeError, ["rotary cos", "MaskedArray"]),
    ("ragged-lengths", _contig, lambda c: dict(cache_lengths=[[5], [9, 1]]), AttentionValueError, ["cache_lengths", "rectangular"]),
    ("ragged-table", _paged, lambda c: dict(block_table=[[0], [1, 2]]), AttentionValueError, ["block_table", "rectangular"]),
    ("ragged-alibi", _contig, lambda c: dict(alibi_slopes=[[0.1], [0.1, 0.2]]), AttentionValueError, ["alibi_slopes", "rectangular"]),
    ("bool-in-length-list", _contig, lambda c: dict(cache_lengths=[True, 9]), AttentionTypeError, ["cache_lengths", "bool"]),
    ("one-array-both-caches", _contig, lambda c: dict(k_cache=c.v_cache), AttentionValueError, ["k_cache and v_cache share memory"]),
    ("zero-stride-cache", _contig, lambda c: dict(k_cache=np.lib.stride_tricks.as_strided(
        c.k_cache, strides=(0,) + c.k_cache.strides[1:], writeable=True)), AttentionValueError, ["k_cache", "zero stride"]),
]


@pytest.mark.parametrize("name,make,change,error,words", BAD, ids=[b[0] for b in BAD])
def test_refused_and_cache_unchanged(name, make, change, error, words):
    case = make()
    args, kwargs = _with(case, **change(case))
    before = (case.k_cache.tobytes(), case.v_cache.tobytes())
    with pytest.raises(error) as info:
        dotattn.attention_with_kvcache(**args, **kwargs)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    assert (case.k_cache.tobytes(), case.v_cache.tobytes()) == before, "a refused call wrote into the cache"


@pytest.mark.parametrize("name,make,change,error,words", BAD, ids=[b[0] for b in BAD])
def test_refused_alike_when_a_call_of_its_kind_was_seen(name, make, change, error, words):
    """normalize() keeps what it decided from shapes, dtypes and options (decode_semantics.call_key):
    a bad call after a good call of its kind is refused with the message a first call gets,
    and writes nothing."""
    case = make()
    args, kwargs = _with(case, **change(case))
    decode_semantics.clear_kinds()
    with pytest.raises(error) as first:
        dotattn.attention_with_kvcache(**args, **kwargs)
    # a valid call of the case's kind (copies of the caches: same shapes and dtypes)
    dotattn.attention_with_kvcache(case.q, case.k_cache.copy(), case.v_cache.copy(), case.k_new, case.v_new,
                                   **case.kwargs())
    before = (case.k_cache.tobytes(), case.v_cache.tobytes())
    with pytest.raises(error) as again:
        dotattn.attention_with_kvcache(**args, **kwargs)
    assert str(again.value) == str(first.value)
    assert (case.k_cache.tobytes(), case.v_cache.tobytes()) == before, "a refused call wrote into the cache"


def test_read_only_cache_is_refused_before_writing():
    case = _contig()
    case.k_cache.flags.writeable = False
    with pytest.raises(AttentionValueError, match="k_cache is read-only"):
        dotattn.attention_with_kvcache(case.q, case.k_cache, case.v_cache, case.k_new, case.v_new, **case.kwargs())
    # also when a writeable cache of its kind was seen (writeability is checked every call)
    dotattn.attention_with_kvcache(case.q, case.k_cache.copy(), case.v_cache.copy(), case.k_new, case.v_new,
                                   **case.kwargs())
    case.v_cache.flags.writeable = False
    case.k_cache.flags.writeable = True
    with pytest.raises(AttentionValueError, match="v_cache is read-only"):
        dotattn.attention_with_kvcache(case.q, case.k_cache, case.v_cache, case.k_new, case.v_new, **case.kwargs())


def test_mixed_libraries_are_refused():
    torch = pytest.importorskip("torch")
    case = _contig()
    with pytest.raises(AttentionTypeError, match="one library"):
        dotattn.attention_with_kvcache(
            torch.from_numpy(case.q), case.k_cache, case.v_cache, **case.kwargs()
        )


def test_unused_table_entries_are_not_checked():
    """Entries past the pages in use may hold anything (−1, garbage): they are never read."""
    case = _paged()
    table = case.block_table.copy()
    table[:, 3:] = 10**6
    out = dotattn.attention_with_kvcache(case.q, case.k_cache, case.v_cache, case.k_new, case.v_new,
                                         cache_lengths=case.cache_lengths, block_table=table)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("side", [2**62, 2**63, 2**64, 10**30])
@pytest.mark.parametrize("implementation", ["cpu", "numpy", "reference"])
def test_a_window_side_past_every_key_is_unbounded(side, implementation):
    """A side reaching past every key hides nothing: the same output as ``None`` on that side,
    on a kind's first call and on a repeated one — not an OverflowError from the kernels' int64
    positions (a side ≥ 2**63 raised one once a call of its kind had been seen)."""
    case = _contig()
    decode_semantics.clear_kinds()
    expected = dotattn.attention_with_kvcache(case.q, case.k_cache.copy(), case.v_cache.copy(), case.k_new, case.v_new,
                                              window=(None, 0), implementation=implementation, **case.kwargs())
    for _ in range(2):  # the kind's first call, then a repeated one
        for window in ((3, 0), (side, 0)):
            out = dotattn.attention_with_kvcache(case.q, case.k_cache.copy(), case.v_cache.copy(), case.k_new,
                                                 case.v_new, window=window, implementation=implementation,
                                                 **case.kwargs())
        H.assert_bitwise_equal(out, expected)


# ---------------------------------------------------------------------------------
# torch caches whose memory cannot take k_new as given (audit of 6 Dec)
# ---------------------------------------------------------------------------------


def _torch_case():
    torch = pytest.importorskip("torch")
    case = _contig()
    return torch, case, [torch.from_numpy(x) for x in (case.q, case.k_cache, case.v_cache, case.k_new, case.v_new)]


def test_an_expanded_torch_cache_is_refused():
    """``expand`` gives stride 0 on the batch axis: a write would land in every sequence's slots."""
    torch, case, (q, k, v, kn, vn) = _torch_case()
    k_expanded = k[:1].expand_as(k)
    before = k.numpy().tobytes()  # (bytes: the unused slots hold NaN)
    # the tensor's strides (elements) and torch's copy, not the NumPy view's byte strides and "a copy"
    strides = str(tuple(k_expanded.stride())).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(AttentionValueError, match=rf"k_cache has a zero stride \(strides {strides},.*\.clone\(\)"):
        dotattn.attention_with_kvcache(q, k_expanded, v, kn, vn, **case.kwargs())
    assert k.numpy().tobytes() == before
    # read only (no k_new), the same view is a valid cache: every sequence sees sequence 0's keys
    # (the cpu kernel reads the view in place: the bits of a contiguous copy)
    out = dotattn.attention_with_kvcache(q, k_expanded, v, **case.kwargs())
    want = dotattn.attention_with_kvcache(case.q, np.ascontiguousarray(k_expanded.numpy()), case.v_cache,
                                          **case.kwargs())
    np.testing.assert_array_equal(out.numpy(), want)


def test_a_torch_cache_with_a_negation_bit_is_refused_when_written():
    """A lazily negated tensor's memory holds the values' negatives: NumPy sees a resolved copy,
    so k_new would be written into the copy and lost."""
    torch, case, (q, k, v, kn, vn) = _torch_case()
    negated = torch._neg_view(k)
    with pytest.raises(AttentionValueError, match="lazy negation or conjugation bit"):
        dotattn.attention_with_kvcache(q, negated, v, kn, vn, **case.kwargs())
    # read only, the copy is what the tensor holds
    out = dotattn.attention_with_kvcache(q, negated, v, **case.kwargs())
    want = dotattn.attention_with_kvcache(case.q, -case.k_cache, case.v_cache, **case.kwargs())
    np.testing.assert_array_equal(out.numpy(), want)


def test_torch_small_arguments_of_a_numpy_call():
    """A NumPy call may take its lengths, table and slopes as torch tensors (made NumPy views as
    in a torch call); one requiring grad is converted, not refused by torch's numpy()."""
    torch, case, _ = _torch_case()
    slopes = np.linspace(0.1, 0.5, case.q.shape[1]).astype(np.float32)
    want = dotattn.attention_with_kvcache(case.q, case.k_cache.copy(), case.v_cache.copy(), case.k_new, case.v_new,
                                          cache_lengths=case.cache_lengths, alibi_slopes=slopes)
    got = dotattn.attention_with_kvcache(case.q, case.k_cache, case.v_cache, case.k_new, case.v_new,
                                         cache_lengths=torch.from_numpy(np.asarray(case.cache_lengths)),
                                         alibi_slopes=torch.from_numpy(slopes).requires_grad_())
    np.testing.assert_array_equal(got, want)
    with pytest.raises(AttentionTypeError, match="cache_lengths must hold integers"):
        dotattn.attention_with_kvcache(case.q, case.k_cache, case.v_cache,
                                       cache_lengths=torch.tensor([5.0, 9.0], requires_grad=True))


def test_ctrl_c_while_a_kernel_result_is_boxed_is_a_keyboard_interrupt(monkeypatch):
    """Numba reports a KeyboardInterrupt that arrives while it boxes a kernel's result as a
    SystemError ("returned a result with an exception set") caused by it; the caller gets the
    KeyboardInterrupt (`dotattn chat` stops a reply on it; it ended the session 1 time in 10)."""
    from dotattn.kernels import cpu_decode

    def interrupted(call, reference=False):  # as seen: a SystemError caused by one caused by the interrupt
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt as exc:
                raise SystemError("CPUDispatcher(<function run_serial>) returned a result with an exception set") from exc
        except SystemError as inner:
            raise SystemError("CPUDispatcher(<function plan>) returned a result with an exception set") from inner

    monkeypatch.setattr(cpu_decode, "decode", interrupted)
    q = np.zeros((1, 2, 1, 8), np.float32)
    cache = np.zeros((1, 2, 16, 8), np.float32)
    with pytest.raises(KeyboardInterrupt):
        dotattn.attention_with_kvcache(q, cache, cache.copy(), cache_lengths=[4], implementation="cpu")

    def failed(call, reference=False):
        raise SystemError("another SystemError")

    monkeypatch.setattr(cpu_decode, "decode", failed)
    with pytest.raises(SystemError, match="another"):
        dotattn.attention_with_kvcache(q, cache, cache.copy(), cache_lengths=[4], implementation="cpu")


def test_a_head_dim_mismatch_names_q_and_the_cache():
    """A q whose head dim is not the cache's was reported as "k_cache must have q's head dim
    D=3": through ``KVCache.attend``, where the caller passes q alone, that blamed the cache."""
    cache = dotattn.KVCache(2, 1, 4, 8)
    q = np.zeros((2, 2, 1, 3), np.float32)
    k_before = cache.k.copy()
    message = r"q and k_cache must share the head dim D \(last axis\), got q\(2, 2, 1, 3\) with D=3 and k_cache\(2, 1, 8, 4\) with D=4"
    with pytest.raises(AttentionValueError, match=message):
        cache.attend(q, np.ones((2, 1, 1, 4), np.float32), np.ones((2, 1, 1, 4), np.float32))
    assert (cache.k == k_before).all() and cache.lengths.tolist() == [0, 0]
    with pytest.raises(AttentionValueError, match=message):
        dotattn.attention_with_kvcache(q, cache.k[0], cache.v[0], cache_lengths=0)


def test_a_torch_v_new_in_a_numpy_call_is_named_as_the_library_mix():
    """The NumPy fast path checked k_new's type, not v_new's: a torch v_new got "v_new must be a
    NumPy array or a torch tensor, got torch.Tensor" (review of 7 Dec)."""
    torch, case, (q, k, v, kn, vn) = _torch_case()
    with pytest.raises(AttentionTypeError, match="must come from one library.*v_new is torch"):
        dotattn.attention_with_kvcache(case.q, case.k_cache, case.v_cache, case.k_new, vn, **case.kwargs())


def test_sparse_and_nested_torch_tensors_are_refused_by_name():
    """A sparse cache taking new tokens got the zero-stride message (COO) or torch's "Sparse CSR
    tensors do not have strides"; nested tensors got torch's "NestedTensorImpl doesn't support
    sizes" from every entry (review of 7 Dec)."""
    import warnings

    torch, case, (q, k, v, kn, vn) = _torch_case()
    before = k.numpy().tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch: sparse CSR and nested tensors are "beta"/"prototype")
        csr = k.reshape(-1, k.shape[-1]).nan_to_num().to_sparse_csr()
        nested = torch.nested.nested_tensor(list(q))
    for sparse, layout in ((k.nan_to_num().to_sparse(), "sparse_coo"), (csr, "sparse_csr")):
        with pytest.raises(AttentionTypeError, match=f"k_cache is a torch.{layout} tensor.*to_dense"):
            dotattn.attention_with_kvcache(q, sparse, v, kn, vn, **case.kwargs())
    assert k.numpy().tobytes() == before
    with pytest.raises(AttentionTypeError, match="q is a nested tensor"):
        dotattn.attention_with_kvcache(nested, k, v, kn, vn, **case.kwargs())
    with pytest.raises(AttentionTypeError, match="k_new is a nested tensor"):
        dotattn.attention_with_kvcache(q, k, v, torch.nested.nested_tensor(list(kn)), vn, **case.kwargs())
    assert k.numpy().tobytes() == before
    with pytest.raises(AttentionTypeError, match="q is a nested tensor"):
        dotattn.attention(nested, nested, nested)
    lse = torch.zeros(q.shape[:3])
    with pytest.raises(AttentionTypeError, match=r"outs\[0\] is a nested tensor"):
        dotattn.merge_attention_states([nested, nested], [lse, lse])
    B, Hkv, _, D = k.shape
    cache = dotattn.KVCache(B, Hkv, D, 16, library="torch")
    with pytest.raises(AttentionTypeError, match="k_new is a nested tensor"):
        cache.append(torch.nested.nested_tensor(list(kn)), vn)
    with pytest.raises(AttentionTypeError, match="q is a nested tensor"):
        cache.attend(nested)
    assert cache.lengths.tolist() == [0] * B


def test_kvcache_small_arguments_and_dtype_none():
    """KVCache.append took a masked ``lengths`` with its hidden entries, a ragged one got NumPy's
    "inhomogeneous shape", and ``dtype=None`` built float64 buffers (np.dtype(None)) where the
    default is float32 (review of 7 Dec)."""
    case = _contig()
    B, Hkv, _, D = case.k_cache.shape
    cache = dotattn.KVCache(B, Hkv, D, 16)
    kn, vn = case.k_new.astype(np.float32), case.v_new.astype(np.float32)
    with pytest.raises(AttentionTypeError, match="lengths is a numpy.ma.MaskedArray"):
        cache.append(kn, vn, lengths=np.ma.masked_array([1, 1], mask=[True, False]))
    with pytest.raises(AttentionValueError, match="lengths must be a rectangular array"):
        cache.append(kn, vn, lengths=[[1], [1, 1]])
    assert cache.lengths.tolist() == [0, 0]
    with pytest.raises(AttentionTypeError, match="dtype must be .* got None"):
        dotattn.KVCache(B, Hkv, D, 16, dtype=None)
    with pytest.raises(AttentionTypeError, match="kv_lengths is a numpy.ma.MaskedArray"):
        x = np.ones((1, 2, 3, 4), np.float32)
        dotattn.attention(x, x, x, kv_lengths=np.ma.masked_array([3], mask=[True]))
