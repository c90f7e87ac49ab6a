"""--fsdp: the student sharded with FSDP2 (`fully_shard`) under torchrun, with AGP kept exact.

What is sharded: every decoder layer and vision block (the classes the model lists in its
`_no_split_modules`, both families) is one FSDP unit, the root (embeddings, projector, LM head,
norms) another. Each rank keeps 1/world of every parameter (a DTensor, Shard(0)); a unit is
all-gathered for its forward and its backward only. Gradients and AdamW's state follow the
parameters' sharding, so weights + gradients + optimizer state per rank are 1/world of a process's.

Why AGP stays exact. FSDP2's backward reduce-scatters each unit's gradient with a mean over the
ranks, so one backward of loss k leaves on every rank its shard of the rank-averaged g_k, the row
the data-parallel path builds by an all-reduce of K x N rows. Every projection reads the rows only
through the K x K Gram G = B B^T, and G is a sum over columns: each rank folds its shard's rows
into a local (K, K) Gram, one all-reduce sums them, every rank solves the same lambda
(drivekd/projection/combine.py `coefficients`), and its update shard is lambda @ (its rows). The
re-weighting's gradient norms are sqrt(diag G) of the same Gram.

The engine: K sharded rows (K x N/world floats per rank), the rows engine sharded. The Gram engine
is refused by name under --fsdp: it gets the K per-loss Grams from ONE backward batched over K
(`is_grads_batched`, vmap over the autograd graph), and FSDP's backward hooks (all-gather before a
unit's backward, reduce-scatter after it) are collectives, which vmap cannot batch. The rows
engine needs no such trick (K ordinary backwards, retain_graph between them), and what made the
Gram engine worth having, K rows not fitting beside the model, is divided by the world size here.

Several backwards over one forward (the K per-loss rows): FSDP2 all-gathers a unit before its
backward from a hook on the unit's *outputs* and frees the gathered weights after it. An attention
loss reaches a layer through the map captured inside it (not through its output) and reaches the
root unit's projector through the vision features, so from the second backward on those hooks
would not fire and the weights the backward needs would be gone ("storage of size 0").
`per_unit_gather` keeps the root gathered across the K backwards and hooks each captured map to
all-gather its layer when the map's gradient arrives: a layer is still gathered only while its
backward runs.

`.grad` handling: FSDP2 accumulates a unit's reduced gradient in place into the parameter's
existing sharded `.grad` (`grad._local_tensor += new`), so pointing each `.grad` at a DTensor over a
slice of one flat (n,) buffer (this rank's shards, concatenated) makes autograd write straight into
a row or into the step's gradient, with no copy: the sharded twin of FlatGrads / GradBuffers.
"""

from __future__ import annotations

import contextlib
import os

import torch

from drivekd.errors import DriveKDError

__all__ = ["ShardedGrads", "check_launch", "full_weights", "full_writer", "per_unit_gather", "grad_norm_clip_", "is_sharded", "shard_student", "sharded_blocks"]


def check_launch() -> None:
    """--fsdp needs torchrun's environment (one process per rank, a process group): refused by name
    before any model loads when absent. One rank (torchrun --nproc_per_node 1) is allowed (smoke runs)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        raise DriveKDError("--fsdp shards the student over the processes of a torchrun launch; start it with "
                           "`torchrun --nproc_per_node N -m drivekd.cli.train --fsdp ...` (or drop --fsdp)")


def sharded_blocks(model) -> list[torch.nn.Module]:
    """The units FSDP wraps below the root: every module whose class a (sub)model lists in
    `_no_split_modules` (InternVL: InternVLVisionLayer + Qwen2DecoderLayer; Qwen2.5-VL:
    Qwen2_5_VLVisionBlock + Qwen2_5_VLDecoderLayer), in module order."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise DriveKDError(f"--fsdp found no decoder layer or vision block to shard in {type(model).__name__} "
                           "(no _no_split_modules); drop --fsdp for this student")
    return blocks


def shard_student(model, device: torch.device, world: int):
    """fully_shard every block, then the root, over a 1-D mesh of the world's ranks. The model may be
    on the CPU: FSDP2 moves each unit to `device` as it shards it, so no rank ever holds the whole
    model on its accelerator. Returns the (same, now sharded) model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for block in sharded_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def per_unit_gather(model, maps: dict[int, torch.Tensor]):
    """Several backwards over one forward with each decoder layer gathered only while its backward
    runs: the root unit (embeddings, projector, LM head) stays gathered across them, and a hook on
    each captured map all-gathers the layer that produced it when the map's gradient arrives (FSDP's
    own hook sits on the layer's output, which an attention loss need not reach); the layer's
    post-backward hook reduce-scatters and frees it as usual."""
    from torch.distributed.fsdp import FSDPModule

    by_layer = {getattr(getattr(m, "self_attn", None), "layer_idx", None): m for m in model.modules()
                if isinstance(m, FSDPModule) and m is not model}
    handles = []
    for idx, t in maps.items():
        unit = by_layer.get(idx)
        if unit is not None and t.requires_grad:
            handles.append(t.register_hook(lambda g, unit=unit: (unit.unshard(), g)[1]))
    model.unshard()
    model.set_reshard_after_backward(False, recurse=False)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        model.set_reshard_after_backward(True, recurse=False)
        model.reshard()


def is_sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


class ShardedGrads:
    """This rank's shards of the trainable parameters' gradients as flat (n,) buffers.

    `flat` is the step's gradient (the optimizer's `.grad`s are DTensor views of it); `rows(K)`
    gives a (K, n) buffer whose row k the `.grad`s point at while loss k's backward runs (`into`).
    n = sum of the local shard sizes (about N / world)."""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.local_shapes = [p.to_local().shape for p in params]
        self.numels = [int(torch.Size(s).numel()) for s in self.local_shapes]
        self.n = sum(self.numels)
        self.flat = torch.zeros(self.n, dtype=params[0].dtype, device=params[0].to_local().device)
        self._flat_grads = self._dtensors(self.flat)
        self.attach_flat()

    def _dtensors(self, flat: torch.Tensor) -> list[torch.Tensor]:
        from torch.distributed.tensor import DTensor

        out, o = [], 0
        for p, shape, n in zip(self.params, self.local_shapes, self.numels):
            local = flat[o : o + n].view(shape)
            out.append(DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()))
            o += n
        return out

    def attach_flat(self) -> None:
        for p, g in zip(self.params, self._flat_grads):
            p.grad = g

    def backward_into(self, flat: torch.Tensor, loss: torch.Tensor, retain_graph: bool) -> None:
        """d loss / d params, reduce-scattered (rank mean) by FSDP, added into `flat` ((n,), e.g. a
        row of a (K, n) buffer); the `.grad`s point at the step's gradient again afterwards."""
        for p, g in zip(self.params, self._dtensors(flat)):
            p.grad = g
        try:
            loss.backward(retain_graph=retain_graph)
            self._check(flat)
        finally:
            self.attach_flat()

    def check(self) -> None:
        self._check(self.flat)

    def _check(self, flat: torch.Tensor) -> None:
        """FSDP must have accumulated in place into our views (not replaced the `.grad`s)."""
        o = 0
        for p, n in zip(self.params, self.numels):
            if n and (p.grad is None or p.grad.to_local().data_ptr() != flat[o : o + n].data_ptr()):
                raise RuntimeError("--fsdp: a parameter's sharded .grad is no longer a view of the gradient buffer")
            o += n


def grad_norm_clip_(flat: torch.Tensor, max_norm: float, sum_: callable) -> torch.Tensor:
    """Global gradient norm from every rank's shard (one all-reduce of a scalar) and, when
    max_norm is finite, torch's clip rule (scale by max_norm / (norm + 1e-6) when below 1) applied
    to the shard. Returns the norm before clipping, the same on every rank."""
    sq = sum_(torch.linalg.vector_norm(flat, dtype=torch.float64).pow(2).reshape(1))
    norm = sq.sqrt()[0].to(torch.float32)
    if max_norm != float("inf"):
        flat.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(flat.dtype))
    return norm


def full_weights(model) -> dict[str, torch.Tensor]:
    """The whole student's weights gathered on rank 0's CPU (a collective: every rank calls it;
    the other ranks get an empty dict), for final/ in the plain from_pretrained layout."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # A tied weight (lm_head = embed_tokens) arrives under both names as two CPU copies, which
    # save_pretrained would write twice: keep the name the model keeps (its first).
    tied = {n for n, _ in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    return {k: v for k, v in weights.items() if k not in tied}


def full_writer(model, weights: dict[str, torch.Tensor]):
    """checkpoint.save_checkpoint's `write_model` for a sharded student: save_pretrained of the
    gathered weights, with config.json naming the student's own class (FSDP2 subclasses the module
    as FSDP<Class>, which save_pretrained would otherwise record under "architectures")."""
    import json
    from pathlib import Path

    base = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))

    def write(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=weights, safe_serialization=True)
        cfg_path = Path(folder) / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["architectures"] = [base.__name__]
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    return write
