"""Ring and Ulysses attention on 1, 2, 3 and 4 gloo ranks equal one single-process call.

Every case runs forward and backward on all ranks of a group (``conftest.RankPool``, one per
world size, reused), and the unsharded output, LSE and gradients of q, k, v are compared with
:func:`dotattn.attention` on the full sequence in this process: float64 to ≤ 1e-10 (the
dropout mask included — any differing bit would be an O(1) error), float32 by the 2×
naive-error rule.  Then the messages each rank sends (counted by wrapping ``isend``/``irecv``)
against the formula of ``docs/distributed.md``, the bytes each rank allocates (``tracemalloc``)
against its memory accounting, and the faults: bad input on one rank, ranks
that disagree, a rank that never joins and one that dies inside the ring — every rank must
raise a clear error within the group's timeout.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import dotattn
import dotattn.distributed as dd

import helpers as H

_spec = importlib.util.spec_from_file_location("ring_worker", Path(__file__).with_name("ring_worker.py"))
W = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(W)

SLOPES = [0.5, 0.25, 0.125, 0.0625]
SLOPES24 = [2.0 ** -(1 + h / 3) for h in range(24)]

CASES = {
    "dense": dict(),
    "causal-zigzag": dict(causal=True),
    "causal-contiguous": dict(causal=True, sharding="contiguous"),
    "causal-top-left": dict(causal="top_left"),
    "window": dict(window=(5, 2)),
    "window-causal-contiguous": dict(window=(7, None), causal=True, sharding="contiguous"),
    "gqa-causal": dict(Hq=4, Hkv=1, causal=True),
    "segments-causal": dict(segments=True, causal=True),
    "alibi-causal": dict(alibi_slopes=SLOPES, causal=True),
    "softcap": dict(softcap=1.5, causal=True),
    "dropout-causal": dict(dropout_p=0.25, seed=11, causal=True),
    "dropout-window-alibi": dict(dropout_p=0.4, seed=2**40 + 3, window=(4, 4), alibi_slopes=SLOPES),
    # a window side of 2n or more for a shard of n positions: normalize() clamped it to unbounded
    # with the shard's lengths (wrong for P ≥ 3 here), and uneven shards disagreed about it
    "window-wider-than-a-shard": dict(L=12, window=(9, 0), causal=True),
    "window-wider-than-a-shard-contiguous": dict(L=9, window=(8, 0), sharding="contiguous"),
    "ulysses-window-wider-than-a-shard": dict(fn="ulysses", Hq=24, Hkv=12, L=12, window=(9, 0), causal=True),
    "uneven-causal": dict(L=29, causal=True),  # not a multiple of 2P for P = 2, 3, 4
    "shorter-than-2P": dict(L=5, causal=True),  # some chunks empty (P = 3, 4)
    "blhd-causal": dict(layout="blhd", causal=True, dropout_p=0.1, seed=3),
    # 24 query / 12 K/V heads: GQA that divides over 2, 3 and 4 ranks
    "ulysses-causal-dropout": dict(fn="ulysses", Hq=24, Hkv=12, causal=True, dropout_p=0.2, seed=5,
                                   alibi_slopes=SLOPES24, L=27),
    "ulysses-segments-window": dict(fn="ulysses", Hq=24, Hkv=12, segments=True, window=(3, 6), sharding="contiguous"),
    # a per-call budget under which a zigzag rank's two query chunks (4 and 3 rows at P = 2)
    # split the K/V heads differently: their dK/dV parts collided (a shape error; at the
    # default budget, L 4,097 with D 128)
    "zigzag-uneven-head-groups": dict(Hq=2, Hkv=2, L=13, block_bytes=384),
}
WORLDS = (2, 3, 4)


def _single_process(case: dict, implementation=None):
    """The full-sequence call in this process: (out, lse, dq, dk, dv) as NumPy, caller layout."""
    case = dict(case)
    for key in ("fn", "sharding", "count", "expect_error", "block_bytes"):
        case.pop(key, None)
    sizes = {k: case.pop(k) for k in ("B", "Hq", "Hkv", "L", "D", "Dv") if k in case}
    dims = dict(B=1, Hq=4, Hkv=2, L=24, D=8, Dv=8) | sizes
    dtype = np.dtype(case.pop("dtype", "float64"))
    layout = case.pop("layout", "bhld")
    data_seed = case.pop("data_seed", 0)
    q, k, v, dout = W.make_inputs(data_seed, dims["B"], dims["Hq"], dims["Hkv"], dims["L"], dims["D"], dims["Dv"], dtype)
    if case.pop("segments", False):
        case["segment_ids"] = np.sort(np.random.default_rng(data_seed + 1).integers(0, 3, (dims["B"], dims["L"])))
    if case.get("alibi_slopes") is not None:
        case["alibi_slopes"] = np.asarray(case["alibi_slopes"])
    if layout == "blhd":
        q, k, v, dout = (np.ascontiguousarray(np.swapaxes(x, 1, 2)) for x in (q, k, v, dout))
    return (q, k, v, dout), dict(case, layout=layout)


def _torch_call(q, k, v, dout, options, implementation):
    tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
    out, lse = dotattn.attention(tq, tk, tv, return_lse=True, implementation=implementation, **options)
    out.backward(torch.from_numpy(dout))
    return dict(out=out.detach().numpy(), lse=lse.detach().numpy(), dq=tq.grad.numpy(), dk=tk.grad.numpy(),
                dv=tv.grad.numpy())


def _unshard(results, case):
    sharding = case.get("sharding", "zigzag")
    seq = -2 if case.get("layout", "bhld") == "bhld" else -3
    return {n: dd.unshard([r[n] for r in results], sharding, dim=-1 if n == "lse" else seq)
            for n in ("out", "lse", "dq", "dk", "dv")}


def _assert_float64_equal(ours, ref, label):
    for name in ("out", "lse", "dq", "dk", "dv"):
        a, b = ours[name], ref[name]
        assert a.shape == b.shape, f"{label} {name}: shape {a.shape} vs {b.shape}"
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b), err_msg=f"{label} {name}: -inf rows")
        fin = np.isfinite(b)
        err = float(np.abs(a[fin] - b[fin]).max(initial=0.0))
        assert err <= 1e-10, f"{label} {name}: max |ring − single| = {err:.3g}"


def check_float64_cases(pool):
    """Every case equals the single-process call to ≤ 1e-10."""
    world = pool.world
    failures = []
    for label, case in CASES.items():
        inputs, options = _single_process(case)
        ref = _torch_call(*inputs, options, "numpy")
        results = pool.run("run", implementation="numpy", **case)
        try:
            _assert_float64_equal(_unshard(results, case), ref, f"P={world} {label}:")
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)


def check_every_backend(pool):
    """The ring's block calls through the Numba kernels and the float64 reference, not only NumPy."""
    for implementation in ("cpu", "reference"):
        _check_backend(pool, implementation)


def _check_backend(pool, implementation):
    case = dict(L=21, causal=True, dropout_p=0.3, seed=17, alibi_slopes=SLOPES, Hkv=1)
    inputs, options = _single_process(case)
    ref = _torch_call(*inputs, options, "numpy")
    results = pool.run("run", implementation=implementation, timeout=600, **case)  # may JIT-compile
    _assert_float64_equal(_unshard(results, case), ref, implementation)


def check_float32(pool):
    """float32 (and float16: K/V travel in float16, dK/dV in float32): within the 2× naive-error
    rule of tests/helpers.py."""
    for dtype in ("float32", "float16"):
        case = dict(dtype=dtype, L=40, causal=True, dropout_p=0.1, seed=8, alibi_slopes=SLOPES)
        (q, k, v, dout), options = _single_process(case)
        ours = _unshard(pool.run("run", implementation="numpy", **case), case)
        ref_out, ref_lse = H.reference(q, k, v, **options)
        naive_out, naive_lse = H.naive(q, k, v, **options)
        H.assert_close_to_reference(ours["out"], ref_out, naive_out, name=f"{dtype} out")
        H.assert_close_to_reference(ours["lse"], ref_lse, naive_lse, name=f"{dtype} lse", dtype=np.dtype(dtype))
        ref_g = H.reference_grads(q, k, v, dout, **options)
        naive_g = H.naive_grads(q, k, v, dout, **options)
        for name, r, n in zip(("dq", "dk", "dv"), ref_g, naive_g):
            H.assert_close_to_reference(ours[name], r, n, name=f"{dtype} {name}", magnitude=float(np.abs(dout).max()))


def check_messages(pool):
    """Number, size, dtype and tag of every isend/irecv of one forward and one backward."""
    world = pool.world
    B, Hkv, D, Dv, L = 2, 2, 8, 6, 31  # uneven shards: the sizes differ per step
    case = dict(B=B, Hq=4, Hkv=Hkv, D=D, Dv=Dv, L=L, causal=True, dtype="float32", count=True)
    results = pool.run("run", implementation="numpy", **case)
    lengths = [sum(b - a for a, b in r) for r in dd.shard_bounds(L, world, "zigzag")]
    for rank, res in enumerate(results):
        want = dd.ring_message_sizes(lengths, B, Hkv, D, Dv, rank)
        fwd, bwd = res["messages"]["forward"], res["messages"]["backward"]
        kv_tags = [0, 2] * (world - 1)  # K then V at every hop
        kv_sends = [("send", n, "torch.float32", tag) for n, tag in zip(want["forward"], kv_tags)]
        # K/V received at step t: the shard of rank (rank − t − 1) mod P, K then V
        kv_recvs = [("recv", B * Hkv * lengths[(rank - t - 1) % world] * d, "torch.float32", tag)
                    for t in range(world - 1) for d, tag in ((D, 0), (Dv, 2))]
        assert [m for m in fwd if m[0] == "send"] == kv_sends
        assert [m for m in fwd if m[0] == "recv"] == kv_recvs
        assert want["backward_kv"] == want["forward"]
        assert [m for m in bwd if m[0] == "send" and m[3] != 1] == kv_sends
        assert [m for m in bwd if m[0] == "recv" and m[3] != 1] == kv_recvs
        assert [m for m in bwd if m[0] == "send" and m[3] == 1] == [("send", n, "torch.float32", 1) for n in want["backward_dkv"]]
        # dK/dV received: the shard held at steps 1…P−1, then this rank's own coming home
        dkv_in = [B * Hkv * lengths[(rank - t) % world] * (D + Dv) for t in range(1, world + 1)]
        assert [m for m in bwd if m[0] == "recv" and m[3] == 1] == [("recv", n, "torch.float32", 1) for n in dkv_in]
        assert len(fwd) == 4 * (world - 1) and len(bwd) == 4 * (world - 1) + 2 * world


def check_memory(pool):
    """Per-rank memory of a forward and a backward (bytes allocated, counted by ``tracemalloc``
    on every rank: deterministic, not timed) within the accounting of docs/distributed.md —
    output/dq, two K/V (one at P = 2) and two dK/dV message buffers, dK/dV parts held for half a step, one
    kernel call's own peak, merge tiles — the same bound for every number of ranks, i.e. no
    buffer per step.  And at least the message buffers: the count sees them."""
    world = pool.world
    B, Hq, Hkv, D, Dv, n = 1, 4, 2, 32, 32, 1024
    results = pool.run("memory", n=n, Hq=Hq, Hkv=Hkv, D=D, Dv=Dv)
    f4 = 4  # float32 inputs, float32 accumulation
    chunk = -(-n // 2)  # zigzag: two chunks per shard
    out = B * Hq * n * Dv * f4
    kv_message = B * Hkv * n * (D + Dv) * f4
    held = B * Hkv * chunk * (D + Dv) * f4  # dK/dV parts of one K chunk
    merge = 3 * min(dd._MERGE_TILE_BYTES, B * Hq * chunk * Dv * f4)
    slack = 64 * 1024  # Python objects of the call (plans, views, works)
    kv_buffers = min(2, world - 1)  # a rank's own K/V goes out of its own memory: P = 2 needs one
    for rank, r in enumerate(results):
        assert r["n"] == n
        fwd_bound = out + B * Hq * n * f4 + kv_buffers * kv_message + max(r["call_forward"], merge) + slack
        bwd_bound = out + kv_buffers * kv_message + 2 * kv_message + held + r["call_backward"] + slack  # dq, K/V, dK/dV
        assert out + kv_buffers * kv_message <= r["forward"] <= fwd_bound, (world, rank, r, fwd_bound)
        assert out + 2 * kv_message <= r["backward"] <= bwd_bound, (world, rank, r, bwd_bound)


def check_bad_input(pool):
    """Bad input on rank 1: it raises its own error, every other rank one that quotes it."""
    res = pool.run("bad_input", bad_rank=1, kind="shape")
    assert res[1]["type"] == "AttentionValueError" and "head dim" in res[1]["message"]
    for r in [r for r in range(pool.world) if r != 1]:
        assert res[r]["distributed"], res[r]
        assert "rank 1" in res[r]["message"] and "head dim" in res[r]["message"]


def check_review_faults(pool):
    """Shards of the wrong sizes are refused on every rank, naming the sizes; a k changed in place
    after the forward makes the backward raise torch's error (as single-process attention); bfloat16
    slopes give the float64 slopes' result and bfloat16 segment ids the integer-dtype error."""
    for found in pool.run("review", kind="lengths"):
        for name in ("ring_attention", "ulysses_attention"):
            assert found[name] is not None and found[name].startswith("AttentionValueError"), found
            assert "shards hold [5, 3] positions" in found[name] and "gives [4, 4]" in found[name], found
    for r in pool.run("review", kind="inplace"):
        assert r["type"] == "RuntimeError" and "modified by an inplace operation" in r["message"], r
    for r in pool.run("review", kind="bfloat16"):
        assert r["same"], r
        assert r["segment_error"].startswith("AttentionTypeError") and "segment_ids" in r["segment_error"], r
    # review of 7 Dec, afternoon: the returned out/LSE changed in place gave wrong gradients
    # silently (they are views of what the backward reads); one rank calling ring_attention and
    # another ulysses_attention waited for the group's timeout; equal NaN slopes "disagreed"
    for kind in ("inplace_out", "inplace_lse"):
        for r in pool.run("review", kind=kind):
            assert r["type"] == "RuntimeError" and "modified by an inplace operation" in r["message"], (kind, r)
    if pool.world > 1:
        for r in pool.run("review", kind="function_mix"):
            assert r["type"] == "AttentionValueError" and "disagree about function" in r["message"], r
    for r in pool.run("review", kind="nan_slopes"):
        assert r == dict(nan_head0=True, finite_head1=True), r


def check_disagreement(pool):
    """Ranks that pass different options all raise, naming the option."""
    res = pool.run("bad_input", bad_rank=0, kind="options")
    for r in res:
        assert r["type"] == "AttentionValueError" and "disagree about causal" in r["message"], r


def check_missing_rank(pool):
    """A rank that never calls, or dies after agreeing, leaves the others a clear error after the
    group's timeout (3 s here), never a hang.  In the second case the failing rank also gets
    the case 4 s after the others — longer than the timeout, as a loaded machine can make it:
    the ranks meet before the short timeout starts, so the fault is still the one reached."""
    for stage in ("join", "ring"):
        _check_missing_rank(pool, stage)


def _check_missing_rank(pool, stage):
    late = dict(late_rank=1, late_s=4.0) if stage == "ring" else {}
    res = pool.run("missing_rank", absent_rank=1, group_timeout=3, stage=stage, timeout=90, **late)
    assert res[0]["distributed"], res[0]
    assert "did not" in res[0]["message"] and "timeout" in res[0]["message"]
    assert res[0]["seconds"] < 45
    if stage == "ring":
        assert "simulated failure" in res[1]["message"]


def check_ulysses_head_rule(pool):
    """Ulysses with Hkv not divisible by P says why and points to the ring."""
    res = pool.run("run", fn="ulysses", Hq=4, Hkv=1, expect_error=True)
    for r in res:
        assert r["type"] == "AttentionValueError", r
        assert "k/v has 1 heads, not a multiple of 2" in r["message"] and "ring_attention" in r["message"]


# One test per world size runs its checks on one group: the group's start-up (P processes
# importing torch) is paid once per world size, and each check still reports on its own.
CHECKS = {
    1: [check_float64_cases],  # a one-rank group: no messages at all (gloo cannot send to itself)
    2: [check_float64_cases, check_every_backend, check_float32, check_memory, check_review_faults, check_disagreement,
        check_ulysses_head_rule, check_missing_rank],  # last: it leaves a timed-out subgroup behind
    3: [check_float64_cases, check_float32, check_messages, check_memory, check_bad_input],
    4: [check_float64_cases, check_messages, check_memory],
}


@pytest.mark.heavy
@pytest.mark.parametrize("world", sorted(CHECKS))
def test_ring_and_ulysses_on_a_group(rank_pool, world):
    pool = rank_pool(world)
    failures = []
    for check in CHECKS[world]:
        try:
            check(pool)
        except AssertionError as exc:
            failures.append(f"{check.__name__} (P={world}): {exc}")
            if pool.broken:  # a rank hung or died: the rest cannot run on this group
                break
    assert not failures, "\n\n".join(failures)


# ---- no process group needed --------------------------------------------------------------


@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
@pytest.mark.parametrize("L,P", [(16, 2), (29, 3), (5, 4), (0, 2), (7, 1)])
def test_shard_unshard_round_trip(sharding, L, P):
    x = np.arange(2 * L * 3).reshape(2, L, 3)
    shards = [dd.shard(x, r, P, sharding, dim=1) for r in range(P)]
    np.testing.assert_array_equal(dd.unshard(shards, sharding, dim=1), x)
    lengths = [s.shape[1] for s in shards]
    assert max(lengths) - min(lengths) <= (2 if sharding == "zigzag" else 1)
    t = torch.from_numpy(x)
    assert torch.equal(dd.unshard([dd.shard(t, r, P, sharding, dim=1) for r in range(P)], sharding, dim=1), t)


def test_zigzag_pairs_chunk_r_with_its_mirror():
    assert dd.shard_bounds(16, 2, "zigzag") == [[(0, 4), (12, 16)], [(4, 8), (8, 12)]]
    assert dd.shard_bounds(10, 2, "zigzag") == [[(0, 3), (8, 10)], [(3, 6), (6, 8)]]


def test_shard_bounds_refuses_a_length_that_is_not_a_count():
    """shard_bounds(-1, 2) gave ranges ending at −1 and shard_bounds(4.5, 2) odd float bounds."""
    with pytest.raises(dotattn.AttentionValueError, match="L must be ≥ 0"):
        dd.shard_bounds(-1, 2)
    with pytest.raises(dotattn.AttentionTypeError, match="L must be an int"):
        dd.shard_bounds(4.5, 2)
    assert dd.shard_bounds(np.int64(4), 2, "contiguous") == [[(0, 2)], [(2, 4)]]


def test_a_group_that_is_not_a_process_group_is_refused_by_name():
    """group="world" reached torch's get_world_size: AttributeError 'str' object has no attribute 'size'."""
    q = torch.zeros(1, 1, 4, 2)
    for fn in (dd.ring_attention, dd.ulysses_attention):
        with pytest.raises(dotattn.AttentionTypeError, match="group must be None .* ProcessGroup, got str"):
            fn(q, q, q, group="world")


def test_sharding_errors_name_the_argument():
    with pytest.raises(dotattn.AttentionValueError, match="sharding must be 'zigzag' or 'contiguous', got 'ring'"):
        dd.shard(np.zeros((4, 2)), 0, 2, "ring")
    with pytest.raises(dotattn.AttentionValueError, match="rank=2, world_size=2"):
        dd.shard(np.zeros((4, 2)), 2, 2)
    with pytest.raises(dotattn.AttentionValueError, match=r"shards\[0\] has 3 positions .* gives rank 0 2"):
        dd.unshard([np.zeros((3, 1)), np.zeros((1, 1))], "contiguous")


def test_without_a_process_group_the_error_says_what_to_do():
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover - the test process never joins a group
        pytest.fail("the test process must not be in a process group")
    q = torch.zeros(1, 1, 4, 2)
    with pytest.raises(dd.DistributedAttentionError, match="init_process_group"):
        dd.ring_attention(q, q, q)
