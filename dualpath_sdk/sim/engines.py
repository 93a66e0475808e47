"""The simulated hardware's moving parts: nodes (SNIC, DRAM), PE and DE engines (their CNICs), and the
state of one LLM call as it passes through them. The behaviour lives in cluster.py; this is the state."""

from __future__ import annotations

from collections import deque

from dualpath_sdk.scheduler import Request, Role, Waiting
from dualpath_sdk.sim.core import EventLoop, Link
from dualpath_sdk.sim.presets import Preset


class SimRequest:
    """One LLM call of one agent; `request` is how the scheduler sees it. Its request_id is the agent (an
    agent has one call at a time): an id pointing back at this object would make every call a reference
    cycle, which only the garbage collector's full passes free, over a heap they then keep growing."""

    __slots__ = (
        "agent",
        "arrival",
        "cached",
        "call",
        "de",
        "de_tok",
        "done",
        "gen",
        "pe",
        "pe_tok",
        "request",
        "t_fetch",
        "t_first",
        "t_join",
        "t_read",
        "t_ready",
        "tokens",
    )

    def __init__(self, agent: int, call: int, tokens: int, cached: int, gen: int) -> None:
        self.agent = agent
        self.call = call
        self.tokens = tokens
        self.cached = cached
        self.gen = gen
        self.request = Request(agent, tokens, cached, gen)
        self.arrival = 0.0
        self.t_fetch = 0.0  # its PE and DE group chosen: it left the global queue
        self.t_first = 0.0
        self.t_join = 0.0
        self.t_read = 0.0  # PE and DE chosen: the storage read starts
        self.t_ready = 0.0  # the read is done: the request waits for its PE's batch
        self.done = 0  # new tokens prefilled so far (chunked prefill)
        self.pe_tok = 0  # cached tokens the PE side reads
        self.de_tok = 0
        self.pe: PrefillEngine
        self.de: DecodeEngine


class Node:
    """A node's storage NIC and DRAM, its engines, and its figures as the scheduler sees them."""

    __slots__ = (
        "de_queue",
        "des",
        "dram",
        "group_tok",
        "idx",
        "low",
        "pes",
        "pos",
        "read_q",
        "role",
        "snic",
    )

    def __init__(self, loop: EventLoop, idx: int, role: Role, snic_bps: float, dram_bps: float) -> None:
        self.idx = idx
        self.role = role
        self.snic = Link(loop, f"n{idx}.snic", snic_bps)
        self.dram = Link(loop, f"n{idx}.dram", dram_bps)
        self.read_q = 0  # tokens queued or in flight on this node's SNIC
        self.group_tok = 0  # DE group: tokens of its unfinished requests, its queue's included (level 1)
        self.de_queue: deque[Waiting] = deque()  # DE group: requests waiting for DE memory (level 2)
        self.des: list[DecodeEngine] = []
        self.pes: list[PrefillEngine] = []
        self.low = True  # read_q <= alpha (the PE choice prefers such nodes)
        self.pos = 0  # position among the DE groups (level-1 tie order)


class PrefillEngine:
    """A PE: its ready queue (reads done) and the batch it runs, one at a time."""

    __slots__ = (
        "batch",
        "busy",
        "cnic_in",
        "cnic_out",
        "compute_s",
        "idx",
        "node",
        "order",
        "ready",
        "seq_e",
        "tok_e",
    )

    def __init__(self, idx: int, node: Node, cnic_in: Link, cnic_out: Link) -> None:
        self.idx = idx
        self.node = node
        self.cnic_in = cnic_in
        self.cnic_out = cnic_out
        self.ready: deque[SimRequest] = deque()
        self.tok_e = 0
        self.seq_e = 0
        self.busy = False
        self.batch: list[tuple[SimRequest, int]] = []
        self.compute_s = 0.0
        self.order = idx  # position in the report list (the order PEs came back under beta)


class DecodeEngine:
    """Continuous batching as a fluid: `steps` advances at 1/step_s; a request leaves after its steps."""

    __slots__ = (
        "attended",
        "cnic_in",
        "cnic_out",
        "free",
        "heap",
        "idx",
        "last",
        "n",
        "node",
        "seq_e",
        "step_s",
        "steps",
        "tok_e",
        "version",
    )

    def __init__(self, idx: int, node: Node, cnic_in: Link, cnic_out: Link, free: int) -> None:
        self.idx = idx
        self.node = node
        self.cnic_in = cnic_in
        self.cnic_out = cnic_out
        self.free = free
        self.tok_e = 0
        self.seq_e = 0
        self.steps = 0.0
        self.last = 0.0
        self.step_s = 0.0
        self.n = 0
        self.attended = 0.0  # KV bytes one decode step reads for the whole batch
        self.heap: list[tuple[float, int, SimRequest]] = []
        self.version = 0


def build(loop: EventLoop, preset: Preset) -> tuple[list[Node], list[PrefillEngine], list[DecodeEngine]]:
    """The preset's PE nodes, then its DE nodes, each with its engines (one per `gpus_per_engine` GPUs).

    A DE's KV memory is its HBM less its share of the weights and 10 GB of activations and workspace.
    """
    hw, model = preset.hardware, preset.model
    engines_per_node = hw.gpus_per_node // model.gpus_per_engine
    cnic = hw.cnic_bps * model.gpus_per_engine
    weights = model.weight_bytes * model.gpus_per_engine / model.weight_gpus
    free = int((hw.hbm_bytes * model.gpus_per_engine - weights - 10e9) / model.kv_bytes_per_token)
    nodes: list[Node] = []
    pes: list[PrefillEngine] = []
    des: list[DecodeEngine] = []
    for i in range(preset.pe_nodes + preset.de_nodes):
        node = Node(loop, i, "pe" if i < preset.pe_nodes else "de", hw.snic_bps, hw.dram_bps)
        nodes.append(node)
        for g in range(engines_per_node):
            cin = Link(loop, f"n{i}.g{g}.in", cnic, hw.model_share)
            cout = Link(loop, f"n{i}.g{g}.out", cnic, hw.model_share)
            if node.role == "pe":
                pe = PrefillEngine(len(pes), node, cin, cout)
                pes.append(pe)
                node.pes.append(pe)
            else:
                de = DecodeEngine(len(des), node, cin, cout, free)
                des.append(de)
                node.des.append(de)
    return nodes, pes, des
