"""KVCache as a state machine (hypothesis): random runs of decode steps over every layer, stores
of padded prompts, resets of one sequence or all, on contiguous and paged caches (a pool that
can run out), checked after every step against a model that keeps each (layer, sequence)'s
tokens in Python lists — outputs against float64 attention over the model's tokens, the
lengths, the pages (held, free, never shared), and refused steps changing nothing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
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
                if c.page_size is None:
                    got_k, got_v = kbuf[b, :, :n], vbuf[b, :, :n]
                else:
                    idx = np.arange(n)
                    pages = c.block_table[b, idx // c.page_size]
                    got_k = kbuf[pages, :, idx % c.page_size].swapaxes(0, 1)
                    got_v = vbuf[pages, :, idx % c.page_size].swapaxes(0, 1)
                assert np.array_equal(got_k, self.keys[layer][b]) and np.array_equal(got_v, self.values[layer][b])


KVCacheMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=12, deadline=None)
test_kvcache_state_machine = KVCacheMachine.TestCase
