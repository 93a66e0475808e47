"""Token choice from logits: greedy, or seeded temperature + top-p."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from dualpath_sdk.engine.sequence import Sequence


def sample(logits: torch.Tensor, seqs: Seq[Sequence]) -> list[int]:
    """One token per row of `[N, vocab]` fp32 logits, row i for seqs[i]."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(seqs):
        params = seq.params
        if params.temperature == 0:
            continue
        # shifted so the top logit is 0: a tiny temperature cannot overflow to inf - inf = nan
        row_logits = logits[row]
        probs = torch.softmax((row_logits - row_logits.max()) / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest set whose mass reaches top_p (the top token always stays)
            outside = sorted_probs.cumsum(0) - sorted_probs >= params.top_p
            sorted_probs[outside] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        chosen[row] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return chosen
