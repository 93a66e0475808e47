"""The csrc/ kernels: built on first use, cached per machine, torch's own paths otherwise.

Two sources, each its own library: the paged attention kernel (`kernel_op`; torch's paged path
without it) and the quantized linears (`quant_ops`, csrc/quant_linear.cpp; model/quant.py falls back
to torch's packed kernels without them).

The build uses torch.utils.cpp_extension (g++ and ninja, nothing downloaded) into torch's
extensions directory (`$TORCH_EXTENSIONS_DIR`, else ~/.cache/torch_extensions), under
`dualpath/<source stem>-<key>`: a build artifact, so not under `DUALPATH_CACHE`, which a program may
point at a fresh directory per run. The key a digest of the source, the torch and Python
versions and the CPU capability it targets, so a shared cache never hands one CPU another's
build. Several engine processes may start at once: an `flock` (released if its holder dies, so
never stale) lets one build while the others wait, and the build goes to a temporary directory
renamed into place when complete, so no process ever loads a half-written library. If the build
or the load fails, that is logged once and attention runs on torch's paged path.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch

from dualpath_sdk.model.attention import AttentionBatch
from dualpath_sdk.model.paged import PagedAttention

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCE = CSRC / "paged_attention.cpp"
NAME = "dualpath_paged_attention"
QUANT_SOURCE = CSRC / "quant_linear.cpp"
QUANT_NAME = "dualpath_quant_linear"
HEAD_DIMS = (16, 32, 64, 128, 256)  # the head sizes the kernel is instantiated for
KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the pools it reads
# at::vec picks its vector width from CPU_CAPABILITY; the -m flags are those torch builds it with
_CAPABILITY_FLAGS = {
    "AVX512": [
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
    ],
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"],
}


class KernelAttention:
    """The csrc/ kernel for what it is built for (float32 queries over a float32, bfloat16 or float16
    pool, HEAD_DIMS), torch's paged path for the rest."""

    name = "kernel"

    def __init__(self, op: Callable[..., torch.Tensor], fallback: PagedAttention) -> None:
        self._op = op
        self._fallback = fallback

    def attend(
        self, q: torch.Tensor, kv: torch.Tensor, batch: AttentionBatch, window: int | None
    ) -> torch.Tensor:
        if q.dtype != torch.float32 or kv.dtype not in KV_DTYPES or q.shape[-1] not in HEAD_DIMS:
            return self._fallback.attend(q, kv, batch, window)
        return self._op(
            q.contiguous(),
            kv,
            batch.block_tables,
            batch.q_offsets,
            batch.starts,
            batch.q_lens,
            window or 0,
            q.shape[-1] ** -0.5,
        )


@cache
def kernel_op() -> Callable[..., torch.Tensor] | None:
    """The loaded kernel (building it the first time on this machine), or None, logged once, if it
    cannot be had."""
    try:
        library = _library(SOURCE, NAME)
        if not hasattr(torch.ops.dualpath, "paged_attention"):  # else this process built and loaded it
            torch.ops.load_library(str(library))
    except Exception as e:  # a failed build must never stop an engine: torch's path serves
        log.warning("paged attention kernel unavailable (%s); attention runs on torch's paged path", e)
        return None
    return torch.ops.dualpath.paged_attention


@cache
def quant_ops() -> Any | None:
    """The loaded quantized layer ops (`int8_linear`, `int4_linear`, `rope_store`), or None, logged once."""
    try:
        library = _library(QUANT_SOURCE, QUANT_NAME)
        if not hasattr(torch.ops.dualpath_quant, "int8_linear"):
            torch.ops.load_library(str(library))
    except Exception as e:  # as kernel_op: the quantized forms run on torch's packed kernels
        log.warning("quantized linear kernels unavailable (%s); torch's packed kernels serve", e)
        return None
    return torch.ops.dualpath_quant


def _extensions_dir() -> Path:
    """Where torch.utils.cpp_extension builds by default."""
    return Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))


def _library(source: Path, name: str) -> Path:
    if not source.exists():
        raise FileNotFoundError(f"{source} is not installed with this package")
    capability = torch.backends.cpu.get_cpu_capability()
    flags = ["-O3", "-fopenmp", *_CAPABILITY_FLAGS.get(capability, [])]
    digest = hashlib.sha256()
    for part in (source.read_bytes(), torch.__version__, sys.version, capability, " ".join(flags)):
        digest.update(part if isinstance(part, bytes) else part.encode())
    final = _extensions_dir() / "dualpath" / f"{source.stem}-{digest.hexdigest()[:16]}"
    library = final / f"{name}.so"
    if library.exists():
        return library
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building this very key
        if library.exists():
            return library
        log.info("building %s once for this machine (cached in %s)", source.name, final)
        scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            from torch.utils.cpp_extension import load

            # loads the library into this process too (so kernel_op does not load it again)
            load(
                name,
                [str(source)],
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"],
                build_directory=str(scratch),
                is_python_module=False,
            )
            if final.exists():  # a directory left without its library: rebuilt under the lock
                shutil.rmtree(final)
            os.rename(scratch, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return library
