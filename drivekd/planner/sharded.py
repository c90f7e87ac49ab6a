"""The student's peak per rank under --fsdp --nproc N, from the one-process count of the same step.

The planner counts the real step on fake tensors in one process (drivekd/planner/plan.py); FSDP2
needs a process group, so its per-rank bytes are derived from that count and from the sizes of
the units drivekd/trainer/fsdp.py shards (every decoder layer / vision block, and the root:
embeddings, projector, LM head, norms):

    weights          W / N (this rank's shards) + the gathered units: the root unit (kept
                     gathered over a per-loss step's K backwards, fsdp.per_unit_gather) + 2
                     blocks (the one computing and the one prefetched)
    gradients        G / N, + one block's unsharded gradient before its reduce-scatter
    grad_rows        K x N_params / N (the sharded rows engine)
    optimizer_state  S / N
    everything else  as one process with micro-batch 1 (activations, inputs, targets, maps,
                     temporaries are per rank)

Each phase of the counted step (planner/plan.py `Counted.phases`: "micro" = forward + backwards +
combine, "update" = clip + AdamW) is divided on its own, and the rank's peak is the larger: in one
process the peak often sits in AdamW's step (its foreach temporaries are the size of the weights),
which under --fsdp is 1/N of it, so the per-rank peak moves to the backward.
"""

from __future__ import annotations

from typing import Any

import torch


def unit_bytes(model) -> dict[str, int]:
    """Bytes of the root unit, of the largest block and of all weights (`model`: e.g. on the meta device)."""
    from drivekd.trainer.fsdp import sharded_blocks

    blocks = sharded_blocks(model)
    in_block = {id(p) for b in blocks for p in b.parameters()}
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
    return {"root": size(p for p in model.parameters() if id(p) not in in_block),
            "largest_block": max(size(b.parameters()) for b in blocks),
            "weights": size(model.parameters())}


def per_rank(categories: dict[str, int], nproc: int, units: dict[str, int], update: bool = False) -> dict[str, int]:
    """One process's categories at a phase's peak -> one rank's under --fsdp over `nproc` ranks.
    `update`: the optimizer-step phase (no unit gathered; clip's and AdamW's temporaries are the
    shards', so they divide too)."""
    out = dict(categories)
    if update:
        for k in ("weights", "gradients", "grad_rows", "optimizer_state", "temporaries"):
            out[k] = categories[k] // nproc
        return out
    gathered = units["root"] + 2 * units["largest_block"]
    out["weights"] = categories["weights"] // nproc + gathered
    out["gradients"] = categories["gradients"] // nproc + units["largest_block"]
    out["grad_rows"] = categories["grad_rows"] // nproc
    out["optimizer_state"] = categories["optimizer_state"] // nproc
    return out


def describe(nproc: int) -> dict[str, Any]:
    return {"nproc": nproc, "gathered_weights": "root unit + 2 blocks"}
