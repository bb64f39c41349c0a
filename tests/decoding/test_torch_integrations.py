"""attention_with_kvcache and KVCache under the torch integrations users combine them with:
torch.compile, … (the decode path's deployment audit, 6 Dec 2026)."""

from __future__ import annotations

import numpy as np
import pytest

import dotattn

torch = pytest.importorskip("torch")


def _inputs(seed=0, B=2, Hq=4, Hkv=2, cap=24, D=8):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, generator=g)
    kc, vc = torch.randn(B, Hkv, cap, D, generator=g), torch.randn(B, Hkv, cap, D, generator=g)
    kn, vn = torch.randn(B, Hkv, 1, D, generator=g), torch.randn(B, Hkv, 1, D, generator=g)
    return q, kc, vc, kn, vn, torch.tensor([3, 7])


def _reference(q, kc, vc, kn, vn, lens):
    f = lambda t: t.detach().clone().double().numpy()  # noqa: E731
    return dotattn.attention_with_kvcache(
        f(q), f(kc), f(vc), f(kn), f(vn), cache_lengths=lens.numpy(), implementation="reference"
    )


def test_torch_compile_runs_the_decode_call_eagerly_and_appends_in_place():
    # Dynamo traced into the call: the NumPy kernel's np.copyto reached a fake tensor (an error),
    # and the first call of a process crashed inside Numba's dispatcher.  Now a graph break.
    torch._dynamo.reset()

    def step(q, kc, vc, kn, vn, lens):
        return dotattn.attention_with_kvcache(q, kc, vc, kn, vn, cache_lengths=lens, implementation="numpy") * 2.0

    q, kc, vc, kn, vn, lens = _inputs()
    expected = _reference(q, kc, vc, kn, vn, lens)
    kc0, vc0 = kc.clone(), vc.clone()
    with torch.no_grad():
        out = torch.compile(step, backend="eager")(q, kc, vc, kn, vn, lens)
    np.testing.assert_allclose(out.numpy(), 2.0 * expected, rtol=1e-5, atol=1e-5)
    for b, n in enumerate(lens.tolist()):  # the new tokens are in the caller's cache, nothing else moved
        assert torch.equal(kc[b, :, n], kn[b, :, 0]) and torch.equal(vc[b, :, n], vn[b, :, 0])
        kc0[b, :, n], vc0[b, :, n] = kn[b, :, 0], vn[b, :, 0]
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)


def test_a_compiled_module_holding_a_kvcache_matches_the_eager_one():
    torch._dynamo.reset()

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cache = dotattn.KVCache(2, 2, 8, 16, library="torch", page_size=4)

        def forward(self, q, k, v):
            return self.cache.attend(q, k, v, implementation="numpy") + 1.0

    eager, compiled = Layer(), Layer()
    run = torch.compile(compiled, backend="eager")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            q, k, v = torch.randn(2, 4, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g)
            torch.testing.assert_close(run(q, k, v), eager(q, k, v), rtol=0, atol=0)
    assert compiled.cache.lengths.tolist() == [3, 3]
    assert torch.equal(compiled.cache.k, eager.cache.k) and torch.equal(compiled.cache.v, eager.cache.v)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("page_size", [None, 4])
def test_a_copied_torch_kvcache_writes_its_own_buffers(how, page_size):
    # The NumPy views of the buffers were copied as arrays of their own: the copy's attend()
    # wrote there, and its k, v and layer() never showed the new tokens.
    import copy
    import io
    import pickle

    cache = dotattn.KVCache(2, 2, 8, 16, library="torch", page_size=page_size)
    g = torch.Generator().manual_seed(2)
    step = lambda: [torch.randn(2, n, 1, 8, generator=g) for n in (4, 2, 2)]  # noqa: E731
    with torch.no_grad():
        cache.attend(*step())
    if how == "deepcopy":
        twin = copy.deepcopy(cache)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(cache))
    else:
        buf = io.BytesIO()
        torch.save(cache, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    q, k, v = step()
    with torch.no_grad():
        out = cache.attend(q, k, v)
        out_twin = twin.attend(q, k, v)
    assert torch.equal(out, out_twin)
    assert twin.k.data_ptr() != cache.k.data_ptr()
    assert torch.equal(twin.k, cache.k) and torch.equal(twin.v, cache.v)  # the copy's buffers hold token 1 too
    table = twin.block_table
    for b in range(2):
        page, slot = (b, 1) if table is None else (int(table[b, 0]), 1)
        assert torch.equal(twin.k[0, page, :, slot], k[b, :, 0]) and torch.equal(twin.v[0, page, :, slot], v[b, :, 0])


@pytest.mark.parametrize("page_size", [None, 2])
def test_a_kvcache_whose_buffers_moved_to_shared_memory_writes_them(page_size):
    # share_memory_() — torch.multiprocessing calls it on every tensor it sends — moves a
    # tensor's memory and frees the old allocation, where the cache's NumPy views still pointed:
    # its calls wrote freed memory (a heap corruption abort at exit) and k/v never showed them.
    cache = dotattn.KVCache(1, 2, 4, 8, library="torch", page_size=page_size, num_layers=2)
    g = torch.Generator().manual_seed(3)
    for step in range(2):
        cache.k.share_memory_()
        cache.v.share_memory_()
        assert cache.k.is_shared()
        for layer in range(2):
            q, k, v = (torch.randn(1, 2, 1, 4, generator=g) for _ in range(3))
            with torch.no_grad():
                if layer == 0:
                    out = cache.attend(q, k, v, layer=layer)
                    assert torch.isfinite(out).all()
                else:
                    cache.append(k, v, layer=layer)
            kb, vb = cache.layer(layer)
            page, slot = (0, step) if page_size is None else (int(cache.block_table[0, step // 2]), step % 2)
            assert torch.equal(kb[page, :, slot], k[0, :, 0]) and torch.equal(vb[page, :, slot], v[0, :, 0])


@pytest.mark.parametrize("which", ["q", "k_new"])
def test_vmap_is_refused_by_name_before_anything_is_written(which):
    # torch's own "Cannot access data pointer of Tensor that doesn't have storage" came before.
    q, kc, vc, kn, vn, lens = _inputs()
    kc0, vc0 = kc.clone(), vc.clone()

    def one(x):
        args = dict(q=q[:1], k_new=kn[:1])
        args[which] = x[None]
        return dotattn.attention_with_kvcache(
            args["q"], kc[:1], vc[:1], args["k_new"], vn[:1], cache_lengths=2, implementation="numpy"
        )

    batch = (q if which == "q" else kn)[:, :, :1]
    with torch.no_grad(), pytest.raises(TypeError, match=rf"^{which} is a tensor inside a torch.func transform"):
        torch.func.vmap(one)(batch)
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0)
    cache = dotattn.KVCache(1, 2, 8, 8, library="torch", page_size=2)
    with torch.no_grad(), pytest.raises(TypeError, match="torch.func transform"):
        torch.func.vmap(lambda x: cache.attend(x[None], kn[:1], vn[:1]))(q[:, :, :1])
    assert cache.lengths.tolist() == [0] and cache.free_pages == 4 and not cache.k.any()
