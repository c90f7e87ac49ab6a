"""Teachers larger than one device: `--teacher-parallel tp` (tensor parallelism under torchrun) and
`--device-map auto` (one process whose layers are spread over several GPUs).

Tensor parallelism is transformers' own (`from_pretrained` with a `DistributedConfig(tp_plan="auto")`,
checked with transformers 5.24 on CPU with gloo and on CUDA with nccl): the text model's plan shards
q/k/v and gate/up column-wise and o/down row-wise, so rank t of a group of n holds heads
[t*H/n, (t+1)*H/n) of every layer; the vision tower and projector have no plan and are replicated.
The attention capture then sees only the rank's own heads: its head mean is weighted by H_local / H
and summed over the group with one all-reduce (drivekd.families.capture.sharded_head_mean), so every
rank of the group holds the full head mean of the selected layers.

Data parallelism composes with it: world = dp x tp, ranks [g*tp, (g+1)*tp) are tensor-parallel group
g (adjacent ranks, so a group stays inside one node) and each group is one teacher replica working
through its share of the units, as plain data-parallel ranks do; only a group's first rank writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from drivekd.errors import ConfigError
from drivekd.families.base import family_class, detect_family, load_model, model_config, text_tp_plan
from drivekd.families.capture import HEAD_REDUCE_ATTR, sharded_head_mean

MODES = ("none", "tp")


@dataclass(frozen=True)
class Topology:
    """Where one process sits in a dp x tp build (tp = 1: plain data parallelism)."""

    rank: int
    world: int
    tp: int = 1

    @property
    def dp(self) -> int:
        return self.world // self.tp

    @property
    def dp_rank(self) -> int:
        """The teacher replica (tensor-parallel group) this rank belongs to: which units it runs."""
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def writer(self) -> bool:
        """The one rank of its group that writes the store (every rank of a group computes the same maps)."""
        return self.tp_rank == 0


def tp_size_for(mode: str, tp_size: int | None, world: int) -> int:
    """Ranks per teacher replica: --tp-size, or the whole world under --teacher-parallel tp."""
    if mode != "tp":
        return 1
    return tp_size or world


def check_parallel_flags(mode: str, tp_size: int | None, device_map: str | None, world: int, device: str = "cpu") -> None:
    """The flags alone (and the torchrun world size), before anything is read or loaded."""
    if mode not in MODES:
        raise ConfigError(f"--teacher-parallel must be one of {', '.join(MODES)}, not {mode!r}")
    if tp_size is not None and mode != "tp":
        raise ConfigError(f"--tp-size {tp_size} needs --teacher-parallel tp (without it every rank holds a whole teacher)")
    if device_map is not None and device_map != "auto":
        raise ConfigError(f"--device-map must be auto (transformers' sequential split over the visible GPUs), not {device_map!r}")
    if device_map is not None and mode == "tp":
        raise ConfigError("--device-map auto and --teacher-parallel tp both split the teacher across devices: pass one of them "
                          "(tp: one rank per GPU under torchrun; device-map: one process spanning the GPUs)")
    if device_map is not None and ":" in str(device):
        raise ConfigError(f"--device-map auto spreads the teacher over every visible GPU, so --device {device} names none of them: "
                          "drop --device and choose the GPUs with CUDA_VISIBLE_DEVICES")
    if device_map is not None and world > 1:
        raise ConfigError(f"--device-map auto spreads one process's teacher over every visible GPU; under torchrun ({world} ranks) "
                          "each rank would claim them all. Run it as one process, or use --teacher-parallel tp under torchrun")
    if mode == "tp":
        if world < 2:
            raise ConfigError("--teacher-parallel tp shards the teacher across ranks: launch it under torchrun with "
                              "--nproc_per_node >= 2 (e.g. `torchrun --nproc_per_node=4 -m drivekd.cli.cache build --teacher-parallel tp ...`)")
        tp = tp_size_for(mode, tp_size, world)
        if tp < 1 or world % tp:
            raise ConfigError(f"--tp-size {tp} must divide the torchrun world size {world} (world = data-parallel replicas x tp-size)")


def check_checkpoint(ckpt: Path, tp: int) -> None:
    """A tensor-parallel split of this checkpoint is possible: its text model has a plan and every
    sharded dimension divides by tp. From config.json alone, before any weight is read."""
    if tp == 1:
        return
    config = model_config(ckpt)
    plan = text_tp_plan(config)
    if not plan:
        raise ConfigError(f"--teacher-parallel tp: transformers has no tensor-parallel plan for the language model of {ckpt} "
                          f"({detect_family(ckpt)}); run it without --teacher-parallel (or with --device-map auto)")
    text = config.text_config
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        n = int(getattr(text, name))
        if n % tp:
            raise ConfigError(f"--tp-size {tp}: {ckpt}'s text model has {name} = {n}, which does not divide into {tp} "
                              f"equal shards; pick a --tp-size that divides it")


def _tp_class(base: type, mesh_manager, device: torch.device) -> type:
    """`base` with transformers' mesh hook returning drivekd's (dp x tp) mesh.

    transformers builds its mesh over the whole world (pp x dp_replicate x fsdp x tp) and wraps the
    model in FSDP whenever a data-parallel dimension is above 1. A teacher replica needs only the
    tensor-parallel part: the DistributedConfig says tp = n, dp = 1 (no FSDP), and this hook hands
    transformers a mesh whose dp_replicate dimension holds the replicas, so each rank's "tp" slice
    is its own group. Like transformers' own hook it returns the rank's device as the device map."""

    class TensorParallelTeacher(base):
        @classmethod
        def prepare_distribute_model(cls, distributed_config, device_map=None):
            return distributed_config, device, mesh_manager

    # transformers keys several decisions on a class's name and module: checkpoint key conversions
    # (Qwen2.5-VL's `model.layers.*` -> `model.language_model.layers.*`) and weight init are skipped
    # for "custom code" (a module outside transformers). This subclass changes only the mesh hook,
    # so it passes as the class it extends.
    TensorParallelTeacher.__name__ = TensorParallelTeacher.__qualname__ = base.__name__
    TensorParallelTeacher.__module__ = base.__module__
    return TensorParallelTeacher


def _mesh(topo: Topology, device: torch.device):
    from transformers.distributed.utils import TransformersDeviceMesh

    dense = torch.distributed.init_device_mesh(device.type, (1, topo.dp, 1, topo.tp), mesh_dim_names=("pp", "dp_replicate", "fsdp", "tp"))
    # Experts: none in these models, but transformers expects the view (efsdp = fsdp * tp / ep, ep = 1).
    expert = torch.distributed.init_device_mesh(device.type, (1, topo.dp, topo.tp, 1), mesh_dim_names=("pp", "dp_replicate", "efsdp", "ep"))
    return TransformersDeviceMesh(dense, expert)


def load_teacher(ckpt: Path, *, dtype: torch.dtype, device: torch.device, mode: str = "none", topo: Topology | None = None,
                 device_map: str | None = None):
    """The teacher, placed as the flags say: whole on `device`; sharded over its tensor-parallel
    group (mode "tp", with the capture's head reduction attached); or split layer-wise over the
    visible GPUs (device_map "auto", transformers/accelerate's sequential split)."""
    if mode == "tp":
        from transformers import DistributedConfig

        mm = _mesh(topo, device)
        cls = _tp_class(family_class(detect_family(ckpt)).model_class(), mm, device)
        placement = {"distributed_config": DistributedConfig(tp_plan="auto", tp_size=topo.tp)}
        model = load_model(ckpt, dtype=dtype, device=device, placement=placement, model_class=cls)
        heads = int(model.config.text_config.num_attention_heads)
        setattr(model, HEAD_REDUCE_ATTR, sharded_head_mean(mm.get_mesh("tp").get_group(), heads))
        return model
    if device_map is not None:
        return load_model(ckpt, dtype=dtype, device=device, placement={"device_map": device_map})
    return load_model(ckpt, dtype=dtype, device=device)


def rank_parameters(model) -> int:
    """Parameters this rank holds: its local shard of each sharded (DTensor) parameter, the others
    whole, a tied tensor once."""
    from torch.distributed.tensor import DTensor

    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += (p.to_local() if isinstance(p, DTensor) else p).numel()
    return n


def input_device(model, device: torch.device) -> torch.device:
    """Where a forward's inputs go: the input embeddings' device under a device map (its first
    GPU), else `device`."""
    if getattr(model, "hf_device_map", None):
        return model.get_input_embeddings().weight.device
    return device


def world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


__all__ = ["MODES", "Topology", "check_checkpoint", "check_parallel_flags", "input_device", "load_teacher", "rank_parameters", "tp_size_for",
           "world_from_env"]
