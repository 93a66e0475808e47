"""The benchmark runner: one table per benchmark, then one line of JSON."""

from __future__ import annotations

import argparse
import importlib
import json

import torch

from dualpath_sdk.bench import BENCHMARKS


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m dualpath_sdk.bench")
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("--quick", action="store_true", help="a smaller run, under two minutes")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, as each engine process runs)"
    )
    parser.add_argument("--ray", action="store_true", help="cluster: local mode against Ray (needs a netns)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module = importlib.import_module(f"dualpath_sdk.bench.{args.name}")
    figures = module.main(quick=args.quick, **({"ray": True} if args.ray else {}))
    print(
        json.dumps(
            {"benchmark": args.name, "quick": args.quick, "threads": args.threads, **figures}, sort_keys=True
        )
    )


if __name__ == "__main__":
    main()
