"""Our engine beside HF transformers on the default model: same inputs, same run, same threads.

Prefill: tokens/s of the prompts' forward from an empty cache (to the first token). Decode:
tokens/s of the greedy decode steps after it, at batch 1 and 8. The transformers side is its
leanest loop: the model's forward with its own DynamicCache and argmax, no generate() overhead.
Ours runs in each weight precision (model/quant.py), and int4 also with 16-bit KV; the quantized ones
also report their greedy agreement with fp32 on a fixed set of chat prompts (the share of identical
tokens, position by position, and where each continuation first differs). The memory floor of a
decode step is its bytes (the weights once, each sequence's KV) over the measured memcpy rate: the
rate no decode of these bytes can beat on this machine. Each figure is the best of `repeats` runs:
the machine is shared and noisy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from dualpath_sdk.bench.attention import _copy_rate
from dualpath_sdk.config import EngineConfig, KVDtype, WeightPrecision
from dualpath_sdk.engine.core import EngineCore, kv_layout
from dualpath_sdk.engine.sequence import SamplingParams
from dualpath_sdk.model.chat import encode_chat
from dualpath_sdk.model.loader import Model, load_model

QUANTIZED: tuple[WeightPrecision, ...] = ("int8", "int4")
AGREEMENT_PROMPTS = (
    "List three uses of a hash map, one line each.",
    "Write a Python function that reverses a linked list.",
    "Explain what a mutex is to a new programmer.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "Give me a bash one-liner that counts the lines of all .py files.",
    "What are the pros and cons of microservices?",
    "Translate 'the weather is nice today' into French and Spanish.",
)


def ours(
    model: Model, prompts: list[list[int]], new_tokens: int, kv_dtype: KVDtype = "fp32"
) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of our engine."""
    blocks = len(prompts) * -(-(len(prompts[0]) + new_tokens) // 64)
    engine = EngineCore(model, EngineConfig(num_blocks=blocks, max_batch_tokens=8192, kv_dtype=kv_dtype))
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


def greedy(model: Model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    engine = EngineCore(model, EngineConfig(num_blocks=len(prompts) * 4))
    return [
        c.output_ids for c in engine.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    ]


def agreement(reference: list[list[int]], other: list[list[int]]) -> tuple[float, list[int]]:
    """The share of positions with the same token, and each continuation's first differing position
    (its length where none differs)."""
    same = sum(
        a == b for ref, out in zip(reference, other, strict=True) for a, b in zip(ref, out, strict=True)
    )
    first = [
        next((i for i, (a, b) in enumerate(zip(ref, out, strict=True)) if a != b), len(ref))
        for ref, out in zip(reference, other, strict=True)
    ]
    return same / sum(len(ref) for ref in reference), first


def main(quick: bool) -> dict:
    prefill_len, decode_len, context, repeats = (512, 24, 256, 2) if quick else (1024, 64, 512, 3)
    models = {"fp32": load_model(), **{p: load_model(weights=p) for p in QUANTIZED}}
    model = models["fp32"]
    hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)

    def prompts(n: int, length: int) -> list[list[int]]:
        return torch.randint(0, model.spec.vocab_size, (n, length), generator=g).tolist()

    cases = [(f"prefill {prefill_len} tok", "prefill", prompts(1, prefill_len), 1)]
    cases += [
        (f"decode batch {b}, ctx {context}", f"decode_b{b}", prompts(b, context), decode_len) for b in (1, 8)
    ]
    sides: dict[str, Callable[[list[list[int]], int], tuple[float, float]]] = {
        **{f"ours {p}": partial(ours, m) for p, m in models.items()},
        "ours int4 bf16-KV": partial(ours, models["int4"], kv_dtype="bf16"),
        "hf": partial(transformers_loop, hf),
    }
    step_bytes = {f"ours {p}": m.transformer.step_bytes for p, m in models.items()}
    step_bytes["ours int4 bf16-KV"] = models["int4"].transformer.step_bytes
    kv_bytes = {
        side: kv_layout(model, 64, "bf16" if "bf16" in side else "fp32").bytes_per_token
        for side in step_bytes
    }
    rate = _copy_rate()
    for run in sides.values():
        run(cases[0][2], 2)  # warm-up
    table = Table(title=f"engine: default model, {torch.get_num_threads()} threads, best of {repeats}")
    for column in (
        "",
        *(f"{side} tok/s" for side in sides),
        "fp32 / transformers",
        *(f"{p} / fp32" for p in QUANTIZED),
    ):
        table.add_column(column, justify="right")
    figures: dict[str, float | int | list[int]] = {"memcpy_bytes_s": round(rate)}
    floor = Table(title=f"decode against the memory floor: bytes per step / memcpy {rate / 1e9:.1f} GB/s")
    for column in ("", *(f"{side} tok/s, floor" for side in step_bytes)):
        floor.add_column(column, justify="right")
    for label, key, batch_prompts, new_tokens in cases:
        rates = {}
        for side, run in sides.items():
            best = float("inf")
            for _ in range(repeats):
                prefill_s, decode_s = run(batch_prompts, new_tokens)
                best = min(best, prefill_s if key == "prefill" else decode_s)
            tokens = len(batch_prompts) * (len(batch_prompts[0]) if key == "prefill" else new_tokens - 1)
            rates[side] = tokens / best
        fp32 = rates["ours fp32"]
        ratio = fp32 / rates["hf"]
        speedups = {p: rates[f"ours {p}"] / fp32 for p in QUANTIZED}
        table.add_row(
            label,
            *(f"{rate:.1f}" for rate in rates.values()),
            f"{ratio:.2f}x",
            *(f"{speedups[p]:.2f}x" for p in QUANTIZED),
        )
        figures |= {f"{key}_ours_tok_s": round(fp32, 2), f"{key}_hf_tok_s": round(rates["hf"], 2)}
        figures[f"{key}_ratio"] = round(ratio, 3)
        for p in QUANTIZED:
            figures[f"{key}_{p}_tok_s"] = round(rates[f"ours {p}"], 2)
            figures[f"{key}_{p}_vs_fp32"] = round(speedups[p], 3)
        figures[f"{key}_int4_bf16kv_tok_s"] = round(rates["ours int4 bf16-KV"], 2)
        if key != "prefill":
            batch, kv_tokens = len(batch_prompts), len(batch_prompts[0]) + new_tokens / 2  # on average
            cells = []
            for side in step_bytes:
                floor_rate = batch * rate / (step_bytes[side] + batch * kv_tokens * kv_bytes[side])
                cells.append(f"{rates[side]:.1f}, {floor_rate:.0f} ({rates[side] / floor_rate:.0%})")
                figures[f"{key}_{side.replace(' ', '_')}_floor_tok_s"] = round(floor_rate, 1)
            floor.add_row(label, *cells)
    Console().print(table)
    Console().print(floor)

    chats, new_tokens = (AGREEMENT_PROMPTS[:4], 32) if quick else (AGREEMENT_PROMPTS, 64)
    assert model.tokenizer is not None
    chat_prompts = [encode_chat(model.tokenizer, [{"role": "user", "content": c}]) for c in chats]
    reference = greedy(model, chat_prompts, new_tokens)
    agree = Table(title=f"greedy agreement with fp32: {len(chats)} chat prompts x {new_tokens} tokens")
    for column in ("", "weight bytes / step", "identical tokens", "first divergence"):
        agree.add_column(column, justify="right")
    agree.add_row("fp32", f"{model.transformer.step_bytes / 1e6:.0f} MB", "1.000", "-")
    figures["weight_bytes_per_step_fp32"] = model.transformer.step_bytes
    for p in QUANTIZED:
        share, first = agreement(reference, greedy(models[p], chat_prompts, new_tokens))
        agree.add_row(
            p, f"{models[p].transformer.step_bytes / 1e6:.0f} MB", f"{share:.3f}", " ".join(map(str, first))
        )
        figures |= {f"agreement_{p}": round(share, 3), f"first_divergence_{p}": first}
        figures[f"weight_bytes_per_step_{p}"] = models[p].transformer.step_bytes
    Console().print(agree)
    return figures
