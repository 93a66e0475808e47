"""Our engine beside HF transformers on the default model: same inputs, same run, same threads.

Prefill: tokens/s of the prompts' forward from an empty cache (to the first token). Decode:
tokens/s of the greedy decode steps after it, at batch 1 and 8. The transformers side is its
leanest loop: the model's forward with its own DynamicCache and argmax, no generate() overhead.
Each figure is the best of `repeats` runs: the machine is shared and noisy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from dualpath_sdk.config import EngineConfig
from dualpath_sdk.engine.core import EngineCore
from dualpath_sdk.engine.sequence import SamplingParams
from dualpath_sdk.model.loader import Model, load_model


def ours(model: Model, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of our engine."""
    blocks = len(prompts) * -(-(len(prompts[0]) + new_tokens) // 64)
    engine = EngineCore(model, EngineConfig(num_blocks=blocks, max_batch_tokens=8192))
    for prompt in prompts:
        engine.add(prompt, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    start = time.perf_counter()
    engine.step()
    first = time.perf_counter()
    while engine.has_work:
        engine.step()
    return first - start, time.perf_counter() - first


def transformers_loop(hf: PreTrainedModel, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of transformers' forward with its KV cache, greedy."""
    cache = DynamicCache(config=hf.config)
    with torch.no_grad():
        start = time.perf_counter()
        logits = hf(torch.tensor(prompts), cache=cache, use_cache=True, logits_to_keep=1).logits
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            logits = hf(logits[:, -1:].argmax(-1), cache=cache, use_cache=True).logits
    return first - start, time.perf_counter() - first


def main(quick: bool) -> dict:
    prefill_len, decode_len, context, repeats = (512, 24, 256, 2) if quick else (1024, 64, 512, 3)
    model = load_model()
    hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)

    def prompts(n: int, length: int) -> list[list[int]]:
        return torch.randint(0, model.spec.vocab_size, (n, length), generator=g).tolist()

    cases = [(f"prefill {prefill_len} tok", "prefill", prompts(1, prefill_len), 1)]
    cases += [
        (f"decode batch {b}, ctx {context}", f"decode_b{b}", prompts(b, context), decode_len) for b in (1, 8)
    ]
    sides: dict[str, Callable[[list[list[int]], int], tuple[float, float]]] = {
        "ours": partial(ours, model),
        "hf": partial(transformers_loop, hf),
    }
    for run in sides.values():
        run(cases[0][2], 2)  # warm-up
    table = Table(title=f"engine: default model, fp32, {torch.get_num_threads()} threads, best of {repeats}")
    for column in ("", "ours tok/s", "transformers tok/s", "ours / transformers"):
        table.add_column(column, justify="right")
    figures: dict[str, float | int] = {}
    for label, key, batch_prompts, new_tokens in cases:
        rates = {}
        for side, run in sides.items():
            best = float("inf")
            for _ in range(repeats):
                prefill_s, decode_s = run(batch_prompts, new_tokens)
                best = min(best, prefill_s if key == "prefill" else decode_s)
            tokens = len(batch_prompts) * (len(batch_prompts[0]) if key == "prefill" else new_tokens - 1)
            rates[side] = tokens / best
        ratio = rates["ours"] / rates["hf"]
        table.add_row(label, f"{rates['ours']:.1f}", f"{rates['hf']:.1f}", f"{ratio:.2f}x")
        figures |= {f"{key}_ours_tok_s": round(rates["ours"], 2), f"{key}_hf_tok_s": round(rates["hf"], 2)}
        figures[f"{key}_ratio"] = round(ratio, 3)
    Console().print(table)
    return figures
