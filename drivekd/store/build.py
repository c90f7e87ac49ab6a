"""`drivekd-cache build`: run each teacher once over every sample, store its head-mean attention.

Work is cut into fixed batches of the dataset order (batch b = samples[b*bs:(b+1)*bs]) whatever
is already stored, so a resumed or sharded build runs every forward with exactly the inputs of
an uninterrupted single-process build: the stored arrays are bit-identical. Under torchrun, rank
r takes batches b with b % world == r; ranks write disjoint sample groups.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from drivekd.data.loaders import load_samples
from drivekd.data.sample import Sample
from drivekd.errors import ConfigError, DataError
from drivekd.families.base import Family, load_model
from drivekd.families.capture import capture_attention
from drivekd.store.targets import ROLES
from drivekd.store.zarr_store import Encoding, TeacherStore, teacher_fingerprint


def recipe_layers(role: str, num_layers: int) -> list[int]:
    """Teacher layers a role's recipes need (METHOD.md section 4), 0-based.

    perception: index 0; planning: L-2; reasoning: every index of layer-group matching over 0..L-2,
    which also covers the "mid2" variant (1..L-3).
    """
    L = num_layers
    if role == "perception":
        return [0]
    if role == "planning":
        return [L - 2]
    if role == "reasoning":
        return list(range(0, L - 1))
    raise ConfigError(f"--teacher: unknown role {role!r} (choose from {', '.join(ROLES)} or all)")


@dataclass
class BuildConfig:
    """Everything a build needs, validated before any model loads."""

    teachers: dict[str, Path]  # role -> checkpoint folder
    data: Path
    images: Path | None
    out: Path
    layers: dict[str, list[int]] | None = None  # role -> layers; None = recipe defaults
    batch_size: int = 1
    encoding: Encoding = field(default_factory=Encoding)
    skip_bad: bool = False
    overwrite: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    image_processing: dict | None = None
    progress: bool = True

    def validate(self) -> None:
        if not self.teachers:
            raise ConfigError("no teacher: pass --teacher ROLE with --model DIR, or set [teachers] in drivekd.toml")
        for role, path in self.teachers.items():
            if role not in ROLES:
                raise ConfigError(f"--teacher: unknown role {role!r} (choose from {', '.join(ROLES)} or all)")
            if not Path(path).is_dir():
                raise ConfigError(f"--model for role {role}: {path} is not a folder (set --model or [teachers].{role} in drivekd.toml)")
        if not Path(self.data).is_file():
            raise ConfigError(f"--data {self.data}: no such file (or set [data].train in drivekd.toml)")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, not {self.batch_size}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be float32, bfloat16 or float16, not {self.dtype!r}")


def dataset_fingerprint(samples: list[Sample]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.id, s.question, s.answer, [str(p) for p in s.images]]).encode())
    return h.hexdigest()


def _fault_hook():
    """Test hook: DRIVEKD_FAULT_KILL_AFTER=N sends SIGKILL to this process after N attention-row
    writes, a real kill -9 at a reproducible point (tests of resume use it)."""
    n = os.environ.get("DRIVEKD_FAULT_KILL_AFTER")
    if not n:
        return None
    left = [int(n)]

    def hook():
        left[0] -= 1
        if left[0] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _dist():
    """(rank, world) under torchrun, initialising the process group; (0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), world


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def build(cfg: BuildConfig) -> dict:
    """Build (or resume) the store. Returns a summary dict (rank 0's view after all ranks finish)."""
    cfg.validate()
    rank, world = _dist()
    samples = load_samples(cfg.data, cfg.images, check_images=False)
    ids = [s.id for s in samples]
    store = TeacherStore(cfg.out, mode="a") if rank == 0 else None
    _barrier(world)
    store = store or TeacherStore(cfg.out, mode="a")

    # Roles that name the same checkpoint share one forward pass.
    by_ckpt: dict[Path, list[str]] = {}
    for role in ROLES:
        if role in cfg.teachers:
            by_ckpt.setdefault(Path(cfg.teachers[role]).resolve(), []).append(role)

    fault = _fault_hook()
    totals = {"written": 0, "skipped": 0, "already": 0, "bytes": 0, "seconds": 0.0, "loop_seconds": 0.0}
    t0 = time.perf_counter()
    for ckpt, roles in by_ckpt.items():
        family = Family.from_pretrained(ckpt, image_processing=cfg.image_processing)
        ncfg = json.loads((ckpt / "config.json").read_text())
        L = int((ncfg.get("text_config") or ncfg)["num_hidden_layers"])
        layers = {}
        for role in roles:
            want = (cfg.layers or {}).get(role) or recipe_layers(role, L)
            bad = [l for l in want if not 0 <= l < L]
            if bad:
                raise ConfigError(f"--layers {bad} for role {role}: the teacher {ckpt} has {L} decoder layers (0..{L - 1})")
            layers[role] = sorted(set(int(l) for l in want))
        meta_common = {
            "family": family.name,
            "teacher_path": str(ckpt),
            "teacher_fingerprint": teacher_fingerprint(ckpt),
            "processor_fingerprint": family.fingerprint(),
            "text_tokens": family.text_tokens,
            "num_teacher_layers": L,
            "encoding": cfg.encoding.to_dict(),
            "dataset_fingerprint": dataset_fingerprint(samples),
            "sample_ids": ids,
            "layout": "attn[k, i*(i+1)/2 + j] = A_layers[k][i, j] * (i + 1), j <= i, float16",
        }
        if rank == 0:
            for role in roles:
                store.init_role(role, {**meta_common, "role": role, "layers": layers[role]}, overwrite=cfg.overwrite)
        _barrier(world)

        union = sorted(set().union(*layers.values()))
        batches = [samples[i : i + cfg.batch_size] for i in range(0, len(samples), cfg.batch_size)]
        mine = [b for k, b in enumerate(batches) if k % world == rank]
        todo = [b for b in mine if any(store.sample_status(r, s.id) not in ("complete", "skipped") for s in b for r in roles)]
        totals["already"] += sum(len(b) for b in mine) - sum(len(b) for b in todo)
        if not todo:
            continue
        dtype = getattr(torch, cfg.dtype)
        model = load_model(ckpt, dtype=dtype, device=cfg.device).eval()
        bar = tqdm(total=sum(len(b) for b in todo), desc=f"teacher {'+'.join(roles)}", unit="sample",
                   disable=not cfg.progress or rank != 0, dynamic_ncols=True)
        t_loop = time.perf_counter()
        # One writer thread: compression and file writes of batch k overlap the forward of k+1.
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending = []
            for batch in todo:
                good = []
                for s in batch:
                    try:
                        Family.load_images(s)
                        good.append(s)
                    except DataError as e:
                        if not cfg.skip_bad:
                            raise
                        for r in roles:
                            store.mark_skipped(r, s.id, str(e))
                        totals["skipped"] += 1
                        bar.update(1)
                if not good:
                    continue
                inputs = family.build_inputs(good).to(cfg.device)
                am = inputs.tensors["attention_mask"].bool()
                with torch.no_grad(), capture_attention(model, union, attention_mask=am) as maps:
                    model(**inputs.tensors)
                maps = {l: m.float().cpu() for l, m in maps.items()}
                for b, (s, lay) in enumerate(zip(good, inputs.layouts)):
                    # Cut the sample's own rows/columns out of the padded batch.
                    pos = am[b].cpu().nonzero().squeeze(1)
                    lo, hi = int(pos[0]), int(pos[-1]) + 1
                    for r in roles:
                        if store.sample_status(r, s.id) == "complete":
                            continue
                        rmaps = [maps[l][b, lo:hi, lo:hi].contiguous() for l in layers[r]]
                        pending.append(writer.submit(store.write_sample, r, s.id, lay.input_ids, lay.vision, lay.text, rmaps, layers[r], cfg.encoding, fault))
                done_bytes = sum(f.result() for f in pending if f.done())
                totals["bytes"] += done_bytes
                pending = [f for f in pending if not f.done()]
                totals["written"] += len(good)
                bar.update(len(good))
                bar.set_postfix_str(f"{totals['bytes'] / 2**20:.1f} MiB raw fp16 written")
            totals["bytes"] += sum(f.result() for f in pending)
        totals["loop_seconds"] += time.perf_counter() - t_loop  # teacher pass after the model loaded
        bar.close()
    _barrier(world)
    totals["seconds"] = time.perf_counter() - t0
    if world > 1:
        import torch.distributed as dist

        t = torch.tensor([totals["written"], totals["skipped"], totals["already"]], dtype=torch.float64)
        dist.all_reduce(t)
        totals["written"], totals["skipped"], totals["already"] = (int(x) for x in t.tolist())
    summaries = {r: store.summary(r) for r in ROLES if r in cfg.teachers} if rank == 0 else {}
    return {"rank": rank, "world": world, **totals, "roles": summaries}
