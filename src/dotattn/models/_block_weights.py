"""Float32 weight matrices kept as the integer blocks their values are made of, exactly.

A decode step multiplies one token row by every weight matrix once, so its time is the time
to stream the weights from memory (docs/models.md: ≈ 24 ms a step for SmolLM2-135M's 540 MB
of float32 weights, near the two cores' ≈ 23 GB/s).  The GGUF file's weights are quantized:
``gguf.quants.dequantize`` turns each block of 32 values into float32 as ``d·q + m`` (Q4_1:
``q`` in 0…15, ``d`` and ``m`` float16) or ``d·q`` (Q8_0: ``q`` in −127…127).  Such a matrix
holds far less than 32 bits a value, and this module finds that structure again *in the
float32 values* — it never reads the file's bytes (the quant formats stay gguf's business):

- per block of :data:`BLOCK` consecutive values of a row, a scale ``d``, an offset ``m``
  (0 for the symmetric form) and int8 codes ``q``;
- accepted only if ``float32(d·q) + m`` gives back **every value bit for bit** (the same
  two float32 roundings as gguf's own dequantization: ``d·q`` is exact, the sum rounds
  once), otherwise the matrix stays plain float32 (:func:`exact_blocks` returns None).

So the blocks are a lossless encoding of the same float32 weights, 1.25 bytes a value
instead of 4, and ``kernels/_cpu_model_ops.gemv_blocks`` multiplies by exactly those values
(its sums group the products by block: different rounding of the sum, not of the weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..kernels._cpu_model_ops import BLOCK, block_codes  # BLOCK: GGUF's Q4_0/Q4_1/Q8_0 block length

# the block forms tried, as (levels, symmetric): Q8_0's signed codes ±127 with no offset,
# then Q4_1's codes 0…15 above the block's minimum
_FORMS = ((127, True), (15, False))


@dataclass(frozen=True)
class BlockWeights:
    """``w[o, b·BLOCK + j] = float32(scale[o, b] · codes[o, b·BLOCK + j]) + offset[o, b]``, exactly."""

    codes: np.ndarray  # int8 (O, I)
    scale: np.ndarray  # float32 (O, I // BLOCK)
    offset: np.ndarray | None  # float32 (O, I // BLOCK), None where every offset is 0

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def to_float32(self) -> np.ndarray:
        """The float32 matrix, rebuilt as gguf's dequantization computes it."""
        O, I = self.codes.shape
        q = self.codes.reshape(O, I // BLOCK, BLOCK).astype(np.float32)
        w = self.scale[:, :, None] * q
        if self.offset is not None:
            w += self.offset[:, :, None]
        return w.reshape(O, I)


def exact_blocks(w: np.ndarray) -> BlockWeights | None:
    """``w`` (float32 ``(O, I)``, ``I`` a multiple of :data:`BLOCK`) as :class:`BlockWeights`,
    or None when no tried form rebuilds every value exactly (then the caller keeps ``w``)."""
    return encode_matrices([w])[0]


def encode_matrices(matrices: list[np.ndarray]) -> list[BlockWeights | None]:
    """:func:`exact_blocks` of each matrix (None where it does not apply), their codes, scales
    and offsets laid out in three buffers in the order given — the order a decode step reads
    them, as for the float32 weights: one allocation this large gets NumPy's huge-page
    advice, and a step streams each buffer front to back (read from separate 4 KiB-paged
    arrays, the product ran at 1.8 G weights/s on one core against 4.2 from one buffer)."""
    from ..kernels._launch import num_threads, run_chunks

    chunks = num_threads()  # the rows split between the caller and the pool's threads
    failed = np.zeros(chunks, np.int64)

    fits = [m.dtype == np.float32 and m.ndim == 2 and m.shape[1] % BLOCK == 0 and m.size > 0 for m in matrices]
    n_codes = sum(m.size for m, ok in zip(matrices, fits) if ok)
    n_blocks = n_codes // BLOCK
    codes_buf = np.empty(n_codes, np.int8)
    scale_buf = np.empty(n_blocks, np.float32)
    offset_buf = np.empty(n_blocks, np.float32)
    result: list[BlockWeights | None] = []
    at = 0
    for m, ok in zip(matrices, fits):
        if not ok or not np.isfinite(m).all():
            result.append(None)
            continue
        O, I = m.shape
        codes = codes_buf[at : at + m.size].reshape(O, I)
        scale = scale_buf[at // BLOCK : (at + m.size) // BLOCK].reshape(O, I // BLOCK)
        offset = offset_buf[at // BLOCK : (at + m.size) // BLOCK].reshape(O, I // BLOCK)
        w = np.ascontiguousarray(m)
        for levels, symmetric in _FORMS:
            run_chunks(block_codes, (w, levels, symmetric, codes, scale, offset, failed), chunks)
            if not failed[:chunks].any():
                result.append(BlockWeights(codes, scale, None if symmetric else offset))
                at += m.size
                break
        else:
            result.append(None)  # its slice of the buffers is reused by the next matrix
    return result
