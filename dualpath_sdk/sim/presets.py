"""Hardware, models and deployments of the paper's evaluation (PAPER.md, Evaluation setup).

Figures marked "assumed" are not in the paper; they set compute speed and decode cost and are the same in
every mode, so they move absolute times but hardly the mode ratios the paper reports.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GBPS = 1e9 / 8


@dataclass(frozen=True, slots=True)
class Hardware:
    gpus_per_node: int = 8
    cnic_bps: float = 400 * GBPS  # one compute NIC per GPU, each direction
    snic_bps: float = 400 * GBPS  # one storage NIC per node (3FS saturates it)
    dram_bps: float = 500e9  # host DRAM bandwidth per node (the paper's M)
    gpu_flops: float = 450e12  # assumed: effective prefill FLOP/s per Hopper GPU
    hbm_bps: float = 3.35e12
    hbm_bytes: float = 80e9
    model_share: float = 0.99  # model traffic's share of a CNIC under contention


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    layers: int
    kv_bytes_per_token: int  # all layers
    active_params: float  # linear FLOPs = 2 x active params x tokens
    weight_bytes: float
    attn_flops_per_pair: float  # all layers, one (query, key) pair
    attn_topk: int = 0  # sparse attention keeps this many keys (0 = dense)
    index_flops_per_pair: float = 0.0  # DSA lightning indexer, dense over the whole context
    index_bytes_per_token: int = 0  # indexer keys read per context token in decode
    model_bytes_per_token: float = 0.0  # assumed: EP all-to-all bytes through a PE CNIC per new token
    gpus_per_engine: int = 1
    decode_overhead_s: float = 0.005  # assumed: per decode step beyond weight reads (comm, launch)
    weight_gpus: int = 8  # GPUs the weights are spread over (EP/TP group)
    prefill_overhead_s: float = 0.002  # assumed: per prefill batch


@dataclass(frozen=True, slots=True)
class Preset:
    name: str
    model: Model
    pe_nodes: int
    de_nodes: int
    workload: str = "64K"
    hardware: Hardware = Hardware()
    append: int | None = None  # mean appended tokens per call (None: the workload table's)
    gen: int | None = None  # mean generated tokens per call (None: the table's)

    def scaled(self, factor: int) -> Preset:
        return replace(
            self,
            name=f"{self.name}x{factor}",
            pe_nodes=self.pe_nodes * factor,
            de_nodes=self.de_nodes * factor,
        )


DS660B = Model(
    name="DeepSeek-V3.2 660B",
    layers=61,
    kv_bytes_per_token=40 * 1024,
    active_params=37e9,
    weight_bytes=671e9,
    # MLA (absorbed): 128 heads x (576 + 512) x 2 FLOPs per pair per layer; DSA keeps 2048 keys.
    attn_flops_per_pair=128 * 1088 * 2 * 61,
    attn_topk=2048,
    index_flops_per_pair=64 * 128 * 2 * 61 / 2,
    index_bytes_per_token=128 * 61,
    model_bytes_per_token=0.65e6,
    weight_gpus=32,
    decode_overhead_s=0.006,
)
DS27B = Model(
    name="DeepSeek-V3.2 27B (downscaled)",
    layers=30,
    kv_bytes_per_token=20 * 1024,
    active_params=3e9,
    weight_bytes=27e9,
    attn_flops_per_pair=64 * 1088 * 2 * 30,
    attn_topk=2048,
    index_flops_per_pair=32 * 128 * 2 * 30 / 2,
    index_bytes_per_token=128 * 30,
    model_bytes_per_token=0.15e6,
    weight_gpus=8,
    decode_overhead_s=0.004,
)
QWEN32B = Model(
    name="Qwen2.5-32B",
    layers=64,
    kv_bytes_per_token=64 * 8 * 128 * 2 * 2,
    active_params=32.5e9,
    weight_bytes=65e9,
    attn_flops_per_pair=4 * 40 * 128 * 64,
    gpus_per_engine=2,
    weight_gpus=2,
    decode_overhead_s=0.004,
)

PRESETS: dict[str, Preset] = {
    "ds660b-2p4d": Preset("ds660b-2p4d", DS660B, 2, 4),
    "ds27b-1p1d": Preset("ds27b-1p1d", DS27B, 1, 1),
    "qwen32b-1p2d": Preset("qwen32b-1p2d", QWEN32B, 1, 2),
    "ds660b-48p96d": Preset("ds660b-48p96d", DS660B, 48, 96),
}
