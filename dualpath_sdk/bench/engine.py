"""Our engine beside HF transformers and llama.cpp on the default model: same inputs, same run, same threads.

Prefill: tokens/s of the prompts' forward from an empty cache (to the first token). Decode:
tokens/s of the greedy decode steps after it, at batch 1 and 8. The transformers side is its
leanest loop: the model's forward with its own DynamicCache and argmax, no generate() overhead.
Ours runs in each weight precision and KV dtype (model/quant.py; `--quick`: fp32 and the engines'
default only); the others also report their greedy agreement with fp32 on a fixed set of chat prompts
(the share of identical tokens, position by position, and where each continuation first differs).

The peer: llama.cpp (`llama-cpp-python`, the `llamacpp` extra; skipped without it) on the same GGUF
and thread count, beside our default form: decode at batch 1 (llama.cpp on its repacked weights, its
fastest form here), a cold prefill, and a reused turn's time to first token (llama.cpp keeps the
earlier turn's KV in memory; ours finds it in the pool).
The memory floor of a decode step is its bytes (the weights once, each sequence's KV) over the
measured memcpy rate: the rate no decode of these bytes can beat on this machine. Each figure is the
best of `repeats` runs: the machine is shared and noisy.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, DynamicCache, PreTrainedModel

from dualpath_sdk.bench.attention import _copy_rate
from dualpath_sdk.config import EngineConfig, KVDtype, WeightPrecision
from dualpath_sdk.engine.core import EngineCore, kv_dtype, kv_layout
from dualpath_sdk.engine.sequence import SamplingParams
from dualpath_sdk.model.chat import encode_chat
from dualpath_sdk.model.loader import Model, default_gguf, load_model

# label -> (weights, KV dtype)
FORMS: dict[str, tuple[WeightPrecision, KVDtype]] = {
    "fp32": ("fp32", "fp32"),
    "int8": ("int8", "fp32"),
    "int4": ("int4", "fp32"),
    "int4 fp16-KV": ("int4", "fp16"),
    "int4 bf16-KV": ("int4", "bf16"),
}
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
Run = Callable[[list[list[int]], int], tuple[float, float]]
_console = Console(width=None if sys.stdout.isatty() else 200)  # a full run's first table has 12 columns


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


def ours_reused(model: Model, kv: KVDtype, cached: list[int], new: list[int]) -> float:
    """Seconds to the first token of a turn whose first `cached` tokens' KV the pool holds (computed
    by the turn before, untimed)."""
    blocks = -(-(len(cached) + len(new) + 1) // 64)
    engine = EngineCore(model, EngineConfig(num_blocks=blocks, max_batch_tokens=8192, kv_dtype=kv))
    engine.generate([cached], SamplingParams(max_tokens=1))
    seq = engine.add(cached + new, SamplingParams(max_tokens=1))
    start = time.perf_counter()
    engine.step()
    assert seq.num_cached == len(cached) // 64 * 64
    return time.perf_counter() - start


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


class LlamaCpp:
    """llama.cpp on the default model's GGUF through its C API, greedy at batch 1: its own KV in memory
    (f16, its default), kept between decodes, so a turn after `eval(cached)` reuses that prefix.

    `repacked`: its extra buffer types on (its default: Q4_1 repacked for its AMX / AVX512-VNNI
    kernels, 2.3x its decode here), tokens then fed one at a time: its batched AMX kernels raise SIGILL
    in this VM (tileloadd). Off: its AVX-512 dot products, any batch; its prefills run so."""

    def __init__(self, threads: int, n_ctx: int, repacked: bool = False) -> None:
        import llama_cpp as lib

        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # its C logs go through this logger
        self._lib = lib
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.use_extra_bufts = repacked
        self._model = lib.llama_model_load_from_file(str(default_gguf()).encode(), params)
        context = lib.llama_context_default_params()
        context.n_ctx, context.n_threads, context.n_threads_batch = n_ctx, threads, threads
        self._ctx = lib.llama_init_from_model(self._model, context)
        if not self._model or not self._ctx:
            raise RuntimeError("llama.cpp could not load the default model's GGUF")
        self._batch = 1 if repacked else context.n_batch
        self._vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self._model))

    def close(self) -> None:
        self._lib.llama_free(self._ctx)
        self._lib.llama_model_free(self._model)

    def reset(self) -> None:
        self._lib.llama_memory_clear(self._lib.llama_get_memory(self._ctx), True)

    def eval(self, tokens: list[int]) -> int:
        """Decode `tokens` after those already in the KV; the greedy next token."""
        for i in range(0, len(tokens), self._batch):
            chunk = tokens[i : i + self._batch]
            ids = (self._lib.llama_token * len(chunk))(*chunk)
            if self._lib.llama_decode(self._ctx, self._lib.llama_batch_get_one(ids, len(chunk))) != 0:
                raise RuntimeError("llama_decode failed")
        logits = self._lib.llama_get_logits_ith(self._ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(self._vocab,))))

    def __call__(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, float]:
        """(prefill seconds, decode seconds) from an empty cache."""
        (prompt,) = prompts
        self.reset()
        start = time.perf_counter()
        token = self.eval(prompt)
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = self.eval([token])
        return first - start, time.perf_counter() - first

    def reused(self, cached: list[int], new: list[int]) -> float:
        """Seconds to the first token of `new` after `cached`, whose KV it computes first, untimed."""
        self.reset()
        self.eval(cached)
        start = time.perf_counter()
        self.eval(new)
        return time.perf_counter() - start


def greedy(model: Model, prompts: list[list[int]], new_tokens: int, kv: KVDtype = "fp32") -> list[list[int]]:
    engine = EngineCore(model, EngineConfig(num_blocks=len(prompts) * 4, kv_dtype=kv))
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


def _has_llama_cpp() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def main(quick: bool) -> dict:
    # --quick: best of 1 (under two minutes), the reused turn short
    prefill_len, decode_len, context, repeats = (512, 24, 256, 1) if quick else (2041, 64, 512, 3)
    cached_len, new_len = (512, 128) if quick else (6208, 375)  # the reused turn
    default = load_model()  # the engines' default ("auto"): int4 for this GGUF
    form = (default.weights, kv_dtype(default, "auto"))
    default_label = next(label for label, f in FORMS.items() if f == form)
    labels = ("fp32", default_label) if quick else tuple(FORMS)
    models = {default.weights: default}
    for weights, _ in (FORMS[label] for label in labels):
        if weights not in models:
            models[weights] = load_model(weights=weights)
    fp32 = models["fp32"]
    hf = AutoModelForCausalLM.from_pretrained(fp32.path, dtype=torch.float32).eval()
    threads = torch.get_num_threads()
    peer = LlamaCpp(threads, cached_len + new_len + 64) if _has_llama_cpp() else None
    decoder = LlamaCpp(threads, context + decode_len + 64, repacked=True) if _has_llama_cpp() else None
    g = torch.Generator().manual_seed(0)

    def prompts(n: int, length: int) -> list[list[int]]:
        return torch.randint(0, fp32.spec.vocab_size, (n, length), generator=g).tolist()

    cases = [(f"prefill {prefill_len} tok", "prefill", prompts(1, prefill_len), 1)]
    cases += [
        (f"decode batch {b}, ctx {context}", f"decode_b{b}", prompts(b, context), decode_len) for b in (1, 8)
    ]
    sides: dict[str, Run] = {
        f"ours {label}": partial(ours, models[FORMS[label][0]], kv_dtype=FORMS[label][1]) for label in labels
    }
    sides["hf"] = partial(transformers_loop, hf)
    step_bytes = {f"ours {label}": models[FORMS[label][0]].transformer.step_bytes for label in labels}
    kv_bytes = {f"ours {label}": kv_layout(fp32, 64, FORMS[label][1]).bytes_per_token for label in labels}
    rate = _copy_rate()
    for run in sides.values():
        run(cases[0][2], 2)  # warm-up
    for llama in (peer, decoder):
        if llama is not None:
            llama([cases[0][2][0][:16]], 2)
    quantized = [label for label in labels if label != "fp32"]
    table = Table(title=f"engine: default model, {torch.get_num_threads()} threads, best of {repeats}")
    for column in (
        "",
        *(f"{side} tok/s" for side in sides),
        "fp32 / transformers",
        *(f"{label} / fp32" for label in quantized),
    ):
        table.add_column(column, justify="right")
    figures: dict[str, Any] = {"memcpy_bytes_s": round(rate), "default_form": default_label}
    floor = Table(title=f"decode against the memory floor: bytes per step / memcpy {rate / 1e9:.1f} GB/s")
    for column in ("", *(f"{side} tok/s, floor" for side in step_bytes)):
        floor.add_column(column, justify="right")
    measured: dict[str, dict[str, float]] = {}
    for label, key, batch_prompts, new_tokens in cases:
        pick = 0 if key == "prefill" else 1
        tokens = len(batch_prompts) * (len(batch_prompts[0]) if key == "prefill" else new_tokens - 1)
        rates = measured[key] = {
            side: tokens / min(run(batch_prompts, new_tokens)[pick] for _ in range(repeats))
            for side, run in sides.items()
        }
        base = rates["ours fp32"]
        ratio = base / rates["hf"]
        speedups = {q: rates[f"ours {q}"] / base for q in quantized}
        table.add_row(
            label,
            *(f"{rate:.1f}" for rate in rates.values()),
            f"{ratio:.2f}x",
            *(f"{speedups[q]:.2f}x" for q in quantized),
        )
        figures |= {f"{key}_ours_tok_s": round(base, 2), f"{key}_hf_tok_s": round(rates["hf"], 2)}
        figures[f"{key}_ratio"] = round(ratio, 3)
        for q in quantized:
            figures[f"{key}_{_key(q)}_tok_s"] = round(rates[f"ours {q}"], 2)
            figures[f"{key}_{_key(q)}_vs_fp32"] = round(speedups[q], 3)
        if key != "prefill":
            batch, kv_tokens = len(batch_prompts), len(batch_prompts[0]) + new_tokens / 2  # on average
            cells = []
            for side in step_bytes:
                floor_rate = batch * rate / (step_bytes[side] + batch * kv_tokens * kv_bytes[side])
                cells.append(f"{rates[side]:.1f}, {floor_rate:.0f} ({rates[side] / floor_rate:.0%})")
                figures[f"{key}_{_key(side)}_floor_tok_s"] = round(floor_rate, 1)
            floor.add_row(label, *cells)
    _console.print(table)
    _console.print(floor)

    # the peer: our default form beside llama.cpp, and the memory floor of its decode step
    side = f"ours {default_label}"
    turn = prompts(1, cached_len + new_len)[0]
    reused = min(ours_reused(default, form[1], turn[:cached_len], turn[cached_len:]) for _ in range(repeats))
    decode_floor = rate / (step_bytes[side] + (context + decode_len / 2) * kv_bytes[side])
    # label -> (ours, llama.cpp or None, the floor or None, unit): rates, or seconds where the unit is "s"
    rows: dict[str, tuple[float, float | None, float | None, str]] = {
        f"decode batch 1, ctx {context}": (measured["decode_b1"][side], None, decode_floor, "tok/s"),
        f"cold prefill {prefill_len} tok": (prefill_len / measured["prefill"][side], None, None, "s"),
        f"reused turn: {cached_len} cached + {new_len} new, to first token": (reused, None, None, "s"),
    }
    if peer is not None and decoder is not None:
        decode = min(decoder(cases[1][2], decode_len)[1] for _ in range(repeats))
        cold = min(peer(cases[0][2], 1)[0] for _ in range(repeats))
        again = min(peer.reused(turn[:cached_len], turn[cached_len:]) for _ in range(repeats))
        for key, figure in zip(rows, ((decode_len - 1) / decode, cold, again), strict=True):
            mine, _, limit, unit = rows[key]
            rows[key] = (mine, figure, limit, unit)
    missing = (
        " (llama.cpp decodes on its repacked weights, prefills without: LlamaCpp)"
        if peer is not None
        else ": llama-cpp-python not installed (the llamacpp extra)"
    )
    peer_table = Table(
        title=f"{side} beside llama.cpp (same GGUF, {torch.get_num_threads()} threads) and the memory floor"
        + missing
    )
    for column in ("", side, "llama.cpp", "ours vs llama.cpp", "memory floor", "ours / floor"):
        peer_table.add_column(column, justify="right")
    for (label, (mine, theirs, limit, unit)), name in zip(
        rows.items(), ("decode_b1", "cold_prefill", "reused_ttft"), strict=True
    ):
        speed = None if theirs is None else (mine / theirs if unit == "tok/s" else theirs / mine)
        peer_table.add_row(
            label,
            f"{mine:.2f} {unit}",
            "-" if theirs is None else f"{theirs:.2f} {unit}",
            "-" if speed is None else f"{speed:.2f}x",
            "-" if limit is None else f"{limit:.1f} {unit}",
            "-" if limit is None else f"{mine / limit:.0%}",
        )
        figures[f"peer_{name}_ours"] = round(mine, 3)
        figures[f"peer_{name}_llamacpp"] = None if theirs is None else round(theirs, 3)
        figures[f"peer_{name}_vs_llamacpp"] = None if speed is None else round(speed, 3)
    figures["peer_decode_b1_floor_tok_s"] = round(decode_floor, 1)
    figures["peer_decode_b1_vs_floor"] = round(rows[next(iter(rows))][0] / decode_floor, 3)
    _console.print(peer_table)
    for llama in (peer, decoder):
        if llama is not None:
            llama.close()
    return figures | _agreement(models, labels, quick)


def _key(label: str) -> str:
    """A side's label as a JSON key's part: "ours int4 fp16-KV" -> "ours_int4_fp16kv"."""
    return label.replace(" ", "_").replace("-", "").lower()


def _agreement(models: dict[WeightPrecision, Model], labels: tuple[str, ...], quick: bool) -> dict[str, Any]:
    """Each form's greedy tokens beside fp32's on the chat prompts."""
    model = models["fp32"]
    chats, new_tokens = (AGREEMENT_PROMPTS[:4], 32) if quick else (AGREEMENT_PROMPTS, 64)
    assert model.tokenizer is not None
    chat_prompts = [encode_chat(model.tokenizer, [{"role": "user", "content": c}]) for c in chats]
    reference = greedy(model, chat_prompts, new_tokens)
    agree = Table(title=f"greedy agreement with fp32: {len(chats)} chat prompts x {new_tokens} tokens")
    for column in ("", "weight bytes / step", "KV bytes / token", "identical tokens", "first divergence"):
        agree.add_column(column, justify="right")
    figures: dict[str, Any] = {}
    for label in labels:
        weights, kv = FORMS[label]
        share, first = (
            (1.0, [])
            if label == "fp32"
            else agreement(reference, greedy(models[weights], chat_prompts, new_tokens, kv))
        )
        agree.add_row(
            label,
            f"{models[weights].transformer.step_bytes / 1e6:.0f} MB",
            f"{kv_layout(model, 64, kv).bytes_per_token:,}",
            f"{share:.3f}",
            " ".join(map(str, first)) or "-",
        )
        figures[f"weight_bytes_per_step_{_key(label)}"] = models[weights].transformer.step_bytes
        if label != "fp32":
            figures |= {f"agreement_{_key(label)}": round(share, 3), f"first_divergence_{_key(label)}": first}
    _console.print(agree)
    return figures
