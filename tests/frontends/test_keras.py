"""``dotattn.keras.MultiHeadAttention`` on every Keras backend installed.

Keras fixes its backend per process (``KERAS_BACKEND``), so each backend runs one lean
subprocess that reports numbers as JSON; the assertions are here.  Per backend: outputs and
attention scores equal ``keras.layers.MultiHeadAttention``'s (same weights through
``set_weights``) with masks, top-left causal and cross-attention; grouped-query attention
equals Keras with its key/value heads repeated; a fully masked row gives 0 before the output
projection (Keras: the mean of V); ``model.fit`` with dropout changes every weight; a
``.keras`` save/load round trip gives the same predictions.  The TensorFlow run also runs
docs/keras.md's examples.  Keras is never imported in the test process itself: it imports
TensorFlow, and TensorFlow before torch in one process aborts it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, os, sys, tempfile
import numpy as np
import keras
from keras import ops
import dotattn.keras as dk

res = {}
rng = np.random.default_rng(0)
B, T, S, E = 2, 7, 9, 16
q = rng.standard_normal((B, T, E)).astype("float32")
v = rng.standard_normal((B, S, E)).astype("float32")
n = lambda x: np.asarray(ops.convert_to_numpy(x), dtype=np.float64)
diff = lambda a, b: float(np.abs(n(a) - n(b)).max())

ref = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8, value_dim=6, output_shape=12)
ours = dk.MultiHeadAttention(num_heads=4, key_dim=8, value_dim=6, output_shape=12)
# Keras 3.15's fused path (no scores) fails on JAX when value_dim != key_dim: use its
# explicit-scores path for the reference throughout.
ref(q, v, return_attention_scores=True)
ours(q, v)
ours.set_weights(ref.get_weights())
mask = rng.random((B, T, S)) < 0.6
mask[..., 0] = True  # every row sees a key (Keras and dotattn differ on empty rows, checked below)
qq = q[:, :, :]
for name, args, kw in [
    ("cross", (q, v), {}),
    ("cross+mask", (q, v), dict(attention_mask=mask)),
    ("cross+causal", (q, v), dict(use_causal_mask=True)),
    ("self+causal+mask", (q, q), dict(use_causal_mask=True, attention_mask=mask[:, :, :T])),
]:
    a, sa = ref(*args, return_attention_scores=True, **kw)
    b, sb = ours(*args, return_attention_scores=True, **kw)
    res[name] = [diff(a, b), diff(sa, sb), float(np.abs(n(a)).max())]
res["no-scores"] = [diff(ref(q, v, use_causal_mask=True, return_attention_scores=True)[0], ours(q, v, use_causal_mask=True))]

empty = mask.copy()
empty[0, 3] = False
out = n(ours(q, v, attention_mask=empty))
res["empty_row_is_output_bias"] = float(np.abs(out[0, 3] - n(ours.get_weights()[-1])).max())

# grouped-query attention = Keras with each key/value head repeated over its group
gqa = dk.MultiHeadAttention(num_heads=4, key_dim=8, num_kv_heads=2)
gqa(q, v)
full = keras.layers.MultiHeadAttention(num_heads=4, key_dim=8)
full(q, v)
w = gqa.get_weights()
res["gqa_shapes"] = [list(x.shape) for x in w]
rep = lambda x, axis: np.repeat(x, 2, axis=axis)
full.set_weights([w[0], w[1], rep(w[2], 1), rep(w[3], 0), rep(w[4], 1), rep(w[5], 0), w[6], w[7]])
res["gqa"] = [diff(gqa(q, v, use_causal_mask=True), full(q, v, use_causal_mask=True))]

# training (dropout, GQA, window) and a .keras round trip
inp = keras.Input((T, E))
x = dk.MultiHeadAttention(4, 8, num_kv_heads=2, dropout=0.2, window=(4, None), softcap=20.0,
                          alibi_slopes=[0.5, 0.25, 0.125, 0.0625], seed=3)(inp, inp, use_causal_mask=True)
model = keras.Model(inp, keras.layers.Dense(1)(x))
model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
before = [np.array(t) for t in model.get_weights()]
y = rng.standard_normal((B, T, 1)).astype("float32")
hist = model.fit(q, y, epochs=3, batch_size=1, verbose=0)
res["fit_loss"] = [float(l) for l in hist.history["loss"]]
res["all_weights_moved"] = all(not np.allclose(a, b) for a, b in zip(before, model.get_weights()))
path = os.path.join(tempfile.mkdtemp(), "m.keras")
model.save(path)
again = keras.models.load_model(path)
res["reload"] = diff(model.predict(q, verbose=0), again.predict(q, verbose=0))
res["reload_config"] = again.layers[1].get_config()["window"]

errors = []  # bad constructor arguments: (type, message) per case
for kw in (dict(num_kv_heads=3), dict(window=(-1, 0)), dict(softcap=0.0), dict(alibi_slopes=[0.5, 0.25]),
           dict(attention_axes=(1, 2))):
    try:
        dk.MultiHeadAttention(4, 8, **kw)
        errors.append([False, "no error"])
    except Exception as exc:
        errors.append([isinstance(exc, ValueError), str(exc)])
res["errors"] = errors

docs = os.environ.get("DOTATTN_KERAS_DOCS")
if docs and keras.config.backend() == "tensorflow":  # docs/keras.md's blocks, in order, as a reader runs them
    import contextlib, io, re
    blocks = re.findall(r"^```python\n(.*?)^```", open(docs, encoding="utf-8").read(), flags=re.DOTALL | re.MULTILINE)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        namespace = {"__name__": "docs"}
        for number, block in enumerate(blocks, 1):
            exec(compile(block, f"<docs/keras.md python block {number}>", "exec"), namespace)
    res["docs"] = printed.getvalue()
print("RESULT" + json.dumps(res), flush=True)
# A TensorFlow-backend run of this script hung in interpreter teardown after printing its
# results (cause not found yet); the results are out, so leave without the teardown.
os._exit(0)
"""


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.heavy
@pytest.mark.parametrize("backend", ["jax", "tensorflow", "torch"])
def test_keras_layer_matches_keras_trains_and_round_trips(backend):
    pytest.importorskip("keras")
    if not _available(backend):
        pytest.skip(f"{backend} is not installed")
    docs = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "keras.md")
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", DOTATTN_KERAS_DOCS=docs)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    res = json.loads(lines[-1][len("RESULT"):])
    for name in ("cross", "cross+mask", "cross+causal", "self+causal+mask"):
        out_err, score_err, biggest = res[name]
        assert out_err <= 2e-6 * max(1.0, biggest), (name, res[name])
        assert score_err <= 2e-6, (name, res[name])
    assert res["no-scores"][0] <= 2e-6
    assert res["empty_row_is_output_bias"] <= 1e-6
    assert res["gqa_shapes"] == [[16, 4, 8], [4, 8], [16, 2, 8], [2, 8], [16, 2, 8], [2, 8], [4, 8, 16], [16]]
    assert res["gqa"][0] <= 2e-6
    losses = res["fit_loss"]
    assert all(map(lambda x: x == x and abs(x) < 1e6, losses)), losses
    assert res["all_weights_moved"]
    assert res["reload"] <= 1e-6
    assert res["reload_config"] == [4, None]
    expected = [
        "num_heads=4 must be a multiple of num_kv_heads=3",
        "window left side must be ≥ 0 or None, got -1",
        "softcap must be > 0 or None",
        "alibi_slopes must hold num_heads=4 slopes, got 2",
        "attends over one axis",
    ]
    assert len(res["errors"]) == len(expected)
    for (is_value_error, message), want in zip(res["errors"], expected):
        assert is_value_error and want in message, (want, res["errors"])
    if backend == "tensorflow":
        printed = res["docs"]
        assert "(10, 700) (10, 12)" in printed and "(10, 300)" in printed, printed
        assert printed.count("True") == 4 and "False" not in printed, printed
