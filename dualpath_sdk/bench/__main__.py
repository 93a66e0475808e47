"""The benchmark runner: one table per benchmark, then one line of JSON."""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
from typing import get_args

import torch

from dualpath_sdk.bench import BENCHMARKS
from dualpath_sdk.config import KVChoice, WeightChoice


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m dualpath_sdk.bench")
    parser.add_argument("name", choices=sorted(BENCHMARKS), help="which benchmark to run")
    parser.add_argument("--quick", action="store_true", help="a smaller run, under two minutes")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, as each engine process runs)"
    )
    parser.add_argument("--ray", action="store_true", help="cluster: local mode against Ray (needs a netns)")
    parser.add_argument(
        "--weights", choices=get_args(WeightChoice), help="the engines' weights (cluster; default auto)"
    )
    parser.add_argument(
        "--kv-dtype", choices=get_args(KVChoice), help="the engines' KV dtype (cluster; default auto)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    module = importlib.import_module(f"dualpath_sdk.bench.{args.name}")
    chosen = (("ray", args.ray or None), ("weights", args.weights), ("kv_dtype", args.kv_dtype))
    options = {k: v for k, v in chosen if v is not None}
    if not options.keys() <= inspect.signature(module.main).parameters.keys():
        parser.error(f"{args.name} takes none of --ray, --weights, --kv-dtype")
    figures = module.main(quick=args.quick, **options)
    print(
        json.dumps(
            {"benchmark": args.name, "quick": args.quick, "threads": args.threads, **figures}, sort_keys=True
        )
    )


if __name__ == "__main__":
    main()
