"""The benchmark runner: one table per benchmark, then one line of JSON."""

from __future__ import annotations

import argparse
import importlib
import json

from dualpath_sdk.bench import BENCHMARKS


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m dualpath_sdk.bench")
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("--quick", action="store_true", help="a smaller run, under two minutes")
    args = parser.parse_args()
    module = importlib.import_module(f"dualpath_sdk.bench.{args.name}")
    figures = module.main(quick=args.quick)
    print(json.dumps({"benchmark": args.name, "quick": args.quick, **figures}, sort_keys=True))


if __name__ == "__main__":
    main()
