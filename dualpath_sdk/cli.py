"""`dualpath demo | info`: the command line."""

from __future__ import annotations

import torch
import typer
from rich.console import Console
from rich.table import Table

from dualpath_sdk.api.cluster import Cluster
from dualpath_sdk.cluster.controller import PlanChoice
from dualpath_sdk.model.loader import load_model

app = typer.Typer(add_completion=False, no_args_is_help=True, help="dualpath-sdk")
console = Console()


@app.command()
def demo(
    model: str = typer.Option(None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)"),
    storage: str = typer.Option(None, help="store directory (default: ~/.cache/dualpath/store)"),
    max_tokens: int = typer.Option(48, help="tokens to generate per turn"),
) -> None:
    """An agent conversation on the embedded cluster (one PE and one DE process): each turn after the
    first reloads the conversation's KV from the store, over the PE path, the DE path, then both."""
    turns: list[tuple[str, PlanChoice]] = [
        ("What does `git bisect` do? Two sentences.", "auto"),
        ("Show the commands for one run of it.", "pe"),
        ("How do I stop it when I am done?", "de"),
        ("Summarise the whole procedure in one line.", "split"),
    ]
    console.print("[bold]Starting the embedded cluster[/] (1 prefill + 1 decode engine process)...")
    with Cluster.local(model=model, storage=storage) as cluster:
        session = cluster.session(system="You are a concise assistant for software engineers.")
        table = Table("turn", "plan", "prompt", "cached", "gen", "via PE", "via DE", "TTFT ms", "TPOT ms")
        for turn, (text, plan) in enumerate(turns, start=1):
            result = session.step(text, max_tokens=max_tokens, read_plan=plan)
            console.print(f"[bold cyan]user:[/] {text}\n[bold green]assistant:[/] {result.text}\n")
            table.add_row(
                str(turn),
                result.load.plan,
                str(result.usage.prompt_tokens),
                str(result.usage.cached_tokens),
                str(result.usage.completion_tokens),
                _kib(result.load.bytes_pe),
                _kib(result.load.bytes_de),
                f"{result.timings.ttft_s * 1000:.0f}",
                f"{result.timings.tpot_s * 1000:.1f}",
            )
        console.print(table)
        console.print(f"session {session.id} is persisted: resume it with cluster.session(session_id=...)")


def _kib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n else "-"


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
