"""`dualpath demo | info`: the command line."""

from __future__ import annotations

import time

import torch
import typer
from rich.console import Console
from rich.table import Table

from dualpath_sdk.config import EngineConfig
from dualpath_sdk.engine.core import EngineCore
from dualpath_sdk.engine.sequence import SamplingParams
from dualpath_sdk.model.chat import encode_chat
from dualpath_sdk.model.loader import load_model

app = typer.Typer(add_completion=False, no_args_is_help=True, help="dualpath-sdk")
console = Console()


@app.command()
def demo(
    model: str = typer.Option(None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)"),
    max_tokens: int = typer.Option(64, help="tokens to generate per turn"),
) -> None:
    """Answer a two-turn conversation; the second turn reuses the first turn's KV."""
    loaded = load_model(model)
    if loaded.tokenizer is None:
        raise typer.BadParameter("the model has no tokenizer files")
    engine = EngineCore(loaded, EngineConfig())
    messages: list[dict[str, str]] = [
        {"role": "system", "content": "You are a concise coding assistant."},
        {"role": "user", "content": "What does `git bisect` do? Two sentences."},
    ]
    follow_ups = ["Show the commands for one run of it."]
    history: list[int] = []
    params = SamplingParams(max_tokens=max_tokens)
    table = Table("turn", "prompt", "cached", "generated", "TTFT ms", "tok/s")
    for turn in range(len(follow_ups) + 1):
        prompt = encode_chat(loaded.tokenizer, messages)
        if history and prompt[: len(history)] != history:
            raise RuntimeError("the chat template re-tokenized the history")  # the session avoids this
        start = time.perf_counter()
        seq = engine.add(prompt, params)
        first = None
        while engine.has_work:
            engine.step()
            first = first or time.perf_counter()
        elapsed = time.perf_counter() - start
        assert first is not None
        answer = str(loaded.tokenizer.decode(seq.output_ids, skip_special_tokens=True))
        console.print(f"[bold cyan]user:[/] {messages[-1]['content']}\n[bold green]assistant:[/] {answer}\n")
        decode_s = max(elapsed - (first - start), 1e-9)
        table.add_row(
            str(turn + 1),
            str(seq.prompt_len),
            str(seq.num_cached),
            str(len(seq.output_ids)),
            f"{(first - start) * 1000:.0f}",
            f"{max(len(seq.output_ids) - 1, 0) / decode_s:.1f}",
        )
        messages.append({"role": "assistant", "content": answer})
        if turn < len(follow_ups):
            messages.append({"role": "user", "content": follow_ups[turn]})
        history = prompt + seq.output_ids
    console.print(table)


@app.command()
def info() -> None:
    """Versions and the default model's shape."""
    loaded = load_model()
    spec = loaded.spec
    console.print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    console.print(
        f"default model {loaded.name}: {spec.model_type}, {spec.num_layers} layers, "
        f"hidden {spec.hidden_size}, "
        f"{spec.num_heads} heads / {spec.num_kv_heads} KV heads, fingerprint {loaded.fingerprint}"
    )


if __name__ == "__main__":
    app()
