"""The ``cpu`` backend's small-call path (``kernels/cpu_small.py``) and its size rule.

The rule sends a forward to the one-block kernel when ``(Hq/Hkv)·Lq·Lk ≤ MAX_SCORES`` and no
backend function is given; everything else runs the general tiled kernels.  Here: every
option on the small path against the float64 reference, shapes on both sides of the rule
(through ``dotattn.attention``, so the rule itself picks), the serial and the parallel
drivers, and the two paths against each other.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dotattn
from dotattn import semantics
from dotattn.kernels import cpu, cpu_small

import helpers as H


def _check(q, k, v, threads=None, **options):
    """Small path (forced through ``threads``) and ``attention(implementation="cpu")`` vs the reference."""
    call = semantics.normalize(q, k, v, **options)
    assert not cpu_small.unsupported_reasons(call)
    out, lse = cpu_small.forward(call, threads=threads)
    ref_out, ref_lse = H.reference(q, k, v, **options)
    naive_out, naive_lse = H.naive(q, k, v, **options)
    H.assert_close_to_reference(semantics.finalize_output(call, out), ref_out, naive_out, name="out")
    H.assert_close_to_reference(semantics.finalize_lse(call, lse), ref_lse, naive_lse, name="lse", dtype=q.dtype)
    return call, out, lse


@st.composite
def small_cases(draw):
    B = draw(st.integers(0, 3))
    Hkv = draw(st.integers(1, 3))
    Hq = Hkv * draw(st.sampled_from([1, 3]))
    # (past QUERY_BLOCK = 32 queries a causal or right-windowed call runs in query blocks)
    Lq = draw(st.sampled_from([1, 2, draw(st.integers(1, 40)), draw(st.integers(33, 100))]))
    Lk = draw(st.sampled_from([Lq, 0, 1, draw(st.integers(1, 70))]))
    D = draw(st.sampled_from([1, 16, 59, 64]))
    Dv = draw(st.sampled_from([D, 3]))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16, H.BFLOAT16]))
    layout = draw(st.sampled_from(["bhld", "blhd"]))
    options = {"layout": layout}
    if draw(st.booleans()):
        options["causal"] = draw(st.sampled_from([True, "top_left"]))
    if draw(st.booleans()):
        options["window"] = (draw(st.sampled_from([None, 0, 3])), draw(st.sampled_from([None, 0, 4])))
    if draw(st.booleans()):
        options["softcap"] = draw(st.sampled_from([0.5, 5.0]))
    if draw(st.booleans()):
        options["alibi_slopes"] = np.linspace(0.05, 0.5, Hq)
    lengths = draw(st.booleans()) and B > 0
    q_len = kv_len = None
    if lengths:
        q_len = H.random_lengths(draw(st.integers(0, 99)), (B,), Lq)
        kv_len = H.random_lengths(draw(st.integers(0, 99)), (B,), Lk)
        options["q_lengths"], options["kv_lengths"] = q_len, kv_len
    if draw(st.booleans()) and Lq == Lk:
        rng = np.random.default_rng(draw(st.integers(0, 99)))
        options["segment_ids"] = np.sort(rng.integers(0, 3, size=(B, Lq)), axis=1)
    if draw(st.booleans()):
        options["dropout_p"] = 0.3
        options["seed"] = draw(st.integers(0, 2**40))
    if draw(st.booleans()):
        options["bias"] = np.random.default_rng(1).standard_normal((Hq, Lq, Lk)).astype(dtype)
    if draw(st.booleans()):
        options["mask"] = H.random_mask(draw(st.integers(0, 99)), (Lq, Lk))
    if draw(st.booleans()):
        options["scale"] = draw(st.sampled_from([0.0, -0.3, 1.7]))
    q, k, v = H.random_qkv(
        draw(st.integers(0, 2**16)),
        batch=(B,),
        Hq=Hq,
        Hkv=Hkv,
        Lq=Lq,
        Lk=Lk,
        D=D,
        Dv=Dv,
        dtype=dtype,
        layout=layout,
        q_lengths=q_len,
        kv_lengths=kv_len,
    )
    return q, k, v, draw(st.sampled_from([1, 2])), options


@settings(max_examples=30)
@given(small_cases())
def test_every_option_matches_reference(case):
    q, k, v, threads, options = case
    _check(q, k, v, threads=threads, **options)


@pytest.mark.parametrize("threads", [1, 2], ids=["serial", "parallel"])
def test_issue_shapes_match_reference(threads):
    """The issue's shapes: a MiniLM-like causal batch and a GQA decode step (NaN past lengths)."""
    q, k, v = H.random_qkv(0, batch=(64,), Hq=4, Lq=11, D=16)
    _check(q, k, v, threads=threads, causal=True)
    kv_len = np.array([128, 77])
    q, k, v = H.random_qkv(1, batch=(2,), Hq=9, Hkv=3, Lq=1, Lk=128, D=64, kv_lengths=kv_len)
    _check(q, k, v, threads=threads, kv_lengths=kv_len)


@pytest.mark.parametrize(
    "Lq, Lk, group, small",
    [(256, 256, 1, True), (256, 257, 1, False), (1, 65536 // 4, 4, True), (2, 65536 // 4, 4, False)],
    ids=["at-limit", "past-limit", "decode-at-limit", "decode-past-limit"],
)
def test_rule_boundary_both_sides_match_reference(Lq, Lk, group, small):
    """``attention(implementation="cpu")`` on each side of ``MAX_SCORES``: the rule picks, both are right."""
    q, k, v = H.random_qkv(2, batch=(1,), Hq=group, Hkv=1, Lq=Lq, Lk=Lk, D=8)
    options = dict(causal=True, kv_lengths=np.array([Lk - 3]))
    call = semantics.normalize(q, k, v, **options)
    assert (not cpu_small.unsupported_reasons(call)) is small
    out, lse = dotattn.attention(q, k, v, return_lse=True, implementation="cpu", **options)
    ref_out, ref_lse = H.reference(q, k, v, **options)
    naive_out, naive_lse = H.naive(q, k, v, **options)
    H.assert_close_to_reference(out, ref_out, naive_out, name="out")
    H.assert_close_to_reference(lse, ref_lse, naive_lse, name="lse", dtype=q.dtype)


@pytest.mark.parametrize(
    "Lq, group, D, options, reason",
    [
        (682, 3, 8, dict(causal=True), None),  # 96 rows a block × 682 keys = 65,472 scores
        (683, 3, 8, dict(causal=True), "a query block's scores"),
        (512, 2, 128, dict(causal="top_left"), None),  # 512 · 256 = 131,072 key/value elements
        (513, 2, 128, dict(causal=True), "a query block's keys and values"),
        (200, 3, 8, dict(window=(None, 0)), None),  # a right window hides later keys too
        (200, 3, 8, dict(window=(7, None)), "score block"),  # no later key hidden: one block
        (300, 1, 8, dict(causal=True), "score block"),  # one query head a group: the whole block
    ],
    ids=["grouped-at-limit", "grouped-past-limit", "kv-at-limit", "kv-past-limit", "right-window",
         "left-window-only", "one-head-a-group"],
)
def test_grouped_calls_that_hide_later_keys_are_taken_by_query_block(Lq, group, D, options, reason):
    """Past MAX_SCORES for the whole (Hq/Hkv)·Lq·Lk, a grouped call that hides later keys is
    still a small call while one query block's scores fit MAX_SCORES and its keys and values
    MAX_BLOCK_KV; the rule says which limit a call passes, and both paths are right."""
    q, k, v = H.random_qkv(6, batch=(1,), Hq=2 * group, Hkv=2, Lq=Lq, D=D)
    call = semantics.normalize(q, k, v, **options)
    assert call.group * Lq * Lq > cpu_small.MAX_SCORES
    reasons = cpu_small.unsupported_reasons(call)
    if reason is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and reasons[0].startswith(reason), reasons
    out, lse = dotattn.attention(q, k, v, return_lse=True, implementation="cpu", **options)
    ref_out, ref_lse = H.reference(q, k, v, **options)
    naive_out, naive_lse = H.naive(q, k, v, **options)
    H.assert_close_to_reference(out, ref_out, naive_out, name="out")
    H.assert_close_to_reference(lse, ref_lse, naive_lse, name="lse", dtype=q.dtype)


@pytest.mark.parametrize(
    "options",
    [dict(causal=True), dict(window=(4, 0), q_lengths=np.array([19, 6]), kv_lengths=np.array([23, 11])),
     dict(dropout_p=0.25, seed=3, alibi_slopes=np.linspace(0.1, 0.6, 6))],
    ids=["causal", "window-lengths", "dropout-alibi"],
)
def test_small_and_general_paths_agree(options):
    """The same call on both paths: equal to the documented tolerance (the reference rule)."""
    q, k, v = H.random_qkv(
        4, batch=(2,), Hq=6, Hkv=2, Lq=19, Lk=23, D=32,
        q_lengths=options.get("q_lengths"), kv_lengths=options.get("kv_lengths"),
    )
    call = semantics.normalize(q, k, v, **options)
    small_out, small_lse = cpu_small.forward(call)
    general_out, general_lse = cpu.forward(call)
    naive_out, _ = H.naive(q, k, v, **options)
    ref_out, _ = H.reference(q, k, v, **options)
    # each within the rule of the reference, hence within twice the rule of each other
    H.assert_close_to_reference(semantics.finalize_output(call, small_out), ref_out, naive_out, name="small")
    H.assert_close_to_reference(semantics.finalize_output(call, general_out), ref_out, naive_out, name="general")
    tol = 4 * float(np.abs(naive_out - ref_out).max()) + 2e-6
    assert float(np.abs(small_out - general_out).max()) <= tol
    np.testing.assert_array_equal(np.isinf(small_lse), np.isinf(general_lse))


def test_backend_functions_go_to_the_general_kernels():
    q, k, v = H.random_qkv(5, batch=(1,), Hq=2, Lq=4, D=8)
    call = semantics.normalize(q, k, v, extras={"score_mod": lambda s, b, h, i, j: s})
    assert cpu_small.unsupported_reasons(call) == ["score_mod run in the general kernels"]


def test_info_shows_the_size_rule():
    row = next(r for r in dotattn.info() if r["name"] == "cpu")
    assert cpu_small.RULE in row["status"]
    assert f"{cpu_small.MAX_SCORES:,}" in cpu_small.RULE


def test_strided_inputs_reuse_scratch_safely():
    """Strided ("blhd") q/k/v are copied into per-thread scratch that the next call reuses:
    earlier results stay intact, and threads running at once never share a buffer."""
    import threading

    rng = np.random.default_rng(7)
    cases = [rng.standard_normal((2, 9, 3, 16)).astype(np.float32) for _ in range(6)]
    expected = [H.reference(x, x * 0.5, x * 0.25, layout="blhd")[0] for x in cases]
    naive = [H.naive(x, x * 0.5, x * 0.25, layout="blhd")[0] for x in cases]
    first = dotattn.attention(cases[0], cases[0] * 0.5, cases[0] * 0.25, layout="blhd", implementation="cpu")
    kept = first.copy()
    dotattn.attention(cases[1], cases[1] * 0.5, cases[1] * 0.25, layout="blhd", implementation="cpu")
    np.testing.assert_array_equal(first, kept)  # the scratch is internal: outputs never alias it

    results: dict[int, list[np.ndarray]] = {}

    def work(i):
        x = cases[i]
        results[i] = [
            dotattn.attention(x, x * 0.5, x * 0.25, layout="blhd", implementation="cpu") for _ in range(30)
        ]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, outs in results.items():
        for out in outs:
            H.assert_close_to_reference(out, expected[i], naive[i], name=f"thread {i}")
    assert len(results) == len(cases)


@pytest.mark.parametrize(
    "where, small_path",
    [("none", True), ("q", False), ("k", False), ("v_visible", False), ("v_hidden", False), ("v_padding", True)],
)
def test_nonfinite_values_leave_the_small_path(where, small_path):
    """The kernel reports a NaN score or a non-finite output itself (no pre-scan of q, k, v);
    such calls rerun on the general path, which follows the NaN policy.  Padding past the
    lengths is never read, so NaN there keeps the small path."""
    rng = np.random.default_rng(3)
    q = rng.standard_normal((1, 2, 4, 8)).astype(np.float32)
    k = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    v = rng.standard_normal((1, 2, 6, 8)).astype(np.float32)
    if where == "q":
        q[0, 1, 2, 3] = np.nan
    elif where == "k":
        k[0, 0, 1, 0] = np.nan
    elif where == "v_visible":
        v[0, 0, 0, 5] = np.inf
    elif where == "v_hidden":
        v[0, 1, 5, 2] = np.nan  # only the last row sees key 5; the others multiply it by p = 0 (no leak)
    elif where == "v_padding":
        v[0, :, 5] = np.nan
    options = dict(causal=True, kv_lengths=np.array([5]) if where == "v_padding" else None)
    call = semantics.normalize(q, k, v, **options)
    results = cpu_small.forward(call)
    assert (results is not None) is small_path
    out = dotattn.attention(q, k, v, implementation="cpu", **options)
    expected = dotattn.attention(q, k, v, implementation="numpy", **options)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(out[finite], expected[finite], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize(
    "shape, options",
    [
        (dict(batch=(3,), Hq=4, Hkv=2, Lq=11, Lk=11, D=16), dict(causal=True)),
        (dict(batch=(2,), Hq=2, Lq=5, Lk=9, D=8, Dv=3), dict(window=(2, 1), softcap=2.0, dropout_p=0.3, seed=5)),
        (dict(batch=(2,), Hq=3, Lq=6, Lk=6, D=8), dict(bias=np.linspace(-1, 1, 36).reshape(6, 6), q_lengths=np.array([6, 3]),
                                                       kv_lengths=np.array([4, 6]))),
    ],
)
def test_small_backward_runs_serially_with_the_parallel_bytes(monkeypatch, shape, options):
    """Below ``cpu.SERIAL_BACKWARD_MAX_WORK`` the backward calls the kernel's one chunk on the
    caller's thread; the gradients are the parallel kernel's, bit for bit, and the reference's."""
    q, k, v = H.random_qkv(11, **shape, q_lengths=options.get("q_lengths"), kv_lengths=options.get("kv_lengths"))
    out, lse = dotattn.attention(q, k, v, return_lse=True, implementation="cpu", **options)
    dout = np.random.default_rng(1).standard_normal(out.shape).astype(out.dtype)
    grads = {}
    for name, limit in (("serial", 1 << 40), ("parallel", 0)):
        monkeypatch.setattr(cpu, "SERIAL_BACKWARD_MAX_WORK", limit)
        grads[name] = dotattn.attention_backward(q, k, v, out, lse, dout, implementation="cpu", **options)
    for a, b in zip(grads["serial"], grads["parallel"], strict=True):
        H.assert_bitwise_equal(a, b, name="gradient")
    ref = H.reference_grads(q, k, v, dout, **options)
    naive = H.naive_grads(q, k, v, dout, **options)
    for got, want, rough, name in zip(grads["serial"], ref, naive, ("dq", "dk", "dv")):
        H.assert_close_to_reference(got, want, rough, name=name)


def test_items_from_the_shared_queue_give_the_serial_bytes():
    """Chunks take items from one queue, so which thread computes an item varies from call to
    call; each item is computed alike, so the results are the serial ones, bit for bit."""
    q, k, v = H.random_qkv(3, batch=(128,), Hq=4, Hkv=2, Lq=11, D=16)
    call = semantics.normalize(q, k, v, causal=True)
    assert cpu_small.SmallForward(call).parallel
    serial = cpu_small.forward(call, threads=1)
    for threads in (2, 3, 7):
        for _ in range(3):
            got = cpu_small.forward(call, threads=threads)
            for a, b in zip(got, serial, strict=True):
                H.assert_bitwise_equal(a, b)


@pytest.mark.parametrize("threads", [1, 2], ids=["serial", "parallel"])
@pytest.mark.parametrize(
    "Lq, Lk, options",
    [
        (70, 70, dict(causal=True)),
        (33, 45, dict(causal=True)),  # bottom-right: the first block already sees 13 keys
        (64, 40, dict(causal="top_left")),
        (100, 100, dict(window=(9, 0), softcap=3.0)),
        (40, 40, dict(window=(None, 3), alibi_slopes=np.linspace(0.1, 0.6, 6))),  # not causal: later keys hidden all the same
        (70, 70, dict(causal=True, q_lengths=np.array([70, 31, 0]), kv_lengths=np.array([70, 50, 12]))),
        (65, 65, dict(causal=True, dropout_p=0.3, seed=11, scale=1.7)),
        (48, 48, dict(causal=True, segment_ids=np.repeat(np.arange(3), 16)[None].repeat(3, 0),
                      mask=np.tri(48, 48, 5, dtype=bool))),
    ],
    ids=["causal", "bottom-right-longer-keys", "top-left", "window-softcap", "right-window-alibi", "lengths",
         "dropout-scale", "segments-mask"],
)
def test_query_blocks_match_reference(Lq, Lk, options, threads):
    """Under a causal mask (or a window hiding later keys) an item is a block of QUERY_BLOCK
    queries reading only the keys its rows see; every block, the last one short, rows past
    q_lengths, whole sequences with no query, all match the reference."""
    q_len, kv_len = options.get("q_lengths"), options.get("kv_lengths")
    q, k, v = H.random_qkv(21, batch=(3,), Hq=6, Hkv=2, Lq=Lq, Lk=Lk, D=32, q_lengths=q_len, kv_lengths=kv_len)
    call, _, _ = _check(q, k, v, threads=threads, **options)
    blocks = -(-Lq // cpu_small.QUERY_BLOCK)
    assert blocks >= 2 and cpu_small.SmallForward(call).items == 3 * 2 * blocks


def test_query_blocks_give_the_same_bytes_on_any_thread_count():
    """Blocks come from the shared queue longest first; which thread takes one never changes it."""
    q, k, v = H.random_qkv(22, batch=(2,), Hq=9, Hkv=3, Lq=100, D=64)
    call = semantics.normalize(q, k, v, causal=True)
    assert cpu_small.SmallForward(call).items == 2 * 3 * 4
    serial = cpu_small.forward(call, threads=1)
    for threads in (2, 5):
        for a, b in zip(cpu_small.forward(call, threads=threads), serial, strict=True):
            H.assert_bitwise_equal(a, b)


def test_calls_that_hide_no_later_key_keep_one_block():
    """Without causal or a right window every row reads every key: one item per (sequence, K/V head)."""
    q, k, v = H.random_qkv(23, batch=(2,), Hq=6, Hkv=2, Lq=100, D=16)
    for options in (dict(), dict(window=(5, None))):
        assert cpu_small.SmallForward(semantics.normalize(q, k, v, **options)).items == 4


def test_nan_in_a_late_query_block_leaves_the_small_path():
    """A NaN score in the last block (taken first) stops the call: it reruns on the general
    path, which follows the NaN policy row by row."""
    q, k, v = H.random_qkv(24, batch=(1,), Hq=3, Hkv=1, Lq=80, D=16)
    q[0, 1, 75, 2] = np.nan
    call = semantics.normalize(q, k, v, causal=True)
    assert cpu_small.forward(call, threads=1) is None
    out = dotattn.attention(q, k, v, causal=True, implementation="cpu")
    expected = dotattn.attention(q, k, v, causal=True, implementation="numpy")
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(out[finite], expected[finite], rtol=2e-5, atol=2e-6)
