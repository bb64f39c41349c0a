"""KVCache as a state machine (hypothesis): random runs of decode steps over every layer, stores
of padded prompts, resets of one sequence or all, on contiguous and paged caches (a pool that
can run out), checked after every step against a model that keeps each (layer, sequence)'s
tokens in Python lists — outputs against float64 attention over the model's tokens, the
lengths, the pages (held, free, never shared), and refused steps changing nothing.

A second machine (KVCacheLayerMachine) calls one layer per rule, to reach the states inside a
step: see its section below."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import helpers as H
import dotattn
from dotattn.errors import AttentionValueError

B, HKV, G, D, LAYERS = 3, 2, 2, 16, 2
HQ = HKV * G


def _attention64(q, keys, values, dtype):
    """``q (Hq, Lq, D)`` over one sequence's ``keys``/``values (Hkv, n, D)``, causal bottom-right,
    computed in ``dtype`` (float64: the reference; float32: the naive baseline)."""
    q = q.astype(dtype)
    keys, values = keys.astype(dtype), values.astype(dtype)
    Lq, n = q.shape[1], keys.shape[1]
    out = np.zeros((HQ, Lq, values.shape[2]), dtype=dtype)
    for h in range(HQ):
        s = (q[h] @ keys[h // G].T) * dtype(1.0 / np.sqrt(D))
        visible = np.arange(n)[None, :] <= (n - Lq + np.arange(Lq))[:, None]
        s = np.where(visible, s, -np.inf)
        m = s.max(axis=1, keepdims=True)
        p = np.where(visible, np.exp(s - np.where(np.isfinite(m), m, 0)), 0)
        total = p.sum(axis=1, keepdims=True)
        out[h] = np.divide(p @ values[h // G], total, out=np.zeros_like(out[h]), where=total > 0)
    return out


def _stored(cache, kbuf, vbuf, b, n):
    """Sequence ``b``'s first ``n`` keys and values ``(Hkv, n, D)`` from one layer's ``bhld``
    buffers, read through the block table where the cache is paged."""
    if cache.page_size is None:
        return kbuf[b, :, :n], vbuf[b, :, :n]
    idx = np.arange(n)
    pages = cache.block_table[b, idx // cache.page_size]
    return kbuf[pages, :, idx % cache.page_size].swapaxes(0, 1), vbuf[pages, :, idx % cache.page_size].swapaxes(0, 1)


class KVCacheMachine(RuleBasedStateMachine):
    @initialize(
        page_size=st.sampled_from([None, 1, 4, 8]),
        capacity=st.integers(6, 40),
        spare_pages=st.integers(-4, 2),
        seed=st.integers(0, 2**31 - 1),
    )
    def start(self, page_size, capacity, spare_pages, seed):
        self.rng = np.random.default_rng(seed)
        num_pages = None
        if page_size is not None:  # sometimes fewer pages than the sequences could fill
            num_pages = max(1, B * -(-capacity // page_size) + spare_pages)
        self.cache = dotattn.KVCache(B, HKV, D, capacity, num_layers=LAYERS, page_size=page_size,
                                     num_pages=num_pages, fill=np.nan)
        self.keys = [[np.zeros((HKV, 0, D), np.float32) for _ in range(B)] for _ in range(LAYERS)]
        self.values = [[np.zeros((HKV, 0, D), np.float32) for _ in range(B)] for _ in range(LAYERS)]

    def _lengths(self):
        return np.array([k.shape[1] for k in self.keys[0]])

    def _snapshot(self):
        c = self.cache
        return c.lengths, c.block_table, c.free_pages, c.k.copy(), c.v.copy()

    def _unchanged(self, before):
        lengths, table, free, k, v = before
        c = self.cache
        assert (c.lengths == lengths).all() and c.free_pages == free
        assert (table is None and c.block_table is None) or (c.block_table == table).all()
        assert np.array_equal(c.k, k, equal_nan=True) and np.array_equal(c.v, v, equal_nan=True)

    def _fits(self, new_lengths):
        c = self.cache
        if (new_lengths > c.capacity).any():
            return False
        if c.page_size is None:
            return True
        need = -(-new_lengths // c.page_size)
        have = (c.block_table >= 0).sum(axis=1)
        return int(np.maximum(need - have, 0).sum()) <= c.free_pages

    @rule(Lnew=st.integers(1, 3))
    def decode_step(self, Lnew):
        """One step of the model: attend with Lnew new tokens at every layer in order."""
        fits = self._fits(self._lengths() + Lnew)
        for layer in range(LAYERS):
            q = self.rng.standard_normal((B, HQ, Lnew, D)).astype(np.float32)
            k_new = self.rng.standard_normal((B, HKV, Lnew, D)).astype(np.float32)
            v_new = self.rng.standard_normal((B, HKV, Lnew, D)).astype(np.float32)
            if not fits:
                before = self._snapshot()
                with pytest.raises(AttentionValueError, match="does not fit|out of pages"):
                    self.cache.attend(q, k_new, v_new, layer=layer)
                self._unchanged(before)
                return
            out = self.cache.attend(q, k_new, v_new, layer=layer)
            for b in range(B):
                self.keys[layer][b] = np.concatenate([self.keys[layer][b], k_new[b]], axis=1)
                self.values[layer][b] = np.concatenate([self.values[layer][b], v_new[b]], axis=1)
                ref = _attention64(q[b], self.keys[layer][b], self.values[layer][b], np.float64)
                naive = _attention64(q[b], self.keys[layer][b], self.values[layer][b], np.float32)
                H.assert_close_to_reference(out[b], ref, naive, name=f"layer {layer} sequence {b}")

    @rule(counts=st.lists(st.integers(0, 5), min_size=B, max_size=B))
    def store_prompts(self, counts):
        """Store padded prompts (append with per-sequence lengths) at every layer."""
        counts = np.array(counts)
        Lmax = int(counts.max())
        fits = self._fits(self._lengths() + counts)
        for layer in range(LAYERS):
            k = self.rng.standard_normal((B, HKV, Lmax, D)).astype(np.float32)
            v = self.rng.standard_normal((B, HKV, Lmax, D)).astype(np.float32)
            if not fits:
                before = self._snapshot()
                with pytest.raises(AttentionValueError, match="does not fit|out of pages"):
                    self.cache.append(k, v, layer=layer, lengths=counts)
                self._unchanged(before)
                return
            self.cache.append(k, v, layer=layer, lengths=counts)
            for b in range(B):
                self.keys[layer][b] = np.concatenate([self.keys[layer][b], k[b, :, : counts[b]]], axis=1)
                self.values[layer][b] = np.concatenate([self.values[layer][b], v[b, :, : counts[b]]], axis=1)

    @rule(b=st.sampled_from([None, 0, 1, 2]))
    def reset(self, b):
        self.cache.reset(b)
        for layer in range(LAYERS):
            for s in range(B) if b is None else [b]:
                self.keys[layer][s] = self.keys[layer][s][:, :0]
                self.values[layer][s] = self.values[layer][s][:, :0]

    @precondition(lambda self: hasattr(self, "cache"))
    @invariant()
    def lengths_and_pages(self):
        c = self.cache
        assert (c.lengths == self._lengths()).all()
        if c.page_size is not None:
            table = c.block_table
            held = table[table >= 0]
            assert len(set(held.tolist())) == held.size, "a page is held twice"
            assert held.size + c.free_pages == c.num_pages
            assert ((table >= 0).sum(axis=1) >= -(-c.lengths // c.page_size)).all()

    @precondition(lambda self: hasattr(self, "cache"))
    @invariant()
    def stored_tokens(self):
        """Every layer's buffers hold the model's tokens where the table says."""
        c = self.cache
        for layer in range(LAYERS):
            kbuf, vbuf = c.layer(layer)
            for b in range(B):
                n = self.keys[layer][b].shape[1]
                got_k, got_v = _stored(c, kbuf, vbuf, b, n)
                assert np.array_equal(got_k, self.keys[layer][b]) and np.array_equal(got_v, self.values[layer][b])


KVCacheMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=12, deadline=None)
test_kvcache_state_machine = KVCacheMachine.TestCase


# =================================================================================
# One layer at a time: the states inside a step
# =================================================================================
#
# The machine above does whole steps; this one calls ONE layer per rule, so it reaches the
# states between a step's first layer and its last: layers out of order (the last before the
# others: refused), a layer stored twice (rewrites the same slots), token counts that differ
# from the step's first layer (refused), refused calls of every kind in the middle of a step
# (capacity, pages, bad arguments: nothing changed), reset(b) (refused mid-step) and reset()
# (always taken), and copies (copy.copy, copy.deepcopy, pickle) taken at any point, after which
# both caches go on, each checked against its own model.  Caches: 1–3 layers, contiguous or
# paged (pools that run out), both layouts, NumPy or torch (whose buffers may move to shared
# memory mid-run), float32 or float16, any decode implementation; attend() outputs (and LSEs)
# against float64 attention over the model's tokens.  Its default run takes ~8 s; the
# ``-m slow`` tests run it longer, and with the triton kernel (on CPU under the interpreter).

LAYERS3 = 3


def _torch_of(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def _np(x):
    """A NumPy array of a NumPy array or a torch tensor (the same memory)."""
    return x if isinstance(x, np.ndarray) else x.numpy()


def _reference(q, keys, values):
    """``_attention64`` in float64 and float32; a sequence with no key sees nothing (0)."""
    if keys.shape[1] == 0:
        zero = np.zeros((HQ, q.shape[1], D))
        return zero, zero.astype(np.float32)
    return _attention64(q, keys, values, np.float64), _attention64(q, keys, values, np.float32)


def _lse64(q, keys):
    """The float64 log-sum-exp of each row's visible scores (−inf where it sees none)."""
    Lq, n = q.shape[1], keys.shape[1]
    out = np.full((HQ, Lq), -np.inf)
    for h in range(HQ):
        s = (q[h].astype(np.float64) @ keys[h // G].T.astype(np.float64)) / np.sqrt(D)
        for i in range(Lq):
            row = s[i, : max(n - Lq + i + 1, 0)]
            if row.size:
                out[h, i] = row.max() + np.log(np.exp(row - row.max()).sum())
    return out


class _World:
    """A cache and the model of what it holds: each (layer, sequence)'s tokens (the layers that
    stored this step's tokens already hold them), the lengths, and the step under way (the
    layers before the last that stored it, and its new-token counts)."""

    def __init__(self, cache, num_layers):
        self.cache = cache
        self.num_layers = num_layers
        self.keys = [[np.zeros((HKV, 0, D), np.float32) for _ in range(B)] for _ in range(num_layers)]
        self.values = [[np.zeros((HKV, 0, D), np.float32) for _ in range(B)] for _ in range(num_layers)]
        self.lengths = np.zeros(B, dtype=np.int64)
        self.stored: set[int] = set()
        self.step: np.ndarray | None = None

    def copy_model(self, cache):
        other = _World.__new__(_World)
        other.cache = cache
        other.num_layers = self.num_layers
        other.keys = [list(row) for row in self.keys]  # (arrays are replaced, never written)
        other.values = [list(row) for row in self.values]
        other.lengths = self.lengths.copy()
        other.stored = set(self.stored)
        other.step = None if self.step is None else self.step.copy()
        return other

    def held(self):
        """Pages each sequence should hold: enough for its lengths plus the step under way."""
        c = self.cache
        n = self.lengths + (0 if self.step is None else self.step)
        return -(-n // c.page_size)

    def refusals(self, layer, counts):
        """Why the cache must refuse storing ``counts`` at ``layer`` now (empty: it must take it)."""
        c, last = self.cache, self.num_layers - 1
        why = []
        if last and layer == last and self.stored != set(range(last)):
            why.append("is the last layer")
        if last and self.step is not None and not np.array_equal(counts, self.step):
            why.append("every layer of a step stores the same tokens")
        new = self.lengths + counts
        if (new > c.capacity).any():
            why.append("does not fit")
        elif c.page_size is not None:
            extra = np.maximum(-(-new // c.page_size) - self.held(), 0).sum()
            if extra > c.num_pages - self.held().sum():
                why.append("out of pages")
        return why

    def store(self, layer, k, v, counts):
        """The model's side of an accepted call: the layer's slots from the lengths on hold the
        new tokens (a second call of the step rewrites them); the last layer ends the step."""
        for b in range(B):
            n, m = int(self.lengths[b]), int(counts[b])
            self.keys[layer][b] = np.concatenate([self.keys[layer][b][:, :n], k[b, :, :m]], axis=1)
            self.values[layer][b] = np.concatenate([self.values[layer][b][:, :n], v[b, :, :m]], axis=1)
        if layer == self.num_layers - 1:
            self.lengths = self.lengths + counts
            self.stored, self.step = set(), None
        else:
            self.stored.add(layer)
            self.step = np.array(counts, dtype=np.int64)

    def snapshot(self):
        c = self.cache
        return c.lengths, c.block_table, c.free_pages, _np(c.k).copy(), _np(c.v).copy()

    def assert_unchanged(self, before):
        lengths, table, free, k, v = before
        c = self.cache
        assert (c.lengths == lengths).all() and c.free_pages == free
        assert (table is None and c.block_table is None) or (c.block_table == table).all()
        assert np.array_equal(_np(c.k), k, equal_nan=True), "a refused call wrote k"
        assert np.array_equal(_np(c.v), v, equal_nan=True), "a refused call wrote v"

    def check(self):
        """Lengths, pages and every layer's stored tokens against the model."""
        c = self.cache
        assert (c.lengths == self.lengths).all(), f"lengths {c.lengths}, model {self.lengths}"
        if c.page_size is not None:
            table = c.block_table
            held = table[table >= 0]
            assert len(set(held.tolist())) == held.size, "a page is held twice"
            assert held.size + c.free_pages == c.num_pages, "held + free != pool"
            assert ((table >= 0).sum(axis=1) == self.held()).all(), (
                f"pages held {(table >= 0).sum(axis=1)}, the lengths and the step need {self.held()}")
            # a sequence's pages are its first logical pages, no gaps
            for b in range(B):
                row = table[b] >= 0
                assert not (row[1:] & ~row[:-1]).any(), f"sequence {b}'s pages have a gap: {table[b]}"
        for layer in range(self.num_layers):
            kbuf, vbuf = (_np(x) for x in c.layer(layer))
            if c.layout == "blhd":
                kbuf, vbuf = kbuf.swapaxes(1, 2), vbuf.swapaxes(1, 2)
            for b in range(B):
                n = self.keys[layer][b].shape[1]
                pending = self.step is not None and layer in self.stored
                assert n == self.lengths[b] + (self.step[b] if pending else 0)
                got_k, got_v = (x.astype(np.float32) for x in _stored(c, kbuf, vbuf, b, n))
                assert np.array_equal(got_k, self.keys[layer][b]), f"layer {layer} sequence {b}: keys"
                assert np.array_equal(got_v, self.values[layer][b]), f"layer {layer} sequence {b}: values"


class KVCacheLayerMachine(RuleBasedStateMachine):
    TRITON = False  # torch caches whose attend() runs the triton kernel (Triton's interpreter: slow)

    @initialize(
        num_layers=st.sampled_from([1, 2, LAYERS3, LAYERS3]),
        page_size=st.sampled_from([None, 1, 3, 4, 64]),
        capacity=st.integers(4, 16) | st.sampled_from([270, 300]),  # (past the kernel's 256-key chunks)
        spare_pages=st.integers(-5, 1),
        layout=st.sampled_from(["bhld", "bhld", "blhd"]),
        library=st.sampled_from(["numpy", "numpy", "numpy", "torch"]),
        dtype=st.sampled_from(["float32", "float32", "float16"]),
        implementation=st.sampled_from([None, None, "numpy", "reference"]),
        seed=st.integers(0, 2**31 - 1),
    )
    def start(self, num_layers, page_size, capacity, spare_pages, layout, library, dtype, implementation, seed):
        self.rng = np.random.default_rng(seed)
        if self.TRITON:
            library, implementation = "torch", "triton"
        num_pages = None
        if page_size is not None:  # often fewer pages than the sequences could fill
            num_pages = max(1, B * -(-capacity // page_size) + spare_pages)
        cache = dotattn.KVCache(B, HKV, D, capacity, num_layers=num_layers, page_size=page_size,
                                num_pages=num_pages, layout=layout, library=library, dtype=dtype, fill=np.nan)
        self.layout, self.library, self.dtype, self.implementation = layout, library, np.dtype(dtype), implementation
        self.world = _World(cache, num_layers)
        self.other: _World | None = None  # a copy, going on with its own model

    # ---- inputs in the cache's layout and library ------------------------------------
    def _arr(self, x):
        if self.layout == "blhd":
            x = np.ascontiguousarray(x.swapaxes(1, 2))
        if self.library == "torch":
            import torch

            x = torch.from_numpy(x)
        return x

    def _out(self, out):
        out = _np(out)
        return out.swapaxes(1, 2) if self.layout == "blhd" else out

    def _random(self, *shape):
        return self.rng.standard_normal(shape).astype(np.float32)

    def _call(self, layer, counts, *, attend, Lq=None, k_none=False, lengths_arg=True):
        """One call on one layer; the model says whether it must be taken, and checks it."""
        w = self.world
        counts = np.asarray(counts, dtype=np.int64)
        Lnew = int(counts.max()) if len(counts) else 0
        k, v = self._random(B, HKV, Lnew, D), self._random(B, HKV, Lnew, D)
        if self.dtype != np.float32 and self.rng.random() < 0.5:  # new tokens in the cache's dtype
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        why = w.refusals(layer, counts)
        before = w.snapshot() if why else None
        if attend:
            Lq = max(Lnew, 1) if Lq is None else Lq
            q = self._random(B, HQ, Lq, D)
            kn, vn = (None, None) if k_none else (self._arr(k), self._arr(v))
            return_lse = bool(self.rng.random() < 0.3)
            call = lambda: w.cache.attend(self._arr(q), kn, vn, layer=layer, return_lse=return_lse,  # noqa: E731
                                          implementation=self.implementation)
        else:
            lengths = counts if lengths_arg else None
            call = lambda: w.cache.append(self._arr(k), self._arr(v), layer=layer, lengths=lengths)  # noqa: E731
        event(f"{'attend' if attend else 'append'} {'refused: ' + why[0] if why else 'taken'}"
              f"{' mid-step' if w.stored else ''}{' rewrite' if layer in w.stored else ''}")
        if why:
            with pytest.raises(AttentionValueError, match="|".join(why)):
                call()
            w.assert_unchanged(before)
            return
        out = call()
        # the model holds what the cache stores: the new tokens rounded to its dtype
        k, v = (x.astype(self.dtype).astype(np.float32) for x in (k, v))
        w.store(layer, k, v, counts)
        if attend:
            lse = None
            if return_lse:
                out, lse = out
                lse = _np(lse)
            out = self._out(out)
            for b in range(B):
                keys, values = w.keys[layer][b], w.values[layer][b]
                ref, naive = _reference(q[b], keys, values)
                H.assert_close_to_reference(out[b], ref, naive, name=f"layer {layer} sequence {b}")
                if lse is not None:
                    ref_lse = _lse64(q[b], keys)
                    assert np.array_equal(np.isinf(lse[b]), np.isinf(ref_lse)), f"layer {layer} sequence {b}: lse"
                    fin = np.isfinite(ref_lse)
                    assert np.allclose(lse[b][fin], ref_lse[fin], rtol=1e-5, atol=1e-5), f"layer {layer} sequence {b}: lse"

    # ---- rules --------------------------------------------------------------------------
    def _next_layer(self):
        w = self.world
        todo = [i for i in range(w.num_layers - 1) if i not in w.stored]
        return todo[0] if todo else w.num_layers - 1

    @rule(Lnew=st.sampled_from([0, 1, 1, 2]), k_none=st.booleans(), lq1=st.booleans())
    def attend_next(self, Lnew, k_none, lq1):
        """The next layer in order, with the step's counts (a fresh step: Lnew for all)."""
        w = self.world
        counts = w.step if w.step is not None else np.full(B, Lnew)
        if len(set(counts.tolist())) > 1:  # a padded prompt's step: append() goes on with it
            self._call(self._next_layer(), counts, attend=False)
        elif k_none and (counts == 0).all():  # no new tokens: attend only
            self._call(self._next_layer(), counts, attend=True, k_none=True, Lq=1 if lq1 else None)
        else:
            self._call(self._next_layer(), counts, attend=True, Lq=1 if lq1 and counts.max() <= 1 else None)

    @rule(counts=st.lists(st.integers(0, 3), min_size=B, max_size=B), same=st.booleans(), lengths_arg=st.booleans(),
          scale=st.sampled_from([1, 1, 1, 50]))
    def append_next(self, counts, same, lengths_arg, scale):
        """append() on the next layer in order: a padded prompt (per-sequence counts; long ones
        in the large caches)."""
        w = self.world
        if w.cache.capacity > 256:
            counts = [n * scale for n in counts]
        if same and w.step is not None:
            counts = list(w.step)
        if not lengths_arg:
            counts = [max(counts)] * B
        self._call(self._next_layer(), counts, attend=False, lengths_arg=lengths_arg)

    @rule(layer=st.integers(0, LAYERS3 - 1), Lnew=st.sampled_from([0, 1, 2]), attend=st.booleans())
    def any_layer(self, layer, Lnew, attend):
        """Any layer (out of order, twice, the last first …) with any count."""
        self._call(layer % self.world.num_layers, np.full(B, Lnew), attend=attend)

    @precondition(lambda self: self.world.stored)
    @rule(data=st.data(), attend=st.booleans())
    def again(self, data, attend):
        """A layer that stored this step stores it again (the same slots rewritten)."""
        layer = data.draw(st.sampled_from(sorted(self.world.stored)))
        counts = self.world.step
        if attend and len(set(counts.tolist())) > 1:
            attend = False
        self._call(layer, counts, attend=attend)

    @rule(how=st.sampled_from(["layer", "head_dim", "new_mismatch", "k_only", "lengths", "dtype", "causal",
                               "batch", "rotary", "implementation", "library", "append_k_none"]),
          layer=st.integers(0, LAYERS3 - 1))
    def bad_call(self, how, layer):
        """A call with a bad argument, at any point of a step: refused, nothing changed (and the
        step goes on as the model says — checked by the next calls)."""
        w = self.world
        layer %= w.num_layers
        counts = w.step if w.step is not None else np.ones(B, dtype=np.int64)
        Lnew = int(counts.max())
        q, k, v = self._random(B, HQ, max(Lnew, 1), D), self._random(B, HKV, Lnew, D), self._random(B, HKV, Lnew, D)
        kw = dict(layer=layer)
        append = False
        if how == "rotary" and Lnew == 0:  # (no new token: the tables might cover the call)
            how = "causal"
        if how == "layer":
            kw["layer"] = w.num_layers
        elif how == "head_dim":
            q = self._random(B, HQ, max(Lnew, 1), D + 1)
        elif how == "new_mismatch":
            v = self._random(B, HKV, Lnew + 1, D)
        elif how == "k_only":
            v = None
        elif how == "lengths":
            append, kw["lengths"] = True, np.full(B, Lnew + 1)
        elif how == "dtype":
            q = q.astype(np.float64)
        elif how == "causal":
            kw["causal"] = "sideways"
        elif how == "batch":
            q = self._random(B + 1, HQ, max(Lnew, 1), D)
        elif how == "rotary":  # tables that do not reach the new tokens' positions
            n = int(w.lengths.min())  # (tables of n positions: the first new token's is past them)
            kw["rotary"] = (np.ones((n, 2), np.float32), np.zeros((n, 2), np.float32))
            if self.library == "torch":
                import torch

                kw["rotary"] = tuple(torch.from_numpy(t) for t in kw["rotary"])
        elif how == "implementation":
            kw["implementation"] = "nope"
        elif how == "append_k_none":
            append = True
        conv = self._arr
        if how == "library":  # the other library's arrays
            conv = (lambda x: np.asarray(self._arr(x))) if self.library == "torch" else (lambda x: _torch_of(self._arr(x)))
            append = bool(self.rng.random() < 0.5)
        before = w.snapshot()
        with pytest.raises((AttentionValueError, dotattn.errors.AttentionTypeError)):
            if append:
                w.cache.append(None if how == "append_k_none" else conv(k), conv(v), **kw)
            else:
                w.cache.attend(conv(q), conv(k), None if v is None else conv(v), **kw)
        w.assert_unchanged(before)

    @rule(b=st.sampled_from([None, 0, 1, 2]))
    def reset(self, b):
        w = self.world
        if b is not None and w.stored:
            before = w.snapshot()
            with pytest.raises(AttentionValueError, match="in the middle of a step"):
                w.cache.reset(b)
            w.assert_unchanged(before)
            return
        w.cache.reset(b)
        for s in range(B) if b is None else [b]:
            w.lengths[s] = 0
            for layer in range(w.num_layers):
                w.keys[layer][s] = w.keys[layer][s][:, :0]
                w.values[layer][s] = w.values[layer][s][:, :0]
        if b is None:
            w.stored, w.step = set(), None

    @rule(how=st.sampled_from(["deepcopy", "copy", "pickle"]))
    def copy_cache(self, how):
        """A copy at any point (mid-step too): the copy goes on with a model of its own."""
        c = self.world.cache
        event(f"copy {how}{' mid-step' if self.world.stored else ''}")
        if how == "pickle":
            import pickle

            other = pickle.loads(pickle.dumps(c))
        else:
            other = (copy.deepcopy if how == "deepcopy" else copy.copy)(c)
        self.other = self.world.copy_model(other)

    @precondition(lambda self: self.library == "torch")
    @rule()
    def share_memory(self):
        """torch: the buffers moved to shared memory (new allocations) at any point."""
        self.world.cache.k.share_memory_()
        self.world.cache.v.share_memory_()

    @precondition(lambda self: self.other is not None)
    @rule()
    def switch(self):
        """Go on with the other cache (the copy, or the original after a switch)."""
        self.world, self.other = self.other, self.world

    @precondition(lambda self: hasattr(self, "world"))
    @invariant()
    def matches_model(self):
        self.world.check()
        if self.other is not None:
            self.other.check()


KVCacheLayerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_kvcache_layer_machine = KVCacheLayerMachine.TestCase


class KVCacheLayerMachineTriton(KVCacheLayerMachine):
    TRITON = True


@pytest.mark.slow
def test_kvcache_layer_machine_triton():
    """The layer machine with torch caches' attend() through the triton kernel (on CPU tensors,
    under Triton's interpreter where no GPU is: ~0.25 s a call)."""
    pytest.importorskip("triton")
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        KVCacheLayerMachineTriton, settings=settings(max_examples=60, stateful_step_count=20, deadline=None)
    )


@pytest.mark.slow
def test_kvcache_layer_machine_long():
    """The layer machine's longer hunt (``-m slow``)."""
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        KVCacheLayerMachine, settings=settings(max_examples=1500, stateful_step_count=40, deadline=None)
    )
