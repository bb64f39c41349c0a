"""Tiny Llama GGUF files written with the ``gguf`` package, for the loader's checks.

A byte-level vocabulary (256 byte tokens and three special ones), one or two layers of random
float32 weights (the projections optionally quantized by gguf: ``quant="Q8_0"``/``"Q4_1"``),
and metadata any test can override, drop or retype — so a file with a 0-head attention, a
string context length, a norm of the wrong shape or a NaN block scale takes milliseconds to
make, where the real model's file is 100 MB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# the matrices ``write(quant=...)`` quantizes (per layer)
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

# ChatML, as SmolLM2's template writes it (without its default system message)
TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_vocab() -> list[str]:
    """GPT-2's byte-to-unicode table: the 256 byte tokens of a byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@dataclass(frozen=True)
class Quantized:
    """A tensor's GGML blocks as written: ``data`` uint8 ``(rows, bytes a row)`` of type ``kind``."""

    kind: str  # a gguf.GGMLQuantizationType name: "Q8_0", "Q4_1", ...
    data: np.ndarray


def quantize(array: np.ndarray, kind: str = "Q8_0", *, scale: float | None = None, offset: float | None = None,
             block: int = 0) -> Quantized:
    """``array`` (float32, rows a multiple of 32 long) quantized by ``gguf.quants.quantize``;
    ``scale``/``offset``: the float16 scale ``d``/offset ``m`` of block ``block`` (counted
    row-major over the whole tensor) overwritten (e.g. with NaN).  Q8_0's blocks are ``d`` then
    32 int8 codes, Q4_0's ``d`` then 16 bytes, Q4_1's ``d``, ``m`` then 16 bytes."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    data = gguf.quants.quantize(np.ascontiguousarray(array, np.float32), qtype)
    if scale is not None or offset is not None:
        _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        flat = data.reshape(-1, block_bytes)
        if scale is not None:
            flat[block, 0:2] = np.array([scale], np.float16).view(np.uint8)
        if offset is not None:
            if kind != "Q4_1":
                raise ValueError(f"{kind} blocks have no offset")
            flat[block, 2:4] = np.array([offset], np.float16).view(np.uint8)
    return Quantized(kind, data)


def write(
    path: Path,
    *,
    context: int = 16,
    hidden: int = 32,
    heads: int = 2,
    kv_heads: int = 1,
    ffn: int = 64,
    layers: int = 1,
    metadata: dict | None = None,
    drop: tuple[str, ...] = (),
    tensors: dict | None = None,
    template: str | None = TEMPLATE,
    quant: str | None = None,
) -> Path:
    """A Llama GGUF at ``path``.  ``metadata``: ``{key: (type, value)}`` (type ``"u32"``,
    ``"f32"`` or ``"str"``) replacing or adding ``llama.*`` keys; ``drop``: metadata keys or
    tensor names left out; ``tensors``: arrays (or :func:`quantize`'s blocks) replacing the
    random ones by name; ``quant``: the layers' projection matrices (:data:`PROJECTIONS`)
    written as this GGML type (``"Q8_0"``, ``"Q4_1"``), quantized by gguf."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    keys = {
        "llama.context_length": ("u32", context),
        "llama.embedding_length": ("u32", hidden),
        "llama.block_count": ("u32", layers),
        "llama.feed_forward_length": ("u32", ffn),
        "llama.attention.head_count": ("u32", heads),
        "llama.attention.head_count_kv": ("u32", kv_heads),
        "llama.attention.layer_norm_rms_epsilon": ("f32", 1e-5),
        "llama.rope.freq_base": ("f32", 10000.0),
    } | (metadata or {})
    add = {"u32": writer.add_uint32, "f32": writer.add_float32, "str": writer.add_string}
    for key, (kind, value) in keys.items():
        if key not in drop:
            add[kind](key, value)
    tokens = _byte_vocab() + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    writer.add_tokenizer_model("gpt2")
    if "tokenizer.ggml.tokens" not in drop:
        writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 3, 3])
    writer.add_eos_token_id(258)
    if template is not None:
        writer.add_chat_template(template)
    rng = np.random.default_rng(0)
    head_dim = hidden // heads

    def tensor(name: str, shape: tuple[int, ...]) -> None:
        if name in drop:
            return
        if tensors and name in tensors:
            array = tensors[name]
        elif name.endswith("norm.weight"):
            array = np.ones(shape, np.float32)
        else:
            array = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if quant is not None and not isinstance(array, Quantized) and name.split(".")[-2] in PROJECTIONS:
            array = quantize(array, quant)
        if isinstance(array, Quantized):
            writer.add_tensor(name, array.data, raw_dtype=gguf.GGMLQuantizationType[array.kind])
        else:
            writer.add_tensor(name, array)

    tensor("token_embd.weight", (len(tokens), hidden))
    tensor("output_norm.weight", (hidden,))
    for i in range(layers):
        b = f"blk.{i}."
        tensor(b + "attn_norm.weight", (hidden,))
        tensor(b + "ffn_norm.weight", (hidden,))
        tensor(b + "attn_q.weight", (heads * head_dim, hidden))
        tensor(b + "attn_k.weight", (kv_heads * head_dim, hidden))
        tensor(b + "attn_v.weight", (kv_heads * head_dim, hidden))
        tensor(b + "attn_output.weight", (hidden, heads * head_dim))
        tensor(b + "ffn_gate.weight", (ffn, hidden))
        tensor(b + "ffn_up.weight", (ffn, hidden))
        tensor(b + "ffn_down.weight", (hidden, ffn))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
