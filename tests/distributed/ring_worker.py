"""One rank of the distributed tests: joins a gloo group, then runs the cases the test sends.

Started by ``tests/distributed/conftest.py`` as ``python ring_worker.py RANK WORLD STORE_FILE
ADDRESS`` (a plain script: the test folder is no package, so ``multiprocessing`` spawn could
not import a target from it).  Cases arrive over a ``multiprocessing.connection`` to the
test process and results go back the same way; the worker exits when the connection closes,
so a failing test never leaves a rank behind.

Each case builds the full inputs from a seed (the same on every rank), takes this rank's
shard, runs ring or Ulysses attention forward and backward, and returns its shards of the
output, LSE and gradients; the test compares them, unsharded, with one single-process call.
"""

from __future__ import annotations

import os
import sys
import traceback
from datetime import timedelta
from multiprocessing.connection import Client

import numpy as np
import torch
import torch.distributed as dist

import dotattn.distributed as dd


def make_inputs(seed, B, Hq, Hkv, L, D, Dv, dtype):
    """Full q, k, v, dout (bhld), float64 NumPy → the case's dtype; the test process uses it too."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, Hq, L, D))
    k = rng.standard_normal((B, Hkv, L, D))
    v = rng.standard_normal((B, Hkv, L, Dv))
    dout = rng.standard_normal((B, Hq, L, Dv))
    return [x.astype(dtype) for x in (q, k, v, dout)]


def _counting():
    """Wrap dist.isend/irecv: the ring's messages, as (kind, elements, dtype, tag)."""
    log = []
    real_send, real_recv = dist.isend, dist.irecv

    def isend(tensor, *args, **kwargs):
        log.append(("send", tensor.numel(), str(tensor.dtype), kwargs.get("tag", 0)))
        return real_send(tensor, *args, **kwargs)

    def irecv(tensor, *args, **kwargs):
        log.append(("recv", tensor.numel(), str(tensor.dtype), kwargs.get("tag", 0)))
        return real_recv(tensor, *args, **kwargs)

    dist.isend, dist.irecv = isend, irecv
    return log, (real_send, real_recv)


def case_run(rank, world, *, fn="ring", data_seed=0, B=1, Hq=4, Hkv=2, L=24, D=8, Dv=8, dtype="float64",
             sharding="zigzag", layout="bhld", segments=False, count=False, group_timeout=None, expect_error=False,
             block_bytes=None, **options):
    if block_bytes is not None:  # the ring's per-call budget, small: its head groups on tiny shapes
        saved = dd._BLOCK_CALL_BYTES
        dd._BLOCK_CALL_BYTES = block_bytes
        try:
            return case_run(rank, world, fn=fn, data_seed=data_seed, B=B, Hq=Hq, Hkv=Hkv, L=L, D=D, Dv=Dv, dtype=dtype,
                            sharding=sharding, layout=layout, segments=segments, count=count,
                            group_timeout=group_timeout, expect_error=expect_error, **options)
        finally:
            dd._BLOCK_CALL_BYTES = saved
    if expect_error:
        try:
            case_run(rank, world, fn=fn, data_seed=data_seed, B=B, Hq=Hq, Hkv=Hkv, L=L, D=D, Dv=Dv, dtype=dtype,
                     sharding=sharding, layout=layout, segments=segments, **options)
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return dict(type=type(exc).__name__, message=str(exc))
        return dict(type=None)
    dtype = np.dtype(dtype)
    q, k, v, dout = make_inputs(data_seed, B, Hq, Hkv, L, D, Dv, dtype)
    if segments:
        options["segment_ids"] = dd.shard(np.sort(np.random.default_rng(data_seed + 1).integers(0, 3, (B, L))), rank,
                                          world, sharding, dim=-1)
    if options.get("alibi_slopes") is not None:
        options["alibi_slopes"] = np.asarray(options["alibi_slopes"])
    dim = -2 if layout == "bhld" else -3
    if layout == "blhd":
        q, k, v, dout = (np.ascontiguousarray(np.swapaxes(x, 1, 2)) for x in (q, k, v, dout))
    shards = [torch.from_numpy(np.ascontiguousarray(dd.shard(x, rank, world, sharding, dim=dim))) for x in (q, k, v)]
    for t in shards:
        t.requires_grad_(True)
    group = None
    if group_timeout is not None:
        group = _timed_group(world, group_timeout)
    call = dd.ring_attention if fn == "ring" else dd.ulysses_attention
    log = None
    if count:
        log, real = _counting()
    try:
        out, lse = call(*shards, group=group, sharding=sharding, layout=layout, return_lse=True, **options)
        n_fwd = len(log) if log is not None else 0
        out.backward(torch.from_numpy(np.ascontiguousarray(dd.shard(dout, rank, world, sharding, dim=dim))))
    finally:
        if log is not None:
            dist.isend, dist.irecv = real
    result = dict(out=out.detach().numpy(), lse=lse.numpy(), dq=shards[0].grad.numpy(),
                  dk=shards[1].grad.numpy(), dv=shards[2].grad.numpy())
    if log is not None:
        result["messages"] = dict(forward=log[:n_fwd], backward=log[n_fwd:])
    return result


def _timed_group(world, seconds):
    """A group whose short timeout is the fault under test, created by ranks that start together.

    The ranks first meet on the default group (generous timeout): a case reaches each rank
    at a different moment — on a loaded machine (load average 20 seen here) a rank can lag its
    peers by seconds — and the subgroup's connection setup and the call's agreement are
    bounded by the short timeout too, so without the meeting a late rank made the others
    time out before the fault was reached (the test then saw a timeout instead of the
    error it checks)."""
    dist.barrier()
    return dist.new_group(list(range(world)), timeout=timedelta(seconds=seconds))


def case_bad_input(rank, world, *, bad_rank=1, kind="shape", group_timeout=20):
    """Rank ``bad_rank`` passes k with the wrong head dim (``kind="shape"``) or another
    ``causal`` than the others (``"options"``); every rank reports what it raised."""
    group = _timed_group(world, group_timeout)
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    k = torch.randn(1, 2, 8, 5 if rank == bad_rank and kind == "shape" else 4, dtype=torch.float64)
    causal = rank == bad_rank and kind == "options"
    try:
        dd.ring_attention(q, k, q.clone(), group=group, causal=causal, implementation="numpy")
    except Exception as exc:  # noqa: BLE001 - the test inspects the type and message
        return dict(type=type(exc).__name__, message=str(exc), distributed=isinstance(exc, dd.DistributedAttentionError))
    return dict(type=None)


def case_review(rank, world, *, kind):
    """Faults a review found (7 Dec 2026), each reported by every rank.

    ``"lengths"``: shards of sizes other than the sharding gives (rank 0 one more, rank 1 one
    less) — the ring attended them as the sharding's sizes, Ulysses failed in NumPy.
    ``"inplace"``: k changed in place between forward and backward — the ring's backward re-read
    it and gave wrong gradients.  ``"bfloat16"``: bfloat16 slopes (refused by a bare TypeError
    from ``Tensor.numpy()``) against the same slopes in float64, and bfloat16 segment ids."""
    if kind == "lengths":
        n = 4 + (1 if rank == 0 else -1 if rank == 1 else 0)
        q = torch.randn(1, 2, n, 4, dtype=torch.float64)
        found = {}
        for fn in (dd.ring_attention, dd.ulysses_attention):
            try:
                fn(q, q, q, implementation="numpy")
                found[fn.__name__] = None
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                found[fn.__name__] = f"{type(exc).__name__}: {exc}"
        return found
    if kind == "function_mix":  # ring_attention here, ulysses_attention on the other ranks
        q = torch.randn(1, 2, 4, 4, dtype=torch.float64)
        fn = dd.ring_attention if rank == 0 else dd.ulysses_attention
        try:
            fn(q, q, q, group=_timed_group(world, 60), implementation="numpy")
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return dict(type=type(exc).__name__, message=str(exc))
        return dict(type=None)
    g = torch.Generator().manual_seed(rank)
    q, k, v = (torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=g).requires_grad_() for _ in range(3))
    if kind == "nan_slopes":  # the same NaN slopes on every rank: one option, as in one process
        with torch.no_grad():
            out = dd.ring_attention(q, k, v, alibi_slopes=torch.tensor([float("nan"), 0.5], dtype=torch.float64),
                                    implementation="numpy")
        return dict(nan_head0=bool(out[:, 0].isnan().all()), finite_head1=bool(out[:, 1].isfinite().all()))
    if kind in ("inplace_out", "inplace_lse"):  # the returned out or LSE changed before the backward
        out, lse = dd.ring_attention(q, k, v, causal=True, return_lse=True, implementation="numpy")
        with torch.no_grad():
            (out if kind == "inplace_out" else lse).mul_(2)
        try:
            out.sum().backward()
        except RuntimeError as exc:
            return dict(type=type(exc).__name__, message=str(exc))
        return dict(type=None)
    if kind == "inplace":
        k_in = k * 1
        out = dd.ring_attention(q, k_in, v, causal=True, implementation="numpy")
        with torch.no_grad():
            k_in.mul_(2)
        try:
            out.sum().backward()
        except RuntimeError as exc:
            return dict(type=type(exc).__name__, message=str(exc))
        return dict(type=None)
    slopes = torch.tensor([0.5, 0.25])
    with torch.no_grad():
        want = dd.ring_attention(q, k, v, causal=True, alibi_slopes=slopes.double(), implementation="numpy")
        got = dd.ring_attention(q, k, v, causal=True, alibi_slopes=slopes.bfloat16(), implementation="numpy")
        try:
            dd.ring_attention(q, k, v, segment_ids=torch.zeros(1, 4, dtype=torch.bfloat16), implementation="numpy")
            seg_error = None
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            seg_error = f"{type(exc).__name__}: {exc}"
    return dict(same=bool(torch.equal(want, got)), segment_error=seg_error)


def case_missing_rank(rank, world, *, absent_rank=1, group_timeout=3, stage="join", late_rank=None, late_s=0.0):
    """``absent_rank`` never joins (stage "join") or dies inside the ring (stage "ring"): the
    others must raise within the group's timeout instead of hanging.  ``late_rank`` gets the
    case ``late_s`` seconds after the others (as under heavy load)."""
    import time

    if rank == late_rank:
        time.sleep(late_s)
    group = _timed_group(world, group_timeout)
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    if rank == absent_rank and stage == "join":
        return dict(type="absent")
    real = dd._pack_kv
    if rank == absent_rank:  # dies after agreeing to the call, before sending its K/V
        def broken(*a, **kw):
            raise RuntimeError("simulated failure inside the ring")

        dd._pack_kv = broken
    start = time.monotonic()
    try:
        dd.ring_attention(q, q.clone(), q.clone(), group=group, implementation="numpy")
    except Exception as exc:  # noqa: BLE001
        return dict(type=type(exc).__name__, message=str(exc), seconds=time.monotonic() - start,
                    distributed=isinstance(exc, dd.DistributedAttentionError))
    finally:
        dd._pack_kv = real
    return dict(type=None, seconds=time.monotonic() - start)


def case_memory(rank, world, *, n=1024, Hq=4, Hkv=2, D=32, Dv=32, implementation="numpy"):
    """Bytes the ring allocates on this rank (``tracemalloc``: the ring's message buffers and
    the kernels' arrays are NumPy allocations), forward and backward, for shards of ``n``
    positions; plus the largest peak of any one kernel call, measured the same way.  The test
    compares them with the docs' accounting, whatever the number of ranks (steps)."""
    import tracemalloc

    from dotattn import api

    L = n * world
    q, k, v, dout = make_inputs(7, 1, Hq, Hkv, L, D, Dv, np.float32)
    q, k, v, dout = (torch.from_numpy(np.ascontiguousarray(dd.shard(x, rank, world))) for x in (q, k, v, dout))

    def once():
        ts = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = dd.ring_attention(*ts, causal=True, implementation=implementation)
        return ts, out

    ts, out = once()  # first calls (caches, imports) outside the measurement
    out.backward(dout)
    del ts, out
    state = dict(outer=0, calls={"forward": 0, "backward": 0})

    def measured(fn, kind):
        def wrapper(*a, **kw):
            cur, peak = tracemalloc.get_traced_memory()
            state["outer"] = max(state["outer"], peak)
            tracemalloc.reset_peak()
            try:
                return fn(*a, **kw)
            finally:
                _, peak = tracemalloc.get_traced_memory()
                state["calls"][kind] = max(state["calls"][kind], peak - cur)
                state["outer"] = max(state["outer"], peak)
                tracemalloc.reset_peak()
        return wrapper

    real = api.run_forward, api.run_backward
    api.run_forward, api.run_backward = measured(real[0], "forward"), measured(real[1], "backward")
    ts = [x.clone().requires_grad_(True) for x in (q, k, v)]
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = dd.ring_attention(*ts, causal=True, implementation=implementation)
        fwd = max(state["outer"], tracemalloc.get_traced_memory()[1]) - base
        tracemalloc.reset_peak()
        state["outer"] = 0
        before_bwd = tracemalloc.get_traced_memory()[0]
        out.backward(dout)
        bwd = max(state["outer"], tracemalloc.get_traced_memory()[1]) - before_bwd
    finally:
        tracemalloc.stop()
        api.run_forward, api.run_backward = real
    return dict(forward=fwd, backward=bwd, call_forward=state["calls"]["forward"],
                call_backward=state["calls"]["backward"], n=q.shape[-2])


CASES = {"run": case_run, "bad_input": case_bad_input, "review": case_review, "missing_rank": case_missing_rank,
         "memory": case_memory}


def main():
    rank, world, store_file, host, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    conn = Client((host, port), authkey=os.environ["DOTATTN_TEST_AUTHKEY"].encode())
    try:
        store = dist.FileStore(store_file, world)
        # The default group bounds every wait of the cases that pass no group_timeout: as long as
        # the test's own CASE_TIMEOUT (a hang still fails there), not less — under heavy load a
        # rank's start-up or first call of a backend can lag its peer's by more than a minute.
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=300))
        conn.send(("ready", rank))
        while True:
            try:
                msg = conn.recv()
            except EOFError:
                break
            if msg is None:
                break
            name, kwargs = msg
            try:
                conn.send(("ok", CASES[name](rank, world, **kwargs)))
            except Exception as exc:  # noqa: BLE001 - sent to the test, which fails with it
                conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()
        os._exit(0)  # no process-group teardown: a rank stuck in a timed-out group must not hang here


if __name__ == "__main__":
    main()
