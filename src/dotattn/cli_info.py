"""``dotattn info``: the backends in dispatch order and whether each can run here."""

from __future__ import annotations

import argparse
import json
import platform


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    import dotattn

    rows = dotattn.info()
    if args.json:
        print(json.dumps({"version": dotattn.__version__, "backends": rows}, indent=2))
        return 0
    print(f"dotattn {dotattn.__version__} — Python {platform.python_version()}, NumPy {np.__version__}")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "yes" if r["available"] else "no "
        print(f"  {r['name']:<{width}}  {mark}  {r['status']}")
    return 0
