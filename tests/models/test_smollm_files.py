"""SmolLM's loader and arguments on tiny Llama GGUF files (``tiny_gguf.py``): every file fault
named at load, by the key or tensor at fault, and the checks that need no real model.

An audit (6 Dec) found files that loaded and then read past their arrays (a norm of the wrong
shape), failed with raw ZeroDivisionError/KeyError/jinja2 errors, or calls that did
(``logits`` past the context; a tiny temperature's NaN).  The real model's own checks are in
``test_smollm.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

pytest.importorskip("gguf", reason="the 'models' extra is not installed")
pytest.importorskip("jinja2", reason="the 'models' extra is not installed")
pytest.importorskip("tokenizers", reason="the 'models' extra is not installed")

import tiny_gguf  # noqa: E402

from dotattn.errors import AttentionTypeError, AttentionValueError  # noqa: E402
from dotattn.models import SmolLM  # noqa: E402
from dotattn.models.smollm import _sample  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> SmolLM:
    return SmolLM(tiny_gguf.write(tmp_path_factory.mktemp("tiny") / "tiny.gguf", context=64))


def test_a_tiny_model_loads_and_generates(tiny):
    ids = tiny.generate_ids([1, 2, 3], max_new_tokens=3, stop_at_eos=False)
    assert len(ids) == 3 and all(0 <= t < 259 for t in ids)
    logits = tiny.logits([1, 2, 3])
    assert logits.shape == (3, 259) and np.isfinite(logits).all()
    # the last row is the first greedy token's logits
    assert int(np.argmax(logits[-1])) == ids[0]


BAD_FILES = [
    # (id, writer arguments, words of the message)
    ("head-count-0", dict(metadata={"llama.attention.head_count": ("u32", 0)}), ["llama.attention.head_count", "≥ 1", "0"]),
    ("kv-heads-0", dict(metadata={"llama.attention.head_count_kv": ("u32", 0)}), ["head_count_kv", "≥ 1"]),
    ("kv-heads-not-dividing", dict(heads=2, kv_heads=1, metadata={"llama.attention.head_count_kv": ("u32", 3)}),
     ["2 query heads are not a multiple of 3 K/V heads"]),
    ("odd-head-dim", dict(hidden=30, heads=2), ["even head dim"]),
    ("context-0", dict(metadata={"llama.context_length": ("u32", 0)}), ["llama.context_length", "≥ 1"]),
    ("context-a-str", dict(metadata={"llama.context_length": ("str", "8k")}), ["llama.context_length", "an int", "'8k'"]),
    ("blocks-0", dict(metadata={"llama.block_count": ("u32", 0)}), ["llama.block_count", "≥ 1"]),
    ("eps-a-str", dict(metadata={"llama.attention.layer_norm_rms_epsilon": ("str", "1e-5")}),
     ["layer_norm_rms_epsilon", "a finite number"]),
    ("eps-0", dict(metadata={"llama.attention.layer_norm_rms_epsilon": ("f32", 0.0)}), ["layer_norm_rms_epsilon", "> 0"]),
    ("rope-base-nan", dict(metadata={"llama.rope.freq_base": ("f32", float("nan"))}), ["rope.freq_base", "finite"]),
    ("no-vocabulary", dict(drop=("tokenizer.ggml.tokens",)), ["tokenizer.ggml.tokens"]),
    ("norm-shape", dict(tensors={"blk.0.attn_norm.weight": np.ones(7, np.float32)}),
     ["blk.0.attn_norm.weight has shape (7,)", "(32,)"]),
    ("output-norm-shape", dict(tensors={"output_norm.weight": np.ones(3, np.float32)}), ["output_norm.weight has shape (3,)"]),
    ("ffn-norm-missing", dict(drop=("blk.0.ffn_norm.weight",)), ["lacks the tensor 'blk.0.ffn_norm.weight'"]),
    ("template-syntax", dict(template="{% for %}"), ["chat template", "does not compile", "TemplateSyntaxError"]),
]


@pytest.mark.parametrize("name,kwargs,words", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_faulty_file_is_refused_at_load_by_name(tmp_path, name, kwargs, words):
    path = tiny_gguf.write(tmp_path / f"{name}.gguf", **kwargs)
    with pytest.raises(AttentionValueError) as info:
        SmolLM(path)
    message = str(info.value)
    assert str(path) in message or "tokenizer" in message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"


def test_a_template_that_fails_on_the_messages_names_the_file(tmp_path):
    path = tiny_gguf.write(tmp_path / "t.gguf", template="{{ messages[0].foo.bar }}")
    model = SmolLM(path)
    with pytest.raises(AttentionValueError, match=r"chat template of GGUF file .* failed on these messages: UndefinedError"):
        model.generate("hi", max_new_tokens=1)
    assert model.generate_ids([1, 2], max_new_tokens=1, stop_at_eos=False)  # the model still runs


def test_logits_past_the_context_are_refused(tiny):
    """Positions past the context have no rotary-table rows (the kernel does not check): refused,
    as generate_ids refuses a prompt that would pass it."""
    assert tiny.logits(list(range(64))).shape == (64, 259)
    with pytest.raises(AttentionValueError, match="ids has 65 tokens, more than the model's context of 64"):
        tiny.logits(list(range(65)))


@pytest.mark.parametrize("temperature", [1e-310, 5e-324, 1e-30])
def test_a_tiny_temperature_samples_the_argmax_without_nan(temperature):
    logits = np.array([0.5, 3.0, -1.0, 3.0 - 1e-6], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        token = _sample(logits, temperature, 1.0, np.random.default_rng(0))
    assert token == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _sample(logits, temperature, 0.5, np.random.default_rng(0)) == 1


def test_a_tiny_temperature_generates(tiny):
    greedy = tiny.generate_ids([5, 6, 7], max_new_tokens=3, stop_at_eos=False)
    assert tiny.generate_ids([5, 6, 7], max_new_tokens=3, temperature=1e-310, seed=0, stop_at_eos=False) == greedy


def test_constructor_arguments_are_checked_before_the_file(tmp_path):
    with pytest.raises(AttentionTypeError, match="path must be None, a str or a path-like object, got int"):
        SmolLM(123)
    with pytest.raises(AttentionTypeError, match="got bytes"):
        SmolLM(b"/tmp/x.gguf")
    with pytest.raises(AttentionValueError, match="got an empty str"):
        SmolLM("")
    with pytest.raises(AttentionValueError, match="implementation must be None or one of"):
        SmolLM(tmp_path / "never-read.gguf", implementation="bogus")
    with pytest.raises(AttentionTypeError, match="implementation must be None or a str"):
        SmolLM(tmp_path / "never-read.gguf", implementation=5)


@pytest.mark.parametrize("implementation", ["jax", "triton"])
def test_implementation_names_smollms_own_choices(tmp_path, implementation):
    """A dotattn backend that cannot run the model's NumPy arrays is refused in SmolLM's terms:
    the message was attention_with_kvcache's ("... for attention_with_kvcache", or for "triton"
    "these are NumPy arrays"), and the docs promised a backend "for the prompt pass"."""
    with pytest.raises(AttentionValueError, match=(
        r"implementation must be None or one of 'cpu', 'numpy', 'reference' \(the dotattn backend of the "
        r"prompt pass's attention and of the decode steps; SmolLM runs NumPy arrays\), got '" + implementation
    )):
        SmolLM(tmp_path / "never-read.gguf", implementation=implementation)


def test_decode_checks_its_ids(tiny):
    assert tiny.decode([72, 105]) == tiny.decode(np.array([72, 105]))
    with pytest.raises(AttentionValueError, match=r"ids\[0\] = -1 is not a token id in \[0, 259\)"):
        tiny.decode([-1])
    with pytest.raises(AttentionValueError, match=r"ids\[1\] = 1000000000 is not a token id"):
        tiny.decode([1, 10**9])
    with pytest.raises(AttentionTypeError, match=r"ids\[0\] must be an int token id, got float"):
        tiny.decode([1.5])
    with pytest.raises(AttentionTypeError, match="ids must be a sequence of int token ids, got str"):
        tiny.decode("ab")
    with pytest.raises(AttentionTypeError, match="got NoneType"):
        tiny.decode(None)


def test_argument_messages_name_what_is_wrong(tiny):
    with pytest.raises(AttentionValueError, match="ids must hold at least one token id, got an empty sequence"):
        tiny.generate_ids([])
    with pytest.raises(AttentionValueError, match=r"ids\[1\] must hold at least one token id"):
        tiny.generate_ids([[1], []])
    with pytest.raises(AttentionTypeError, match=r"ids\[0\] is an id but ids\[1\] is a list"):
        tiny.generate_ids([1, [2, 3]])
    with pytest.raises(AttentionTypeError, match=r"ids\[0\] is a list but ids\[1\] is a int"):
        tiny.generate_ids([[1, 2], 3])
    with pytest.raises(AttentionTypeError, match=r"prompt mixes messages \(dicts\) with other items \(prompt\[1\] is a str\)"):
        tiny.generate([{"role": "user", "content": "hi"}, "hi"])
    # NumPy's bools are bools
    assert tiny.generate_ids([1, 2], max_new_tokens=2, stop_at_eos=np.False_) == tiny.generate_ids(
        [1, 2], max_new_tokens=2, stop_at_eos=False
    )
    pieces = tiny.generate("hi", max_new_tokens=2, stream=np.True_)
    assert "".join(pieces) == tiny.generate("hi", max_new_tokens=2)


# ---- non-finite weights: refused at load, by the GGUF tensor's name ---------------------------
def _with(shape, at, value) -> np.ndarray:
    a = np.full(shape, 0.1, np.float32)
    a[at] = value
    return a


_rng = np.random.default_rng(7)
_V = _rng.standard_normal((16, 32)).astype(np.float32)  # blk.0.attn_v.weight (kv_heads·D, hidden)
_DOWN = _rng.standard_normal((32, 64)).astype(np.float32)  # blk.0.ffn_down.weight (hidden, ffn)
_UP = _rng.standard_normal((64, 32)).astype(np.float32)  # blk.0.ffn_up.weight (ffn, hidden)

NON_FINITE_FILES = [
    # (id, writer arguments, tensor named, words of the message)
    ("norm-nan", dict(tensors={"blk.0.ffn_norm.weight": _with((32,), 5, np.nan)}), "blk.0.ffn_norm.weight",
     ["(F32)", "got 1 NaN/±inf value of 32 (1 NaN, 0 ±inf)", "the first at [5] of its (32,) values: nan"]),
    ("output-norm-inf", dict(tensors={"output_norm.weight": _with((32,), 31, -np.inf)}), "output_norm.weight",
     ["got 1 NaN/±inf value of 32 (0 NaN, 1 ±inf)", "[31]", "-inf"]),
    ("embedding-inf", dict(tensors={"token_embd.weight": _with((259, 32), (3, 4), np.inf)}), "token_embd.weight",
     ["got 1 NaN/±inf value of 8288", "the first at [3, 4] of its (259, 32) values: inf"]),
    ("embedding-nan", dict(tensors={"token_embd.weight": _with((259, 32), (258, 0), np.nan)}), "token_embd.weight",
     ["(1 NaN, 0 ±inf)", "[258, 0]"]),
    ("f32-projection-nan", dict(tensors={"blk.0.attn_q.weight": _with((32, 32), (2, 7), np.nan)}), "blk.0.attn_q.weight",
     ["[2, 7]"]),
    # quantized projections: a block's float16 scale (or Q4_1 offset) NaN/inf dequantizes to 32
    # non-finite values (block 3 of attn_v's 32-wide rows is row 3)
    ("q8_0-scale-nan", dict(quant="Q8_0", tensors={"blk.0.attn_v.weight": tiny_gguf.quantize(_V, scale=np.nan, block=3)}),
     "blk.0.attn_v.weight", ["(Q8_0)", "got 32 NaN/±inf values of 512", "the first at [3, 0] of its (16, 32) dequantized",
                             "a Q8_0 block's scale or offset is NaN or ±inf"]),
    ("q8_0-scale-inf", dict(quant="Q8_0", tensors={"blk.0.ffn_down.weight": tiny_gguf.quantize(_DOWN, scale=np.inf, block=3)}),
     "blk.0.ffn_down.weight", ["(Q8_0)", "got 32 NaN/±inf values of 2048", "[1, 32]"]),
    ("q4_1-offset-inf", dict(quant="Q4_1", tensors={"blk.0.ffn_up.weight": tiny_gguf.quantize(_UP, "Q4_1", offset=-np.inf, block=5)}),
     "blk.0.ffn_up.weight", ["(Q4_1)", "got 32 NaN/±inf values of 2048", "[5, 0]"]),
    ("q4_1-scale-nan", dict(quant="Q4_1", tensors={"blk.0.ffn_up.weight": tiny_gguf.quantize(_UP, "Q4_1", scale=np.nan)}),
     "blk.0.ffn_up.weight", ["(32 NaN, 0 ±inf)", "[0, 0]"]),
]


@pytest.mark.parametrize("name,kwargs,tensor,words", NON_FINITE_FILES, ids=[c[0] for c in NON_FINITE_FILES])
@pytest.mark.parametrize("decode_weights", ["blocks", "float32"])
def test_non_finite_weights_are_refused_at_load_by_tensor(tmp_path, name, kwargs, tensor, words, decode_weights):
    path = tiny_gguf.write(tmp_path / f"{name}.gguf", **kwargs)
    with pytest.raises(AttentionValueError) as info:
        SmolLM(path, decode_weights=decode_weights)
    message = str(info.value)
    assert f"GGUF file {str(path)!r}: tensor {tensor!r}" in message, message
    assert "must hold finite weights" in message, message
    for word in words:
        assert word in message, f"{word!r} not in: {message}"


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_1"])
def test_a_finite_quantized_file_loads_with_block_weights(tmp_path, quant):
    model = SmolLM(tiny_gguf.write(tmp_path / f"{quant}.gguf", quant=quant, context=32))
    layer = model.w["layers"][0]
    # every projection of the layer is read as its block codes by the decode steps
    assert all(id(layer[k]) in model._mm._blocks for k in ("qkv", "o", "gate_up", "down"))
    assert np.isfinite(model.logits([1, 2, 3])).all()
    ids = model.generate_ids([1, 2, 3], max_new_tokens=3, stop_at_eos=False)
    assert len(ids) == 3 and all(0 <= t < 259 for t in ids)


@pytest.mark.parametrize(
    "matrix,row,block,field,tensor,where",
    [
        # (the matrices in encode order: qkv, o, gate_up, down, head)
        (1, 0, 0, "scale", "blk.0.attn_output.weight", "block 0 of row 0"),
        (2, 64 + 9, 0, "scale", "blk.0.ffn_up.weight", "block 0 of row 9"),  # gate_up: rows 64… are up's
        (0, 32 + 3, 0, "offset", "blk.0.attn_k.weight", "block 0 of row 3"),  # qkv: q 32 rows, k 16, v 16
        (0, 63, 0, "scale", "blk.0.attn_v.weight", "block 0 of row 15"),
        (3, 31, 1, "offset", "blk.0.ffn_down.weight", "block 1 of row 31"),  # down: 64 wide, two blocks a row
    ],
)
def test_non_finite_decode_blocks_are_refused_by_tensor(tmp_path, monkeypatch, matrix, row, block, field, tensor, where):
    """The block form the decode steps read (codes, scales, offsets) is checked too, by the
    tensor its rows come from.  Finite weights cannot encode to non-finite blocks, so the
    encoder's output is spoiled here."""
    from dotattn.models import _block_weights

    encode = _block_weights.encode_matrices

    def spoiled(matrices):
        out = encode(matrices)
        blocks = out[matrix]
        assert blocks is not None and blocks.offset is not None  # Q4_1: offsets kept
        getattr(blocks, field)[row, block] = np.nan if field == "scale" else np.inf
        return out

    monkeypatch.setattr(_block_weights, "encode_matrices", spoiled)
    path = tiny_gguf.write(tmp_path / "q.gguf", quant="Q4_1")
    with pytest.raises(AttentionValueError) as info:
        SmolLM(path)
    message = str(info.value)
    assert f"GGUF file {str(path)!r}: tensor {tensor!r} must hold finite weights" in message, message
    assert "got 1 non-finite block scale or offset in the form the decode steps read" in message, message
    assert f"(the first: {where})" in message, message
    monkeypatch.undo()
    assert SmolLM(path).generate_ids([1, 2], max_new_tokens=2, stop_at_eos=False)  # the file itself is fine
