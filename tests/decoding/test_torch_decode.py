"""attention_with_kvcache on torch CPU tensors: in-place appends visible in the caller's tensors."""

from __future__ import annotations

import numpy as np
import pytest

import decode_cases as C
import helpers as H
import dotattn

torch = pytest.importorskip("torch")
BACKENDS = C.decode_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("paged", [False, True])
def test_torch_tensors_in_place(backend, dtype, paged):
    np_dtype = H.DTYPES[1] if dtype == "bfloat16" else np.dtype(dtype)
    case = C.make_case(21, page_size=3 if paged else None, Lq=2, Lnew=2, dtype=np_dtype, q_dtype=np.float32)
    tdt = getattr(torch, dtype)

    def t(x):
        return None if x is None else torch.from_numpy(x.astype(np.float32)).to(tdt)

    kc, vc = t(case.k_cache), t(case.v_cache)
    q = torch.from_numpy(case.q)
    table = None if case.block_table is None else torch.from_numpy(case.block_table)
    with torch.no_grad():
        out, lse = dotattn.attention_with_kvcache(
            q, kc, vc, t(case.k_new), t(case.v_new), cache_lengths=torch.from_numpy(case.cache_lengths),
            block_table=table, return_lse=True, implementation=backend,
        )
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and isinstance(lse, torch.Tensor)
    out64, lse64, naive = C.expected(case)
    H.assert_close_to_reference(out.numpy(), out64, naive, dtype=np_dtype)
    # the caller's tensors hold the new tokens
    case.k_cache = kc.float().numpy().astype(np_dtype)
    case.v_cache = vc.float().numpy().astype(np_dtype)
    ks, vs = C.logical_after(case)
    for b, n in enumerate(case.cache_lengths + 2):
        k, v = C.read_cache(case, b, n)
        np.testing.assert_array_equal(k, ks[b])
        np.testing.assert_array_equal(v, vs[b])


def test_grad_enabled_inputs_are_refused():
    case = C.make_case(2)
    q = torch.from_numpy(case.q).requires_grad_()
    with pytest.raises(ValueError, match="no_grad"):
        dotattn.attention_with_kvcache(q, torch.from_numpy(case.k_cache), torch.from_numpy(case.v_cache), **case.kwargs())


def test_inference_mode_tensors():
    case = C.make_case(3)
    with torch.inference_mode():
        kc, vc = torch.from_numpy(case.k_cache).clone(), torch.from_numpy(case.v_cache).clone()
        out = dotattn.attention_with_kvcache(
            torch.from_numpy(case.q), kc, vc, torch.from_numpy(case.k_new), torch.from_numpy(case.v_new),
            cache_lengths=case.cache_lengths,
        )
    out64, _, naive = C.expected(case)
    H.assert_close_to_reference(out.numpy(), out64, naive)
    b, n = 0, int(case.cache_lengths[0])
    np.testing.assert_array_equal(kc[b, :, n].numpy(), case.k_new[b, :, 0])


# ---- torch CPU calls: what an audit found refused wrongly or not at all (6 Dec 2026) ----------

def _small_torch_call():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 1, 16, generator=g)
    kc, vc = torch.randn(1, 2, 32, 16, generator=g), torch.randn(1, 2, 32, 16, generator=g)
    kn, vn = torch.randn(1, 2, 1, 16, generator=g), torch.randn(1, 2, 1, 16, generator=g)
    return q, kc, vc, kn, vn


@pytest.mark.parametrize("which", ["k_cache", "v_cache", "k_new"])
def test_a_meta_tensor_beside_a_cpu_q_is_refused_by_name(which):
    """Was torch's TypeError ("can't convert meta device type tensor to numpy")."""
    q, kc, vc, kn, vn = _small_torch_call()
    args = dict(k_cache=kc, v_cache=vc, k_new=kn, v_new=vn)
    before = kc.clone(), vc.clone()
    args[which] = args[which].to("meta")
    with pytest.raises(dotattn.AttentionValueError, match=f"{which} is on device 'meta' but this call runs on the CPU"):
        dotattn.attention_with_kvcache(q, args["k_cache"], args["v_cache"], args["k_new"], args["v_new"],
                                       cache_lengths=torch.tensor([5]))
    if which != "k_cache":
        assert torch.equal(kc, before[0]) and torch.equal(vc, before[1])  # nothing written


def test_an_inference_tensor_cache_is_written_only_in_inference_mode():
    """torch refuses in-place updates of inference tensors outside inference mode, and so does the
    triton path; the CPU path wrote them through NumPy's view.  Read-only use stays allowed."""
    q, kc, vc, kn, vn = _small_torch_call()
    with torch.inference_mode():
        ki, vi = kc.clone(), vc.clone()
    for name in ("k_cache", "v_cache"):
        caches = (ki, vc.clone()) if name == "k_cache" else (kc.clone(), vi)
        before = [c.clone() for c in caches]
        with pytest.raises(dotattn.AttentionValueError, match=f"{name} is an inference tensor"):
            dotattn.attention_with_kvcache(q, *caches, kn, vn, cache_lengths=torch.tensor([5]))
        assert all(torch.equal(c, b) for c, b in zip(caches, before))  # nothing written
    out = dotattn.attention_with_kvcache(q, ki, vi, cache_lengths=torch.tensor([5]))  # reads only: fine
    with torch.inference_mode():
        written = dotattn.attention_with_kvcache(q, ki, vi, kn, vn, cache_lengths=torch.tensor([5]))
    assert torch.equal(ki[:, :, 5], kn[:, :, 0]) and out.shape == written.shape


def test_kvcache_append_checks_what_attend_checks():
    """append() took NumPy arrays into a torch cache (and torch tensors into a NumPy one), and new
    keys requiring grad with grad mode on; attend() refused both."""
    tc = dotattn.KVCache(batch_size=1, num_kv_heads=2, capacity=16, head_dim=8, dtype="float32", library="torch")
    nc = dotattn.KVCache(batch_size=1, num_kv_heads=2, capacity=16, head_dim=8, dtype="float32")
    k = torch.ones(1, 2, 3, 8)
    with pytest.raises(dotattn.AttentionTypeError, match="k_new is a numpy array, but this KVCache holds torch buffers"):
        tc.append(k.numpy(), k)
    with pytest.raises(dotattn.AttentionTypeError, match="v_new is a numpy array, but this KVCache holds torch buffers"):
        tc.append(k, k.numpy())
    with pytest.raises(dotattn.AttentionTypeError, match="k_new is a torch array, but this KVCache holds numpy buffers"):
        nc.append(k, k.numpy())
    with pytest.raises(dotattn.AttentionValueError, match="k_new requires grad"):
        tc.append(k.clone().requires_grad_(), k)
    assert int(tc.lengths[0]) == 0 and int(nc.lengths[0]) == 0  # nothing stored
    tc.append(k, k)
    nc.append(k.numpy(), k.numpy())
    assert int(tc.lengths[0]) == 3 and int(nc.lengths[0]) == 3


_TRITON = all(__import__("importlib").util.find_spec(m) is not None for m in ("triton",))
_WRITERS = BACKENDS + (["triton"] if _TRITON else [])


def _saved_for_backward(*tensors):
    """A graph that saved ``tensors`` for its backward (as a model's loss saves a cache it read)."""
    w = torch.ones(1, requires_grad=True)
    return sum((w * t.float()).sum() for t in tensors)


@pytest.mark.parametrize("backend", _WRITERS)
def test_an_append_moves_the_caches_version_counters(backend, monkeypatch):
    """The kernels write the caller's caches in place where autograd cannot see it (a NumPy view,
    a Triton kernel): their version counters move as a torch in-place operation's would, so a
    backward that saved a cache before the append fails with torch's error instead of computing
    with the new values.  A call without new tokens leaves the counters alone."""
    if backend == "triton" and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    rng = np.random.default_rng(3)

    def t(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))

    k, v, q = t(1, 2, 8, 4), t(1, 2, 8, 4), t(1, 2, 1, 4)
    lengths = np.array([3])
    versions = (k._version, v._version)
    with torch.no_grad():
        dotattn.attention_with_kvcache(q, k, v, cache_lengths=lengths, implementation=backend)
    assert (k._version, v._version) == versions
    loss = _saved_for_backward(k, v)
    with torch.no_grad():
        dotattn.attention_with_kvcache(q, k, v, t(1, 2, 1, 4), t(1, 2, 1, 4), cache_lengths=lengths,
                                       implementation=backend)
    assert k._version > versions[0] and v._version > versions[1]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("step", ["append", "attend", "attend-triton"])
def test_a_kvcache_write_moves_its_buffers_version_counters(step, monkeypatch):
    """The same for a KVCache's torch buffers (``cache.k`` / ``cache.layer(i)`` hand them out):
    append and attend with new tokens move their counters."""
    if step == "attend-triton":
        if not _TRITON:
            pytest.skip("triton is not installed")
        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    cache = dotattn.KVCache(1, 2, 4, 16, library="torch")
    k_buf, v_buf = cache.layer(0)
    loss = _saved_for_backward(k_buf, v_buf)
    new = torch.ones(1, 2, 1, 4)
    with torch.no_grad():
        if step == "append":
            cache.append(new, new)
        else:
            cache.attend(torch.ones(1, 2, 1, 4), new, new,
                         implementation="triton" if step == "attend-triton" else None)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "uint64", "int16", "int32"])
def test_cache_lengths_of_any_integer_dtype(dtype):
    """Lengths are integers of any int or uint dtype (docs/decoding.md) in torch as in NumPy:
    torch's uint16/32/64 were refused as "a dtype dotattn does not take" until 6 Dec 2026."""
    case = C.make_case(7, B=2, lengths=[5, 9], capacity=12)
    tensors = [torch.from_numpy(np.ascontiguousarray(x)) for x in (case.q, case.k_cache, case.v_cache)]
    want = dotattn.attention_with_kvcache(*tensors, cache_lengths=torch.tensor([5, 9]))
    got = dotattn.attention_with_kvcache(*tensors, cache_lengths=torch.tensor([5, 9], dtype=getattr(torch, dtype)))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(dotattn.AttentionValueError, match="cache_lengths"):
        dotattn.attention_with_kvcache(*tensors, cache_lengths=torch.tensor([5, 13], dtype=getattr(torch, dtype)))


@pytest.mark.parametrize("option", ["alibi_slopes", "rotary"])
def test_slopes_and_rotary_tables_that_require_grad_are_refused(option):
    """q, the caches and the new keys were refused when they required grad (no backward here);
    slopes and rotary tables were used as values, so a model training them got no gradient and
    no error.  Refused now, on both entries, with nothing written; under no_grad they run."""
    kw = (
        dict(alibi_slopes=torch.ones(2, requires_grad=True))
        if option == "alibi_slopes"
        else dict(rotary=(torch.ones(8, 4, requires_grad=True), torch.zeros(8, 4)))
    )
    name = "alibi_slopes" if option == "alibi_slopes" else r"rotary\[0\]"
    q, kn = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 1, 8)
    kc, vc = torch.zeros(1, 1, 6, 8), torch.zeros(1, 1, 6, 8)
    with pytest.raises(dotattn.AttentionValueError, match=f"^{name} requires grad"):
        dotattn.attention_with_kvcache(q, kc, vc, kn, kn, cache_lengths=1, **kw)
    assert (kc == 0).all() and (vc == 0).all()
    cache = dotattn.KVCache(1, 1, 8, 8, library="torch")
    with pytest.raises(dotattn.AttentionValueError, match=f"^{name} requires grad"):
        cache.attend(q, kn, kn, **kw)
    assert int(cache.lengths[0]) == 0
    with torch.no_grad():
        out = dotattn.attention_with_kvcache(q, kc, vc, kn, kn, cache_lengths=1, **kw)
        assert out.shape == (1, 2, 1, 8) and torch.isfinite(out).all()
