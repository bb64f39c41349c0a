"""Repeated decode calls: the kinds normalize() keeps and KVCache's trusted path give the bits
and the refusals of a fully checked first call (``decode_semantics.call_key``, ``trusted=``)."""

from __future__ import annotations

import numpy as np
import pytest

import decode_cases as C
import helpers as H
import dotattn
from dotattn import AttentionTypeError, AttentionValueError, KVCache, decode_semantics

BACKENDS = C.decode_backends()


def _layout(x, layout):
    return x if layout == "bhld" else np.ascontiguousarray(x.swapaxes(1, 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("page_size", [None, 3])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_attend_gives_the_bits_of_the_checked_public_call(backend, page_size, layout):
    """KVCache.attend (its lengths and table passed through trusted) writes and returns the bits
    attention_with_kvcache gives on copies of the same buffers — as the first call of its kind
    (every check run) and as a later one — step after step, across page boundaries."""
    rng = np.random.default_rng(3)
    B, Hq, Hkv, D, layers = 2, 4, 2, 8, 2
    cache = KVCache(B, Hkv, D, 24, num_layers=layers, page_size=page_size, layout=layout, fill=np.nan)
    for layer in range(layers):
        kv = _layout(rng.standard_normal((B, Hkv, 6, D)).astype(np.float32), layout)
        cache.append(kv, kv + 1, layer=layer, lengths=[5, 2])
    for step in range(7):
        for layer in range(layers):
            q = _layout(rng.standard_normal((B, Hq, 1, D)).astype(np.float32), layout)
            kn, vn = (_layout(rng.standard_normal((B, Hkv, 1, D)).astype(np.float32), layout) for _ in range(2))
            k_buf, v_buf = cache.layer(layer)
            kc, vc = k_buf.copy(), v_buf.copy()
            lengths = cache.lengths
            out, lse = cache.attend(q, kn, vn, layer=layer, return_lse=True, implementation=backend)
            # the table after the call: the pages this step needed (entries only ever get added)
            table = cache.block_table
            for first in (True, False):
                if first:
                    decode_semantics.clear_kinds()
                k2, v2 = kc.copy(), vc.copy()
                out2, lse2 = dotattn.attention_with_kvcache(
                    q, k2, v2, kn, vn, cache_lengths=lengths, block_table=table, layout=layout, return_lse=True,
                    implementation=backend,
                )
                H.assert_bitwise_equal(out, out2, name=f"out (step {step}, layer {layer})")
                H.assert_bitwise_equal(lse, lse2, name=f"lse (step {step}, layer {layer})")
                H.assert_bitwise_equal(k_buf, k2, name="k cache")
                H.assert_bitwise_equal(v_buf, v2, name="v cache")
    np.testing.assert_array_equal(cache.lengths, [12, 9])


def _bad_attends(q, kn, vn):
    """(id, changed attend arguments, error, words): what a caller supplies, each refused."""
    return [
        ("q-dtype", dict(q=q.astype(np.float64)), AttentionTypeError, ["q", "float32"]),
        ("q-heads", dict(q=q[:, :3]), AttentionValueError, ["heads", "multiple"]),
        ("v-new-heads", dict(v_new=vn[:, :1]), AttentionValueError, ["v_new", "Hkv=2"]),
        ("k-new-heads", dict(k_new=kn[:, :1]), AttentionValueError, ["k_new", "Hkv=2"]),
        ("k-new-dtype", dict(k_new=kn.astype(np.float16)), AttentionTypeError, ["k_new", "dtype"]),
        ("v-new-missing", dict(v_new=None), AttentionValueError, ["k_new", "v_new"]),
        ("new-lengths-differ", dict(k_new=np.concatenate([kn, kn], 2)), AttentionValueError, ["k_new", "v_new"]),
        ("top-left", dict(causal="top_left"), AttentionValueError, ["causal"]),
        ("window", dict(window=(-1, 0)), AttentionValueError, ["window"]),
        ("scale-nan", dict(scale=float("nan")), AttentionValueError, ["scale"]),
        ("softcap-zero", dict(softcap=0.0), AttentionValueError, ["softcap"]),
        ("alibi-shape", dict(alibi_slopes=np.ones(3)), AttentionValueError, ["alibi_slopes"]),
        ("rotary-too-short", dict(rotary=C.rope_tables(4, 4)), AttentionValueError, ["rotary", "position"]),
        ("return-lse", dict(return_lse="yes"), AttentionTypeError, ["return_lse"]),
    ]


@pytest.mark.parametrize("page_size", [None, 4])
@pytest.mark.parametrize("bad", range(14))
def test_trusted_attend_still_refuses_what_the_caller_gives(page_size, bad):
    """After calls of its kind, a bad q, k_new, v_new or option is refused by attend with the
    message attention_with_kvcache gives for the same arguments, and nothing changes."""
    rng = np.random.default_rng(4)
    B, Hq, Hkv, D = 2, 4, 2, 8
    cache = KVCache(B, Hkv, D, 16, page_size=page_size, fill=np.nan)
    kv = rng.standard_normal((B, Hkv, 5, D)).astype(np.float32)
    cache.append(kv, kv)  # lengths 5: room for 3 more tokens in the second page
    q = rng.standard_normal((B, Hq, 1, D)).astype(np.float32)
    kn, vn = (rng.standard_normal((B, Hkv, 1, D)).astype(np.float32) for _ in range(2))
    for _ in range(2):  # calls of the good kind: kept, then reused
        cache.attend(q, kn, vn)
    name, change, error, words = _bad_attends(q, kn, vn)[bad]
    args = dict(q=q, k_new=kn, v_new=vn) | change
    state = (cache.k.tobytes(), cache.v.tobytes(), cache.block_table, cache.free_pages, cache.lengths)
    with pytest.raises(error) as info:
        cache.attend(**args)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"
    assert cache.k.tobytes() == state[0] and cache.v.tobytes() == state[1], "a refused attend wrote"
    assert state[2] is None or (cache.block_table == state[2]).all()
    assert cache.free_pages == state[3] and (cache.lengths == state[4]).all()
    # the public function refuses the same arguments with the same words
    k_buf, v_buf = (x.copy() for x in cache.layer(0))
    public = dict(args)
    with pytest.raises(error) as expected:
        dotattn.attention_with_kvcache(public.pop("q"), k_buf, v_buf, public.pop("k_new"), public.pop("v_new"),
                                       cache_lengths=cache.lengths, block_table=cache.block_table, **public)
    assert str(info.value) == str(expected.value)


def test_attend_past_the_capacity_is_refused_after_steps_that_fit():
    """The room a cache keeps account of (no check per call while it lasts) runs out where the
    capacity does: the call that would pass it is refused and changes nothing."""
    cache = KVCache(1, 1, 4, 7, page_size=3, fill=np.nan)
    kv = np.ones((1, 1, 5, 4), np.float32)
    cache.append(kv, kv)
    q, one = np.ones((1, 2, 1, 4), np.float32), np.ones((1, 1, 1, 4), np.float32)
    cache.attend(q, one, one)
    cache.attend(q, one, one)  # 7 tokens: full
    state = (cache.k.tobytes(), cache.block_table, cache.free_pages)
    with pytest.raises(AttentionValueError, match="sequence 0 does not fit"):
        cache.attend(q, one, one)
    assert (cache.k.tobytes(), cache.free_pages) == (state[0], state[2]) and (cache.block_table == state[1]).all()
    np.testing.assert_array_equal(cache.lengths, [7])
    cache.reset()
    cache.attend(q, one, one)  # room again after a reset
    np.testing.assert_array_equal(cache.lengths, [1])


def test_attend_out_of_pages_after_steps_that_fit():
    """Steps inside the pages held take none; the first step past them takes one from the free
    list, and is refused (changing nothing) when none is left."""
    cache = KVCache(2, 1, 4, 9, page_size=3, num_pages=4, fill=np.nan)
    kv = np.ones((2, 1, 2, 4), np.float32)
    cache.append(kv, kv)  # one page each, 2 free
    q, one = np.ones((2, 1, 1, 4), np.float32), np.ones((2, 1, 1, 4), np.float32)
    cache.attend(q, one, one)  # 3 tokens: still one page each
    assert cache.free_pages == 2
    cache.attend(q, one, one)  # 4 tokens: a second page each
    assert cache.free_pages == 0
    cache.attend(q, one, one)
    cache.attend(q, one, one)  # 6 tokens: full pages
    state = (cache.k.tobytes(), cache.block_table)
    with pytest.raises(AttentionValueError, match="out of pages"):
        cache.attend(q, one, one)
    assert cache.k.tobytes() == state[0] and (cache.block_table == state[1]).all()
    np.testing.assert_array_equal(cache.lengths, [6, 6])
    cache.reset(1)  # its two pages go back: sequence 0 can grow again
    cache.attend(q, one, one)
    np.testing.assert_array_equal(cache.lengths, [7, 1])


def test_call_key_tells_kinds_apart():
    """Shapes, dtypes and option values (with their types) make the key; values of arrays do not;
    what is not a plain NumPy array or a plain option value has none (the full path)."""
    case = C.make_case(5, B=2, lengths=[5, 9], page_size=4, capacity=12)

    def key(**changes):
        args = dict(q=case.q, k_cache=case.k_cache, v_cache=case.v_cache, k_new=case.k_new, v_new=case.v_new,
                    block_table=case.block_table, causal=True, window=None, scale=None, softcap=None,
                    layout="bhld") | changes
        return decode_semantics.call_key(**args)

    base = key()
    assert base is not None and key(q=case.q + 1) == base and key(block_table=case.block_table + 1) == base
    assert key(q=case.q.astype(np.float64)) != base
    assert key(k_new=case.k_new[:, :, :0], v_new=case.v_new[:, :, :0]) != base
    assert key(causal=1) != base and key(scale=0.5) != key(scale=0.25) != base
    assert key(window=(2, 0)) != base
    assert key(block_table=None) != base
    for other in (dict(scale=np.float32(0.5)), dict(window=[2, 0]), dict(block_table=case.block_table.tolist()),
                  dict(k_new=None)):
        assert key(**other) is None


@pytest.mark.parametrize("parallel", [False, True])
def test_lengths_in_any_form_give_the_same_bits_and_stay_unchanged(monkeypatch, parallel):
    """cpu_decode hands the caller's own int64 lengths to the kernels when it can (C-contiguous,
    aligned, writeable, nothing appended) and a fresh array otherwise: a strided view, a
    read-only array, a list and an int32 array give the same bits, and none of them is written."""
    from dotattn.kernels import cpu_decode

    if parallel:  # the parallel entries (plan, items, merges) instead of the one-entry kernel
        monkeypatch.setattr(cpu_decode, "PARALLEL_MIN_BYTES", 0)
    rng = np.random.default_rng(5)
    B, Hq, Hkv, D, cap = 3, 4, 2, 16, 600
    q = rng.standard_normal((B, Hq, 1, D)).astype(np.float32)
    kc = rng.standard_normal((B, Hkv, cap, D)).astype(np.float32)
    vc = rng.standard_normal((B, Hkv, cap, D)).astype(np.float32)
    base = np.array([517, 3, 290], dtype=np.int64)
    strided = np.repeat(base, 2)[::2]
    read_only = base.copy()
    read_only.flags.writeable = False
    forms = [base.copy(), strided, read_only, base.tolist(), base.astype(np.int32)]
    outs = []
    for lengths in forms:
        before = np.array(lengths, copy=True)
        outs.append(dotattn.attention_with_kvcache(q, kc, vc, cache_lengths=lengths, implementation="cpu"))
        np.testing.assert_array_equal(np.asarray(lengths), before)
    for i, out in enumerate(outs[1:], 1):
        H.assert_bitwise_equal(out, outs[0], name=f"out with lengths form {i}")
