"""The triton kernels compile for real GPUs — checked without one.

The interpreter runs the kernels as Python, so it cannot catch what only the compiler sees
(constexpr globals, integer types of scalar arguments, control flow on tensors, shared
memory).  ``triton.compile`` lowers a kernel to PTX and a cubin with the ptxas bundled in the
triton wheel, no driver needed: this test does that for every kernel with the launch
configurations the backend uses, for sm_80 and sm_90, with every option off and on.

It takes minutes (LLVM and ptxas on a loaded 2-core machine), hence ``@pytest.mark.slow``
(``pytest -m slow tests/kernels/test_triton_compile.py``).  It runs in a subprocess: the test
process may have Triton's interpreter on, which decides at import how kernels are built.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

FLAGS = ["HAS_WL", "HAS_WR", "HAS_QLEN", "HAS_KVLEN", "HAS_SEG", "HAS_MASK", "HAS_BIAS", "HAS_ALIBI", "HAS_SOFTCAP"]
POINTERS = {"MASK": "*u8", "QLEN": "*i64", "KVLEN": "*i64", "QSEG": "*i64", "KVSEG": "*i64", "GEOM": "*i64",
            "TABLE": "*i64", "SLOPES": "*fp32", "LSE": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32", "DBIAS": "*fp32",
            "BIAS": "*fp32", "W": "*fp32"}


def _signature(fn, dt: str, consts: dict) -> dict:
    """Argument types as the launcher passes them (pointers of the input dtype, i32 sizes/strides)."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.isupper() and name not in ("D", "G"):
            sig[name] = POINTERS.get(name, "*fp32" if (fn.__name__ == "decode_split" and name in ("Q", "OUT"))
                                     else "*" + dt)
        elif name in ("scale", "softcap", "drop_scale"):
            sig[name] = "fp32"
        elif name in ("seed_key", "drop_threshold"):
            sig[name] = "i64"
        else:
            sig[name] = "i32"
    return sig


def compile_all(arch: int, dtypes=("bf16", "fp32"), head_dims=(64, 128)) -> list[str]:
    import triton
    from triton.backends.compiler import GPUTarget

    from dotattn.kernels import triton_kernels as K
    from dotattn.kernels.triton_backend import _launch_config

    assert not K.INTERPRETED, "compile checks need TRITON_INTERPRET unset"
    target = GPUTarget("cuda", arch, 32)
    done = []
    for dt in dtypes:
        itemsize = 4 if dt == "fp32" else 2
        for D in head_dims:
            for on, causal in ((False, 0), (True, 1), (True, 2)):
                flags = dict.fromkeys(FLAGS, on) | {"CAUSAL": causal}
                fwd = _launch_config("fwd", D, itemsize, False)
                bwd = _launch_config("bwd", D, itemsize, False)
                tiles = dict(BLOCK_D=D, BLOCK_DV=D)
                jobs = [
                    (K.attn_fwd, fwd, {**tiles, **flags, "DROPOUT": on}),
                    (K.attn_bwd_delta, bwd, {"BLOCK_M": bwd["BLOCK_M"], "BLOCK_DV": D, "HAS_QLEN": on, "HAS_DLSE": on}),
                    (K.attn_bwd_dkdv, bwd, {**tiles, **flags, "DROPOUT": on, "WANT_DBIAS": on}),
                    (K.attn_bwd_dq, bwd, {**tiles, **flags, "DROPOUT": on}),
                    (K.attn_weights, fwd, {"BLOCK_D": D, **flags}),
                    (K.decode_split, {"BLOCK_N": 64, "num_warps": 4, "num_stages": 1},
                     {"BLOCK_R": 16, "BLOCK_D": D, "BLOCK_DV": D, "CAUSAL": causal > 0, "HAS_WL": on, "HAS_WR": on,
                      "HAS_ALIBI": on, "HAS_SOFTCAP": on}),
                ]
                for fn, cfg, consts in jobs:
                    consts = {**{k: v for k, v in cfg.items() if k.startswith("BLOCK")}, **consts}
                    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
                    src = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, dt, consts), constexprs=consts)
                    kernel = triton.compile(src, target=target, options={"num_warps": cfg["num_warps"],
                                                                         "num_stages": cfg["num_stages"]})
                    assert kernel.asm.get("cubin"), fn.__name__
                    done.append(f"sm_{arch} {dt} D={D} {fn.__name__} options={'on' if on else 'off'} causal={causal} "
                                f"shared={kernel.metadata.shared}")
                if not on and dt == "fp32":
                    break  # float32: the plain variant is enough to check the small tiles lower
    return done


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_kernel_compiles_for_the_gpu(arch):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, str(arch)], capture_output=True, text=True, env=env,
                          timeout=3000, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("sm_") >= 30, done.stdout


if __name__ == "__main__":
    for line in compile_all(int(sys.argv[1])):
        print(line, flush=True)
