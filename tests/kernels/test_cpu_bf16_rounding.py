"""The kernels' float32 → bfloat16 rounding (``_cpu_primitives._round_to_bf16`` and its padded-row
form), bit for bit against ml_dtypes — NaNs included: rounding a NaN's bits used to turn a payload
held in the low half into +inf and wrap 0x7FFFFFFF to −0.0."""

from __future__ import annotations

import ml_dtypes
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dotattn.kernels._cpu_primitives import _round_to_bf16, _round_to_bf16_rows

SPECIAL = [0x7F800001, 0x7F80FFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0xFF800001, 0x7FC00000, 0xFFC00000,
           0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x80008000, 0x3F808000, 0x3F818000]


def _expected(bits: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # NaNs are converted on purpose
        return bits.view(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)


def _check(bits: np.ndarray, got: np.ndarray) -> None:
    want = _expected(bits)
    nan = np.isnan(bits.view(np.float32))
    got_f = got.view(ml_dtypes.bfloat16).astype(np.float32)
    assert np.isnan(got_f[nan]).all(), [hex(b) for b in bits[nan][~np.isnan(got_f[nan])]]
    assert (np.signbit(got_f[nan]) == np.signbit(bits.view(np.float32)[nan])).all()
    np.testing.assert_array_equal(got[~nan], want[~nan])


def test_special_values():
    bits = np.array(SPECIAL, dtype=np.uint32)
    out = np.empty(bits.size, dtype=np.uint16)
    _round_to_bf16(bits.view(np.float32), out)
    _check(bits, out)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=70), st.integers(0, 5))
def test_any_bits_flat_and_padded_rows(words, pad):
    bits = np.array(words, dtype=np.uint32)
    out = np.empty(bits.size, dtype=np.uint16)
    _round_to_bf16(bits.view(np.float32), out)
    _check(bits, out)
    # the padded-row form: two rows of the words, each row with `pad` unused elements after it
    n = bits.size
    x = np.full((2, n + pad), np.nan, dtype=np.float32)
    x[:, :n] = bits.view(np.float32)
    o = np.zeros((2, n + pad), dtype=np.uint16)
    _round_to_bf16_rows(x[:, :n], o[:, :n])
    for r in range(2):
        _check(bits, o[r, :n])
    assert (o[:, n:] == 0).all()  # nothing written past a row's end
