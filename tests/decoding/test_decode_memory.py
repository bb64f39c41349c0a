"""Memory of a decode call: the cache is read in place, and nothing the size of the cache (or of
its capacity, or of a rotary table's positions) is allocated per call.

``attention_with_kvcache`` is bandwidth-bound: a call should read the caller's cache where it
lies — no widening of a 16-bit cache to float32, no gather of a paged cache into a contiguous
one, no ``repeat`` of K/V heads for GQA, no copy of a torch cache to NumPy.  NumPy's allocations
are seen by ``tracemalloc`` (in this process); the ``cpu`` kernels' own allocations (Numba's) and
torch's are not, so those calls are measured by the peak RSS of a child process, with a cache
large enough (≥ 128 MiB) that a copy of it stands far above the noise.  Margins are generous:
a copy of the cache is 100 % of it (a float32 widening of a 16-bit one 200 %), the limits here
are a few percent.  The ``reference`` implementation gathers the visible keys in float64 by
design (the test oracle) and is not measured.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from dotattn import KVCache, attention_with_kvcache, merge_attention_states
from dotattn.semantics import BFLOAT16

SRC = Path(__file__).resolve().parents[2] / "src"


def _traced_peak(fn) -> int:
    """Bytes NumPy (and Python) allocated at the peak of ``fn()``, beyond what was live before."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    del result
    return peak


def _rope_tables(positions: int, R: int, dtype=np.float64):
    """cos/sin tables as a model precomputes them for its whole context (np.cos gives float64)."""
    inv = 1.0 / (10000 ** (np.arange(R) / R))
    ang = np.arange(positions)[:, None] * inv[None, :]
    return np.cos(ang).astype(dtype), np.sin(ang).astype(dtype)


# =================================================================================
# rotary tables: the rows the call uses, not the table
# =================================================================================


@pytest.mark.parametrize("implementation", ["cpu", "numpy"])
@pytest.mark.parametrize("table", ["float64", "bfloat16", "float32-strided"])
def test_rotary_tables_are_not_converted_whole_per_call(implementation, table):
    """A rotary table of a dtype other than the compute dtype (float64 as ``np.cos`` gives it, a
    model's bfloat16 one) or not contiguous (a slice of a wider table) was converted whole to a
    contiguous float32 copy on every call (``decode_semantics._check_rotary``): a table precomputed
    for a model's context (131,072 positions × 64 for Llama 3: 64 MiB per table per call and
    layer) against a decode step that uses one row per sequence.  Only the rows the call rotates
    at (its query and new-key positions) are converted now."""
    positions, R = 1 << 16, 32  # 16 MiB per float64 table
    if table == "float32-strided":
        cos, sin = (x[:, :R] for x in _rope_tables(positions, 2 * R, np.float32))  # a slice: not contiguous
    elif table == "bfloat16":
        cos, sin = (x.astype(BFLOAT16) for x in _rope_tables(positions, R, np.float32))
    else:
        cos, sin = _rope_tables(positions, R)
    table_bytes = cos.shape[0] * R * 4 * 2  # what the old per-call float32 copies allocated
    B, Hkv, G, D, cap = 2, 2, 2, 2 * R, 512
    rng = np.random.default_rng(0)
    kc = rng.standard_normal((B, Hkv, cap, D)).astype(np.float16)
    vc = rng.standard_normal((B, Hkv, cap, D)).astype(np.float16)
    q = rng.standard_normal((B, Hkv * G, 1, D)).astype(np.float16)
    kn, vn = (rng.standard_normal((B, Hkv, 1, D)).astype(np.float16) for _ in range(2))
    lengths = np.array([300, 100], dtype=np.int64)

    def call():
        return attention_with_kvcache(q, kc, vc, kn, vn, cache_lengths=lengths, rotary=(cos, sin),
                                      implementation=implementation)

    call()  # (loads the kernels)
    peak = _traced_peak(call)
    # (the old copies: 100 % of table_bytes; the numpy kernel's chunk scratch here ≈ 2 %)
    assert peak < 0.05 * table_bytes, f"a rotary call allocated {peak} bytes; its table is {table_bytes}"


def test_rotary_rows_give_the_bits_of_float32_tables():
    """Rows converted after the gather are the same values as rows gathered from a whole float32
    copy: a float64 table gives the bits of its float32 rounding passed as float32 (cpu and numpy,
    contiguous and paged, the cache's keys written with the rotated k_new too)."""
    rng = np.random.default_rng(1)
    cos64, sin64 = _rope_tables(600, 8)
    cos32, sin32 = cos64.astype(np.float32), sin64.astype(np.float32)
    B, Hkv, G, D, cap = 2, 2, 3, 16, 64
    for implementation in ("cpu", "numpy"):
        for page_size in (None, 8):
            for Lnew in (1, 5):
                shape = (B, Hkv, cap, D) if page_size is None else (B * cap // page_size, Hkv, page_size, D)
                table = None if page_size is None else np.arange(B * cap // page_size).reshape(B, -1)
                base_k = rng.standard_normal(shape).astype(np.float16)
                base_v = rng.standard_normal(shape).astype(np.float16)
                q = rng.standard_normal((B, Hkv * G, Lnew, D)).astype(np.float32)
                kn, vn = (rng.standard_normal((B, Hkv, Lnew, D)).astype(np.float32) for _ in range(2))
                lengths = np.array([40, 13])
                results = []
                for cos, sin in ((cos64, sin64), (cos32, sin32)):
                    kc, vc = base_k.copy(), base_v.copy()
                    out, lse = attention_with_kvcache(
                        q, kc, vc, kn, vn, cache_lengths=lengths, block_table=table, rotary=(cos, sin),
                        return_lse=True, implementation=implementation,
                    )
                    results.append((out, lse, kc, vc))
                for a, b in zip(*results):
                    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("table_dtype", ["float64", "bfloat16"])
def test_rotary_tables_of_any_dtype_on_the_triton_path(monkeypatch, table_dtype):
    """The triton path (here Triton's interpreter on CPU tensors) is sent the tables' rows below
    the longest sequence in float32: a float64 or bfloat16 table (which the device copy cannot
    pack as it is) gives the bits of its float32 rounding, appended keys included."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    rng = np.random.default_rng(2)
    cos64, sin64 = _rope_tables(4096, 7)
    if table_dtype == "bfloat16":
        tables = tuple(torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16) for x in (cos64, sin64))
        tables32 = tuple(t.to(torch.float32) for t in tables)
    else:
        tables = tuple(torch.from_numpy(x) for x in (cos64, sin64))
        tables32 = tuple(t.to(torch.float32) for t in tables)
    B, Hkv, G, D, cap, Lnew = 2, 2, 2, 16, 40, 2
    base_k = torch.from_numpy(rng.standard_normal((B, Hkv, cap, D)).astype(np.float32))
    base_v = torch.from_numpy(rng.standard_normal((B, Hkv, cap, D)).astype(np.float32))
    q = torch.from_numpy(rng.standard_normal((B, Hkv * G, Lnew, D)).astype(np.float32))
    kn, vn = (torch.from_numpy(rng.standard_normal((B, Hkv, Lnew, D)).astype(np.float32)) for _ in range(2))
    results = []
    for rotary in (tables, tables32):
        kc, vc = base_k.clone(), base_v.clone()
        out, lse = attention_with_kvcache(q, kc, vc, kn, vn, cache_lengths=np.array([30, 7]), rotary=rotary,
                                          return_lse=True, implementation="triton")
        results.append((out, lse, kc, vc))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# =================================================================================
# merge_attention_states: the accumulator and the result, no copy of each part
# =================================================================================


def _merge_parts(dtype, P=4, shape=(2, 16, 1024, 128), layout="bhld"):
    rng = np.random.default_rng(5)
    outs = [rng.standard_normal(shape, dtype=np.float32).astype(dtype) for _ in range(P)]
    lse_shape = shape[:-1] if layout == "bhld" else shape[:-3] + (shape[-2], shape[-3])
    lses = [rng.standard_normal(lse_shape, dtype=np.float32) * 3 for _ in range(P)]
    return outs, lses


@pytest.mark.parametrize("dtype,limit", [(np.float16, 3.6), (BFLOAT16, 3.6), (np.float32, 1.4)])
def test_merge_numpy_peak_is_the_accumulator_and_the_result(dtype, limit):
    """merge_attention_states of NumPy parts allocates the float32 accumulator and the result in
    the parts' dtype (3 parts' worth for 16-bit parts, 1 for float32) and small blocks — not a
    float32 copy of every part plus a full-size product buffer beside them (8.3 parts' worth for
    16-bit parts, 2.15 for float32, until 6 Dec 2026)."""
    outs, lses = _merge_parts(dtype, shape=(2, 16, 1024, 128))  # 8 MiB 16-bit parts
    part = outs[0].nbytes
    merge_attention_states(outs, lses)
    peak = _traced_peak(lambda: merge_attention_states(outs, lses))
    assert peak < limit * part, f"merging {len(outs)} parts of {part} bytes peaked at {peak / part:.2f} parts"


@pytest.mark.parametrize("dtype", [np.float16, BFLOAT16, np.float32])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_merge_numpy_blocks_give_the_bits_of_whole_arrays(dtype, layout):
    """The blocked merge gives the bits of the whole-array formula it replaced (parts converted to
    the accumulator dtype, weighted, summed in part order), strided parts and a part whose weight
    underflows on some rows included."""
    outs, lses = _merge_parts(dtype, P=3, shape=(3, 40, 24, 72), layout=layout)
    outs[1] = np.ascontiguousarray(np.swapaxes(outs[1], 0, 1)).swapaxes(0, 1)  # strided
    lses[2][0] = -200.0  # its rows weigh exp(-200 - m): 0 in float32
    got_out, got_lse = merge_attention_states(outs, lses, layout=layout)
    # the formula, whole arrays at a time
    lse = np.stack(lses)
    m = lse.max(axis=0)
    w = np.exp(lse - m)
    total = w.sum(axis=0)
    scale = w / total
    want = np.zeros(outs[0].shape, np.float32)
    for part, wi in zip(outs, scale):
        wi = (wi if layout == "bhld" else wi.swapaxes(-1, -2))[..., None]
        want += np.where(wi != 0, wi * part.astype(np.float32), 0.0)
    np.testing.assert_array_equal(got_lse, (m + np.log(total)).astype(np.float32))
    np.testing.assert_array_equal(got_out, want.astype(dtype))


# =================================================================================
# peaks measured in a child process (Numba's and torch's allocations)
# =================================================================================

_CHILD_PRELUDE = """
import gc, json, re, sys
import numpy as np

def _status(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024

def peak_of(fn):
    '''Bytes the resident set rose above its level before fn() at its highest (VmHWM reset first).'''
    gc.collect()
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark back to the current RSS
    result = fn()
    peak = _status("VmHWM") - base
    del result
    return peak
"""


def _child_peaks(body: str, timeout: float = 60, setup: str = "", env: dict | None = None) -> dict:
    """Run ``body`` (after :data:`_CHILD_PRELUDE` and ``setup``) in a fresh interpreter; it prints
    one JSON dict."""
    if not (os.path.exists("/proc/self/clear_refs") and os.access("/proc/self/clear_refs", os.W_OK)):
        pytest.skip("needs /proc/self/clear_refs to reset the peak RSS (Linux)")
    env = dict(os.environ, **(env or {}), PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = _CHILD_PRELUDE + textwrap.dedent(setup) + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_merge_torch_without_autograd_peak_is_the_accumulator_and_the_result():
    """merge_attention_states of torch CPU parts under no_grad: the float32 accumulator and the
    result (3 parts' worth for float16 parts, 1 for float32) — the graph-building sum, which
    converted each part and made four full-size temporaries per part, peaked at 10 and 4.75."""
    pytest.importorskip("torch")
    got = _child_peaks("""
        import torch
        from dotattn import merge_attention_states
        torch.manual_seed(0)
        res = {}
        for name, dtype in (("float16", torch.float16), ("float32", torch.float32)):
            outs = [torch.full((2, 16, 1024, 256), 0.5 + i, dtype=dtype) for i in range(4)]  # 16 MiB float16
            lses = [torch.rand(2, 16, 1024) for _ in range(4)]
            with torch.no_grad():
                merge_attention_states(outs, lses)
                res[name] = peak_of(lambda: merge_attention_states(outs, lses)) / (outs[0].numel() * outs[0].element_size())
            del outs, lses
        print(json.dumps(res))
    """)
    assert got["float16"] < 3.6, got
    assert got["float32"] < 1.4, got


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_merge_torch_in_place_gives_the_bits_of_the_autograd_sum(dtype, layout):
    """The in-place sum (CPU tensors, no autograd) gives the bits of the graph-building one,
    strided parts and underflowed weights included."""
    torch = pytest.importorskip("torch")
    outs, lses = _merge_parts(np.float32, P=3, shape=(3, 40, 24, 72), layout=layout)
    lses[2][0] = -200.0
    outs = [torch.from_numpy(x).to(getattr(torch, dtype)) for x in outs]
    outs[1] = outs[1].transpose(0, 1).contiguous().transpose(0, 1)  # strided
    lses = [torch.from_numpy(x) for x in lses]
    with torch.no_grad():
        got_out, got_lse = merge_attention_states(outs, lses, layout=layout)
    grad_outs = [x.clone().requires_grad_(True) for x in outs]
    want_out, want_lse = merge_attention_states(grad_outs, lses, layout=layout)
    assert got_out.dtype == want_out.dtype
    torch.testing.assert_close(got_out, want_out.detach(), rtol=0, atol=0)
    torch.testing.assert_close(got_lse, want_lse.detach(), rtol=0, atol=0)


# =================================================================================
# decode calls read the cache in place (pinned)
# =================================================================================

_DECODE_CASES_CHILD = """
from dotattn import attention_with_kvcache
from dotattn.semantics import BFLOAT16

def case(dtype, q_dtype=None, B=1, Hkv=4, G=4, D=64, cap=1 << 17, page=None, Lnew=1, layout="bhld",
         combined=False, readonly=False, options=False, torch_tensors=False, implementation="cpu"):
    rng = np.random.default_rng(0)
    dt = BFLOAT16 if dtype == "bfloat16" else np.dtype(dtype)
    qdt = dt if q_dtype is None else np.dtype(q_dtype)
    if page:
        n_pages = B * cap // page
        shape = (n_pages, Hkv, page, D) if layout == "bhld" else (n_pages, page, Hkv, D)
        table = rng.permutation(n_pages).reshape(B, -1)
    else:
        shape = (B, Hkv, cap, D) if layout == "bhld" else (B, cap, Hkv, D)
        table = None
    if combined:  # the two halves of one (…, 2, Hkv, D) buffer: strided caches
        both = np.full(shape[:2] + (2,) + shape[2:], 0.5, dtype=dt)
        kc, vc = both[:, :, 0], both[:, :, 1]
    else:
        kc, vc = np.full(shape, 0.5, dtype=dt), np.full(shape, 0.25, dtype=dt)
    cache_bytes = kc.nbytes + vc.nbytes
    if readonly:
        kc.flags.writeable = vc.flags.writeable = False
    def arr(h, n):
        s = (B, h, n, D) if layout == "bhld" else (B, n, h, D)
        return rng.standard_normal(s, dtype=np.float32).astype(qdt)
    q = arr(Hkv * G, max(Lnew, 1))
    kn, vn = (arr(Hkv, Lnew), arr(Hkv, Lnew)) if Lnew else (None, None)
    kw = {}
    if options:
        R = D // 2
        ang = np.arange(cap)[:, None] * (1.0 / 10000 ** (np.arange(R) / R))[None]
        kw = dict(rotary=(np.cos(ang), np.sin(ang)), window=(5000, None), softcap=30.0,
                  alibi_slopes=np.full((B, Hkv * G), 0.01))
    if torch_tensors:
        import torch
        def t(x):
            return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16) if x.dtype == BFLOAT16 else torch.from_numpy(x)
        q, kc, vc = t(q), t(kc), t(vc)
        kn, vn = (None, None) if kn is None else (t(kn), t(vn))
    lengths = np.full(B, cap - 64, dtype=np.int64)
    def call():
        return attention_with_kvcache(q, kc, vc, kn, vn, cache_lengths=lengths, block_table=table,
                                      layout=layout, implementation=implementation, **kw)
    for _ in range(3):  # (the first calls load the kernels' entries: their code, not data)
        call()
    peak = peak_of(call)
    return peak / cache_bytes
"""


def test_cpu_decode_reads_numpy_caches_in_place():
    """The ``cpu`` kernels' calls on 128 MiB caches raise the resident set by < 3 % of the cache:
    no widening of a 16-bit cache (200 %), no gather of a paged one, no copy of a strided or
    read-only one, no K/V heads repeated for GQA (G = 4) — contiguous and paged, float16,
    bfloat16 under a float32 q, float32; one new token and several; ALiBi, softcap, a window and
    rotary (float64 tables).  (Measured 6 Dec 2026: 0.00–0.01 % each.)"""
    got = _child_peaks("""
        res = {
            "f16": case("float16"),
            "bf16-q32-paged-Lnew4": case("bfloat16", "float32", page=256, Lnew=4),
            "f16-blhd-paged16-options": case("float16", page=16, layout="blhd", Lnew=2, options=True),
            "f32-readonly-noappend": case("float32", cap=1 << 16, Lnew=0, readonly=True),
            "f16-combined-blhd": case("float16", layout="blhd", combined=True),
        }
        print(json.dumps(res))
    """, timeout=120, setup=_DECODE_CASES_CHILD)
    assert all(v < 0.03 for v in got.values()), got


def test_cpu_decode_reads_torch_caches_in_place():
    """Torch CPU tensors are read through NumPy views of their memory: a bfloat16 cache (viewed
    through int16) or a float16 paged one raises the resident set by < 3 % of it (a copy to NumPy
    would be 100 %, a float32 widening 200 %), on the cpu kernel and on the numpy one."""
    pytest.importorskip("torch")
    got = _child_peaks("""
        res = {
            "bf16": case("bfloat16", torch_tensors=True),
            "bf16-q32": case("bfloat16", "float32", torch_tensors=True),
            "f16-paged-Lnew2": case("float16", page=64, Lnew=2, torch_tensors=True),
            "bf16-numpy-kernel": case("bfloat16", cap=1 << 16, torch_tensors=True, implementation="numpy"),
        }
        print(json.dumps(res))
    """, timeout=120, setup=_DECODE_CASES_CHILD)
    assert all(v < 0.03 for v in got.values()), got


@pytest.mark.heavy
def test_many_query_rows_keep_their_chunk_partials_about_the_cache_size():
    """A chunked prefill through the decode kernels (Lq 64, 16 query heads a K/V head: 1,024
    folded rows) kept one partial output per 256-key chunk and row: 4.2 × a float16 cache on the
    cpu kernel, 5 × on the numpy one (32k keys; measured 6 Dec 2026).  Rows now go through in
    blocks of ROWS_PER_PASS (256): ≈ the cache's size for a 16-bit cache (1.08 × cpu, 1.29 ×
    numpy at 32k keys), half of it for float32.  (Nothing kept between calls — neither by the workspace nor
    by malloc, whose threshold rises past freed 32 MiB blocks — so each call's parts show.)"""
    got = _child_peaks("""
        res = {
            "cpu-f16": case("float16", cap=1 << 14, Lnew=64, G=16),
            "cpu-f32": case("float32", cap=1 << 13, Lnew=64, G=16),
            "cpu-bf16-q32-paged": case("bfloat16", "float32", cap=1 << 14, Lnew=64, G=16, page=64),
            "numpy-f16": case("float16", cap=1 << 13, Lnew=64, G=16, implementation="numpy"),
        }
        print(json.dumps(res))
    """, timeout=240, setup=_DECODE_CASES_CHILD, env={"DOTATTN_CPU_WORKSPACE_MB": "0", "MALLOC_MMAP_THRESHOLD_": "65536"})
    # (numpy: its fixed scratch — the rotated q, the output, a chunk's scores — on top, 1.8 × of
    # this 8 MiB cache against 6.8 × before)
    assert got["cpu-f16"] < 1.4 and got["cpu-bf16-q32-paged"] < 1.4 and got["numpy-f16"] < 2.4, got
    assert got["cpu-f32"] < 0.8, got


@pytest.mark.parametrize("page_size", [None, 4, 64])
@pytest.mark.parametrize("q_dtype", [np.float16, np.float32])
def test_numpy_decode_allocates_chunks_not_the_cache(page_size, q_dtype):
    """The ``numpy`` implementation converts one 256-key chunk at a time into fixed scratch (tiny
    pages: a chunk's gather), and keeps one partial output per chunk: a one-token call over a
    16 MiB float16 cache allocates < 10 % of it (measured 6 Dec 2026: ≈ 4 %)."""
    rng = np.random.default_rng(0)
    B, Hkv, G, D, cap = 1, 4, 4, 64, 1 << 14
    if page_size:
        shape, table = (cap // page_size, Hkv, page_size, D), rng.permutation(cap // page_size)[None]
    else:
        shape, table = (B, Hkv, cap, D), None
    kc, vc = np.full(shape, 0.5, np.float16), np.full(shape, 0.25, np.float16)
    q = rng.standard_normal((B, Hkv * G, 1, D)).astype(q_dtype)
    kn, vn = (rng.standard_normal((B, Hkv, 1, D)).astype(q_dtype) for _ in range(2))

    def call():
        return attention_with_kvcache(q, kc, vc, kn, vn, cache_lengths=[cap - 8], block_table=table,
                                      implementation="numpy")

    call()
    peak, cache_bytes = _traced_peak(call), kc.nbytes + vc.nbytes
    assert peak < 0.10 * cache_bytes, f"{peak} bytes over a {cache_bytes}-byte cache"


def test_kvcache_attend_allocates_nothing_the_size_of_its_buffers():
    """A step of a 2-layer torch bfloat16 KVCache (paged) and of a NumPy float16 one: attend and
    append allocate < 3 % of the buffers (no per-call views re-made as copies, no growth)."""
    pytest.importorskip("torch")
    got = _child_peaks("""
        import torch
        from dotattn import KVCache
        res = {}
        for lib, dtype, page in (("torch", "bfloat16", 256), ("numpy", "float16", None)):
            cache = KVCache(1, 4, 64, 1 << 16, num_layers=2, dtype=dtype, page_size=page, library=lib)
            rng = np.random.default_rng(0)
            def arr(h, n, value=None):
                x = rng.standard_normal((1, h, n, 64), dtype=np.float32) if value is None else np.full((1, h, n, 64), value, np.float32)
                return torch.from_numpy(x).to(getattr(torch, dtype)) if lib == "torch" else x.astype(dtype)
            prompt = arr(4, (1 << 16) - 64, 0.5)
            for layer in range(2):
                cache.append(prompt, prompt, layer=layer)
            del prompt
            buffers = 2 * (cache.k.numel() * cache.k.element_size() if lib == "torch" else cache.k.nbytes)
            q, kn, vn = arr(16, 1), arr(4, 1), arr(4, 1)
            def step():
                for layer in range(2):
                    cache.attend(q, kn, vn, layer=layer)
                for layer in range(2):
                    cache.append(kn, vn, layer=layer)
            for _ in range(3):  # (the first calls load the kernels' entries: their code, not data)
                step()
            res[lib] = peak_of(step) / buffers
            del cache
        print(json.dumps(res))
    """, timeout=120)
    assert all(v < 0.03 for v in got.values()), got


# =================================================================================
# the page table's check: a flag per pool page, not Python ints per used page
# =================================================================================


@pytest.mark.parametrize("B", [1, 32])
def test_page_table_check_allocates_little_per_page(B):
    """attention_with_kvcache validates a paged cache's block table on every call; with small
    pages (any page size ≥ 1 is documented) a long sequence uses many pages, and the check built a
    Python list and set of every page in use (≈ 84 bytes a page: 34 % of a one-K/V-head float16
    cache with 1-token pages of head dim 64, 256 bytes a page) or, past 16 sequences, a masked
    copy and a sorted copy (18 bytes a page).  Now a flag per pool page and one sequence's pages
    at a time: < 4 % of such a cache (measured ≈ 1 %)."""
    rng = np.random.default_rng(0)
    n_pages, D = 1 << 17, 64
    per_seq = n_pages // B
    kc = np.full((n_pages, 1, 1, D), 0.5, np.float16)
    vc = np.full((n_pages, 1, 1, D), 0.25, np.float16)
    table = rng.permutation(n_pages).reshape(B, per_seq)
    # (G = 2: the cpu kernel's chunk parts, 2 rows × 64 float32 a chunk, are 0.8 % of this
    # cache — kept between calls, or fresh where the workspace is full)
    q = rng.standard_normal((B, 2, 1, D)).astype(np.float16)
    kn, vn = (rng.standard_normal((B, 1, 1, D)).astype(np.float16) for _ in range(2))
    lengths = np.full(B, per_seq - 1)

    def call():
        return attention_with_kvcache(q, kc, vc, kn, vn, cache_lengths=lengths, block_table=table,
                                      implementation="cpu")

    call()
    peak, cache_bytes = _traced_peak(call), kc.nbytes + vc.nbytes
    assert peak < 0.04 * cache_bytes, f"{peak} bytes over a {cache_bytes}-byte cache"


@pytest.mark.parametrize("fault", ["repeat-within", "repeat-across", "outside", "negative"])
def test_page_table_check_of_many_pages_still_refuses_bad_tables(fault):
    """The flag-per-page check (more than 1,024 pages in use) refuses what the masks report: a
    page repeated within a sequence or across two, a page outside the pool, −1 in use."""
    from dotattn import AttentionValueError

    rng = np.random.default_rng(1)
    B, per_seq, D = 2, 1500, 8
    n_pages = B * per_seq + 10
    kc = np.zeros((n_pages, 1, 1, D), np.float32)
    table = rng.permutation(n_pages)[: B * per_seq].reshape(B, per_seq)
    if fault == "repeat-within":
        table[1, 1200] = table[1, 3]
    elif fault == "repeat-across":
        table[1, 1400] = table[0, 1100]
    elif fault == "outside":
        table[0, 1300] = n_pages
    else:
        table[1, 1499] = -1
    q = np.zeros((B, 1, 1, D), np.float32)
    match = "repeats page" if fault.startswith("repeat") else "outside the page pool"
    with pytest.raises(AttentionValueError, match=match):
        attention_with_kvcache(q, kc, kc.copy(), cache_lengths=[per_seq, per_seq], block_table=table)
    table_ok = rng.permutation(n_pages)[: B * per_seq].reshape(B, per_seq)
    attention_with_kvcache(q, kc, kc.copy(), cache_lengths=[per_seq, per_seq], block_table=table_ok)


# =================================================================================
# nothing per slot of capacity: a long block table, a short sequence
# =================================================================================


@pytest.mark.parametrize("implementation", ["cpu", "numpy"])
@pytest.mark.parametrize("table_dtype", [np.int32, np.int64])
def test_block_table_columns_past_the_pages_in_use_cost_nothing(implementation, table_dtype):
    """A block table sized for a long capacity (FlashAttention's callers pass int32 tables) over
    short sequences: a call allocates the same whatever the table's width — the int32 table was
    converted whole to int64 on every call (8 bytes per slot of capacity / page size per
    sequence: a 256-sequence batch of 8,192-page rows, 16 MiB a call and layer); now only the
    columns of the pages in use are."""
    rng = np.random.default_rng(0)
    B, Hkv, G, D, ps, pages_each = 8, 2, 2, 32, 16, 8
    kc = np.zeros((B * pages_each, Hkv, ps, D), np.float16)
    vc = np.zeros_like(kc)
    q = rng.standard_normal((B, Hkv * G, 1, D)).astype(np.float16)
    kn, vn = (rng.standard_normal((B, Hkv, 1, D)).astype(np.float16) for _ in range(2))

    def peak(max_pages):
        table = np.full((B, max_pages), -1, dtype=table_dtype)
        table[:, :pages_each] = np.arange(B * pages_each).reshape(B, pages_each)

        def call():
            return attention_with_kvcache(q, kc, vc, kn, vn, cache_lengths=np.full(B, 100), block_table=table,
                                          implementation=implementation)

        call()
        return _traced_peak(call)

    narrow, wide = peak(16), peak(1 << 15)
    wide_bytes = B * (1 << 15) * 8  # the wide table as int64: 2 MiB
    assert wide - narrow < 0.05 * wide_bytes, (narrow, wide)


def test_a_small_int32_block_table_is_converted_whole_and_a_long_one_cut():
    """The cut of a block table of another integer dtype to its pages in use (above) is for long
    tables: on a decode step's small table the search for its last page in use (a reduction over
    the lengths, a slice) cost each one-token call 3–7 µs more than converting the table whole
    (≈ 0.6 µs for 64 pages; 6 Dec 2026, A/B against 0d6d3e7: normalize 13 → 19 µs), so a table of
    up to decode_semantics._TABLE_WHOLE entries (32 KiB as int64) is converted whole.  Both
    forms give the int64 table's bits."""
    from dotattn import decode_semantics

    rng = np.random.default_rng(2)
    B, Hkv, D, ps = 2, 1, 8, 16
    for max_pages, whole in ((64, True), (getattr(decode_semantics, "_TABLE_WHOLE", 4096), False)):
        kc = rng.standard_normal((B * max_pages, Hkv, ps, D)).astype(np.float32)
        vc = rng.standard_normal(kc.shape).astype(np.float32)
        q = rng.standard_normal((B, 2, 1, D)).astype(np.float32)
        table64 = rng.permutation(B * max_pages).reshape(B, max_pages)
        lengths = np.array([40, 3])
        call = decode_semantics.normalize(
            q, kc, vc, None, None, cache_lengths=lengths, block_table=table64.astype(np.int32), causal=True,
            window=None, scale=None, softcap=None, alibi_slopes=None, rotary=None, layout="bhld",
        )
        assert call.block_table.dtype == np.int64
        assert call.block_table.shape == ((B, max_pages) if whole else (B, 3)), call.block_table.shape
        np.testing.assert_array_equal(call.block_table, table64[:, : call.block_table.shape[1]])
        for implementation in ("cpu", "numpy"):
            want = attention_with_kvcache(q, kc, vc, cache_lengths=lengths, block_table=table64, return_lse=True,
                                          implementation=implementation)
            got = attention_with_kvcache(q, kc, vc, cache_lengths=lengths, block_table=table64.astype(np.int32),
                                         return_lse=True, implementation=implementation)
            for g, w in zip(got, want):  # (bitwise)
                np.testing.assert_array_equal(g.view(np.uint32), w.view(np.uint32), err_msg=f"{implementation} {max_pages}")


def _numpy_calls(fn) -> int:
    """C functions and methods called by ``fn()`` (NumPy's among them), counted by a profiler."""
    import sys as _sys

    calls = [0]

    def prof(frame, event, arg):
        if event == "c_call":
            calls[0] += 1

    _sys.setprofile(prof)
    try:
        fn()
    finally:
        _sys.setprofile(None)
    return calls[0]


def test_page_table_check_of_a_batch_of_short_sequences_does_not_go_row_by_row():
    """Past 1,024 pages in use the block table's check took one sequence's row at a time (010c49d):
    a NumPy call or three per sequence, so a large batch of short sequences — 128 sequences of 16
    pages, every call of every layer — took ≈ 0.7 ms where the check before it took 30 µs (6 Dec
    2026).  Rows are gathered in groups of ≤ 16,384 table entries: the calls do not grow with the
    batch."""
    from dotattn import decode_semantics

    rng = np.random.default_rng(0)
    counts = {}
    for B in (64, 512):
        per_seq, ps = 16, 16
        table = rng.permutation(B * per_seq).reshape(B, per_seq)
        kv = np.full(B, per_seq * ps - 3, dtype=np.int64)
        counts[B] = _numpy_calls(lambda: decode_semantics._check_pages(table, kv, ps, B * per_seq))
    assert counts[512] < 60 and counts[512] < 2 * counts[64], counts


def test_page_table_check_of_a_large_pool_allocates_for_the_pages_in_use():
    """A pool far larger than the pages a call uses (a server's shared pool): a flag per pool page
    (010c49d) cost 4 MiB and a scan of them per call for 2,048 pages in use of a 4,194,304-page
    pool (263 µs, against 143 for the sort before it); the pages in use are gathered and sorted
    instead (≈ 9 bytes a page in use)."""
    from dotattn import decode_semantics

    rng = np.random.default_rng(1)
    pool, per_seq = 1 << 22, 1024
    table = rng.choice(pool, size=(2, per_seq), replace=False)
    kv = np.full(2, per_seq, dtype=np.int64)
    decode_semantics._check_pages(table, kv, 1, pool)
    peak = _traced_peak(lambda: decode_semantics._check_pages(table, kv, 1, pool))
    assert peak < 64 * 2 * per_seq, peak  # (2 MiB-scale flags would be 4 MiB)


@pytest.mark.parametrize("shape", ["short-rows", "large-pool"])
@pytest.mark.parametrize("fault", ["repeat-within", "repeat-across", "outside", "negative"])
def test_page_table_check_of_grouped_rows_and_large_pools_refuses_bad_tables(shape, fault):
    """Both ways of settling a long table — rows gathered in groups (a batch of 128 short
    sequences), pages gathered and sorted (a pool 512 × the pages in use) — refuse what the masks
    report, and take a valid table."""
    from dotattn import AttentionValueError

    rng = np.random.default_rng(2)
    B, per_seq = (128, 16) if shape == "short-rows" else (2, 1024)
    n_pages = B * per_seq + 10 if shape == "short-rows" else B * per_seq * 512
    D = 8
    kc = np.zeros((n_pages, 1, 1, D), np.float32)
    table = rng.choice(n_pages, size=(B, per_seq), replace=False)
    if fault == "repeat-within":
        table[B - 1, per_seq - 2] = table[B - 1, 1]
    elif fault == "repeat-across":
        table[B - 1, per_seq - 1] = table[0, 3]
    elif fault == "outside":
        table[B // 2, per_seq // 2] = n_pages
    else:
        table[B - 1, per_seq - 1] = -1
    q = np.zeros((B, 1, 1, D), np.float32)
    lengths = np.full(B, per_seq)
    match = "repeats page" if fault.startswith("repeat") else "outside the page pool"
    with pytest.raises(AttentionValueError, match=match):
        attention_with_kvcache(q, kc, kc, cache_lengths=lengths, block_table=table)
    table_ok = rng.choice(n_pages, size=(B, per_seq), replace=False)
    attention_with_kvcache(q, kc, kc, cache_lengths=lengths, block_table=table_ok)
