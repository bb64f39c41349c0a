"""The float32 / bfloat16 forward's tiles for packed documents (``cpu.document_block_size``) and windows.

Documents whose boundaries fall on 256s take 256 × 256 tiles (every tile then lies inside one
document or outside it: FULL or SKIP, no masked scores); others, and every window, causal or
dense-masked call, keep their tiles (docs/performance-log.md, "Packed documents: tiles from the
segment ids").
"""

from __future__ import annotations

import numpy as np
import pytest

from dotattn import semantics
from dotattn.kernels import cpu
from dotattn.semantics import BFLOAT16
from dotattn.kernels._cpu_options import FULL, PARTIAL, SKIP

import helpers as H

WIDE, NARROW = cpu.DOCUMENT_FORWARD_BLOCK_SIZE, cpu.SPARSE_BLOCK_SIZE


def _call(L=4096, lengths=None, dtype=np.float32, B=1, **options):
    q = np.zeros((B, 1, L, 8), dtype=dtype)
    if lengths is not None:
        seg = np.repeat(np.arange(len(lengths)), lengths)
        assert seg.size == L
        options["segment_ids"] = seg[None].repeat(B, 0)
    return semantics.normalize(q, q, q, **options)


@pytest.mark.parametrize(
    "lengths, tiles",
    [
        ([4096], WIDE),
        ([512] * 8, WIDE),
        ([256] * 16, WIDE),
        ([128] * 32, NARROW),
        ([640, 384, 512, 256, 768, 128, 896, 512], NARROW),  # on 128s, not all on 256s
        ([2048, 2048], WIDE),
        ([1000, 3096], NARROW),  # the boundary inside a 256-tile: 7 % more scores than 128 × 128
    ],
    ids=["one", "docs512", "docs256", "docs128", "uneven128", "two_docs", "two_docs_off_256"],
)
def test_document_tiles_follow_the_segment_lengths(lengths, tiles):
    call = _call(lengths=lengths)
    assert cpu._documents_only(call)
    wide = cpu.segment_tile_scores(call.q_segment_ids, call.kv_segment_ids, *WIDE)
    narrow = cpu.segment_tile_scores(call.q_segment_ids, call.kv_segment_ids, *NARROW)
    assert cpu.document_block_size(call) == (WIDE if wide <= narrow * (1 + cpu.DOCUMENT_WIDE_TILE_MAX_EXTRA) else NARROW)
    assert cpu.document_block_size(call) == tiles


def _scores_brute_force(q_seg, k_seg, BQ, BK):
    BQ, BK = cpu.fit_block(BQ, BK, q_seg.shape[1], k_seg.shape[1])
    total = 0
    for b in range(q_seg.shape[0]):
        for i0 in range(0, q_seg.shape[1], BQ):
            for j0 in range(0, k_seg.shape[1], BK):
                qs, ks = q_seg[b, i0 : i0 + BQ], k_seg[b, j0 : j0 + BK]
                total += BQ * BK * (not (qs.max() < ks.min() or ks.max() < qs.min()))
    return total


@pytest.mark.parametrize("order", ["sorted", "unsorted"])
@pytest.mark.parametrize("Lq, Lk", [(4096, 4096), (1000, 700), (40, 3000)])
@pytest.mark.parametrize("tiles", [(128, 128), (256, 256), (64, 128)])
def test_segment_tile_scores_counts_the_tiles_the_kernel_computes(order, Lq, Lk, tiles):
    rng = np.random.default_rng(Lq + Lk)
    q_seg = rng.integers(-5, 9, size=(3, Lq))
    k_seg = rng.integers(-5, 9, size=(3, Lk))
    if order == "sorted":
        q_seg, k_seg = np.sort(q_seg, axis=1), np.sort(k_seg, axis=1)
    assert cpu.segment_tile_scores(q_seg, k_seg, *tiles) == _scores_brute_force(q_seg, k_seg, *tiles)


def test_windows_causal_masks_and_other_dtypes_keep_their_tiles(monkeypatch):
    seen = []
    prepare = cpu.prepare

    def spy(call, block_size=None, **kw):
        seen.append(block_size)
        return prepare(call, block_size, **kw)

    monkeypatch.setattr(cpu, "prepare", spy)
    docs = [512] * 2
    for call, want in [
        (_call(L=1024, lengths=docs), WIDE),
        (_call(L=1024, lengths=[128] * 8), NARROW),
        (_call(L=1024, window=(256, 256)), None),
        (_call(L=1024, window=(16, 16)), None),
        (_call(L=1024, lengths=docs, causal=True), None),
        (_call(L=1024, lengths=docs, window=(256, 256)), None),
        (_call(L=1024, lengths=docs, dtype=np.float64), None),
        (_call(L=1024, lengths=docs, dtype=BFLOAT16), WIDE),
        (_call(L=1024, lengths=[128] * 8, dtype=BFLOAT16), NARROW),
    ]:
        seen.clear()
        cpu.forward(call)
        assert seen[0] == want, (call.window, call.causal, call.dtype)
        assert not cpu._documents_only(call) or want is not None


def test_tiles_inside_one_document_are_full():
    """Every 256 × 256 tile of documents of 512 is FULL (the unmasked path) or SKIP; of documents of 128, some PARTIAL."""
    kernels = cpu.default_kernels()
    for lengths, classes in [([512] * 2, {FULL, SKIP}), ([128] * 8, {PARTIAL, SKIP})]:
        call = _call(L=1024, lengths=lengths)
        p = cpu.prepare(call, WIDE, forward=True)
        got = {int(kernels._tile_class(0, 0, qb, kb, 256, p.options)) for qb in range(4) for kb in range(4)}
        assert got == classes


@pytest.mark.parametrize(
    "lengths", [[256] * 4, [512, 512], [384, 640], [100, 300, 624]], ids=["docs256", "docs512", "on128", "ragged"]
)
def test_wide_document_tiles_match_the_reference(lengths):
    q, k, v = H.random_qkv(3, batch=(2,), Hq=2, Hkv=2, Lq=1024, Lk=1024, D=16, Dv=16, dtype=np.float32)
    seg = np.repeat(np.arange(len(lengths)), lengths)[None].repeat(2, 0)
    call = semantics.normalize(q, k, v, segment_ids=seg)
    ref_out, ref_lse = H.reference(q, k, v, segment_ids=seg)
    naive_out, naive_lse = H.naive(q, k, v, segment_ids=seg)
    for tiles in (WIDE, None):
        out, lse = cpu.forward(call, block_size=tiles)
        H.assert_close_to_reference(out, ref_out, naive_out, name="out")
        H.assert_close_to_reference(lse, ref_lse, naive_lse, name="lse", dtype=np.float32)
    # skipped and unmasked tiles give the bits of the same tiles under the equivalent dense mask
    skipped = cpu.forward(call, block_size=WIDE)
    dense = seg[:, :, None] == seg[:, None, :]
    masked = cpu.forward(semantics.normalize(q, k, v, mask=dense[:, None]), block_size=WIDE)
    for name, a, b in zip(("out", "lse"), skipped, masked):
        H.assert_bitwise_equal(a, b, name)


@pytest.mark.parametrize("lengths", [[256] * 4, [384, 640]], ids=["docs256", "on128"])
def test_wide_document_tiles_match_the_reference_in_bfloat16(lengths):
    q, k, v = H.random_qkv(4, batch=(1,), Hq=2, Hkv=1, Lq=1024, Lk=1024, D=64, Dv=64, dtype=BFLOAT16)
    seg = np.repeat(np.arange(len(lengths)), lengths)[None]
    call = semantics.normalize(q, k, v, segment_ids=seg)
    ref_out, ref_lse = H.reference(q, k, v, segment_ids=seg)
    naive_out, naive_lse = H.naive(q, k, v, segment_ids=seg)
    for tiles in (WIDE, None):
        out, lse = cpu.forward(call, block_size=tiles)
        H.assert_close_to_reference(out.astype(BFLOAT16), ref_out, naive_out, name="out")
        H.assert_close_to_reference(lse, ref_lse, naive_lse, name="lse", dtype=BFLOAT16)
