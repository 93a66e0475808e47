"""Benchmarks: `python -m dualpath_sdk.bench NAME [--quick]`.

Each benchmark is a module `dualpath_sdk.bench.NAME` with `main(quick: bool) -> dict`: it measures
against a baseline in the same run, prints a readable table, and returns its figures (ratios
included), which the runner prints as the last line, one line of JSON.
"""

BENCHMARKS = {
    "engine": "our engine beside HF transformers: prefill and decode tokens/s",
    "attention": "paged attention (csrc/ kernel, torch) beside the gather path: decode TPOT, prefill, TTFT",
    "store": "fs block reads/writes beside the raw device; the storage-NIC limiter's accuracy",
    "transfer": "local and mooncake transports beside a memcpy and a plain socket of the same bytes",
    "cluster": "basic, dualpath, split reads and oracle clusters on storage-bound agent workloads",
    "gateway": "agent turns in-process beside the same turns through the gateway (HTTP + SSE): TTFT, steps/s",
    "faults": "agent sessions on 1P1D/1P2D under engine kills, damaged blocks, a full store, bad requests",
}
