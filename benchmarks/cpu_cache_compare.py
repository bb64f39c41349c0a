"""The machine code of two kernel caches compared, entry by entry (same function, signature, CPU).

Were kernels compiled on a process's first call the same code as ``dotattn precompile``'s?
Fill one cache by first calls (``DOTATTN_PRECOMPILED_DIR=/tmp/empty``, or a ``git archive``
copy of the tree) and compare it with the tree's ``kernels/_precompiled``:

    PYTHONPATH=src .venv/bin/python benchmarks/cpu_cache_compare.py /tmp/empty src/dotattn/kernels/_precompiled

For every entry of the first cache whose function, signature and target the second holds,
both objects are disassembled (``objdump -d -r``) and compared after the names that differ from
process to process are normalized: Numba's per-process version numbers (``B4v230``), its ABI
tags (the compile flags, compressed: a set's order follows Python's string hashing), the
addresses in parfor gufuncs' names, the ``.bytes.<hash>`` string constants and the pickled
exceptions' hashes.  Each entry prints
``same`` (every instruction and relocation), ``same instructions`` (relocations differ: a
constant at another offset, e.g. a longer source path in a pickled exception), or ``DIFFERS``
with the first differing lines.  Entries only one cache holds are counted.  Needs ``objdump``.
"""

from __future__ import annotations

import argparse
import glob
import os
import pickle
import re
import subprocess
import sys
import tempfile


def load_index(path: str) -> dict:
    """A Numba index file's ``{(signature, target, hashes): data file name}``."""
    with open(path, "rb") as f:
        pickle.load(f)  # Numba's version
        data = f.read()
    return pickle.loads(data)[1]


def _library_state(x):
    if isinstance(x, tuple):
        if len(x) == 3 and x[1] == "object":
            return x
        for y in x:
            found = _library_state(y)
            if found:
                return found
    return None


def object_code(directory: str, name: str) -> bytes:
    """The ELF object of a cache data file (``(name, 'object', (object, bitcode))`` inside)."""
    with open(os.path.join(directory, name), "rb") as f:
        return _library_state(pickle.loads(f.read()))[2][0]


def normalize(line: str) -> str:
    line = re.sub(r"<[^>]*>", "<>", line)
    line = re.sub(r"B\d+v\d+", "Bv", line)
    line = re.sub(r"B?\d*c8tJT[A-Za-z0-9_]*", "TAG", line)
    line = re.sub(r"0x7f[0-9a-f]{8,}", "0xADDR", line)  # a parfor gufunc's name holds an address
    line = re.sub(r"\.bytes\.-?\d+", ".bytes.N", line)
    line = re.sub(r"(pickledata|picklebuf)\.[0-9a-f]+", r"\1", line)
    return line


def disassembly(obj: bytes) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".o") as f:
        f.write(obj)
        f.flush()
        text = subprocess.run(["objdump", "-d", "-r", "--no-show-raw-insn", f.name],
                              capture_output=True, text=True, check=True).stdout
    return [normalize(line) for line in text.splitlines()[3:]]


def compare(a: list[str], b: list[str]) -> tuple[str, list[tuple[str, str]]]:
    """``("same" | "same instructions" | "DIFFERS", differing line pairs)``."""
    pairs = [(x, y) for x, y in zip(a, b) if x != y]
    if len(a) != len(b):
        return "DIFFERS", pairs or [(f"{len(a)} lines", f"{len(b)} lines")]
    if not pairs:
        return "same", []
    if all(re.search(r"\bR_X86_64_\w+\b", x) and re.search(r"\bR_X86_64_\w+\b", y) for x, y in pairs):
        return "same instructions", pairs
    return "DIFFERS", pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--only", default="", help="compare only index files whose name contains this")
    parser.add_argument("--show", type=int, default=4, help="differing lines shown per entry")
    args = parser.parse_args()
    import numba  # noqa: F401  (the index keys hold Numba types)

    counts = {"same": 0, "same instructions": 0, "DIFFERS": 0, "only in first": 0}
    for index in sorted(glob.glob(os.path.join(args.first, "*.nbi"))):
        stem = os.path.basename(index)
        if args.only not in stem:
            continue
        other = os.path.join(args.second, stem)
        entries = load_index(index)
        theirs = load_index(other) if os.path.exists(other) else {}
        for key, name in entries.items():
            match = [v for k, v in theirs.items() if k[0] == key[0] and k[1] == key[1]]
            if not match:
                counts["only in first"] += 1
                continue
            verdict, pairs = compare(disassembly(object_code(args.first, name)),
                                     disassembly(object_code(args.second, match[0])))
            counts[verdict] += 1
            print(f"{verdict:17} {name}" + (f"  ({len(pairs)} lines)" if pairs else ""))
            if verdict == "DIFFERS":
                for x, y in pairs[: args.show]:
                    print(f"    < {x.strip()[:150]}\n    > {y.strip()[:150]}")
    print(", ".join(f"{k}: {v}" for k, v in counts.items()))
    return 1 if counts["DIFFERS"] else 0


if __name__ == "__main__":
    sys.exit(main())
