"""Teacher targets computed on the fly, as an `InMemoryTargets` source.

The normal path reads targets from the Zarr store built once by `drivekd-cache build`
(drivekd.teacher.build); this runs the teacher here, one sample at a time without gradients,
through the same capture mechanism, and keeps what a store would record: maps, masks, token ids
and the role's build metadata. Tests and tools (tools/bench_gram.py) use it instead of a store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from drivekd.data.sample import Sample
from drivekd.errors import ConfigError
from drivekd.families.base import Family, load_model
from drivekd.families.capture import capture_attention, num_decoder_layers
from drivekd.roles import ROLES
from drivekd.store.format import checkpoint_fingerprint
from drivekd.store.memory import InMemoryTargets
from drivekd.store.targets import RoleInfo, SampleTargets


def compute_targets(
    teacher_dir: str | Path,
    samples: Sequence[Sample],
    roles_layers: dict[str, list[int]],
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    text_tokens: str = "paper",
) -> InMemoryTargets:
    """Run the teacher (batch 1, no grad) over `samples` and keep the head-mean maps of the layers
    each role asks for. `roles_layers` = {role: [teacher layer, ...]}; one teacher may serve
    several roles (each role gets its own RoleInfo and map dict)."""
    teacher_dir = Path(teacher_dir)
    bad = [r for r in roles_layers if r not in ROLES]
    if bad:
        raise ConfigError(f"unknown role(s) {', '.join(map(str, bad))} in the layers per role; roles are {', '.join(ROLES)}")
    fam = Family.from_pretrained(teacher_dir, text_tokens=text_tokens)
    model = load_model(teacher_dir, dtype=dtype, device=device).eval()
    L = num_decoder_layers(model)
    wanted = sorted({int(l) for ls in roles_layers.values() for l in ls})
    targets: dict[str, dict[str, SampleTargets]] = {r: {} for r in roles_layers}
    for s in samples:
        inputs = fam.build_inputs([s]).to(device)
        lay = inputs.layouts[0]
        with torch.no_grad(), capture_attention(model, wanted) as maps:
            model(**inputs.tensors)
        for role, layers in roles_layers.items():
            targets[role][s.id] = SampleTargets(
                s.id, lay.fingerprint, lay.vision.clone(), lay.text.clone(),
                {int(l): maps[int(l)][0].float().cpu() for l in layers},  # layer -> (T, T)
                input_ids=lay.input_ids.long().cpu().clone(),  # (T,): an alignment error can name the first differing token
            )
    fp, proc = checkpoint_fingerprint(teacher_dir), fam.fingerprint()  # the store's own fingerprints
    infos = {r: RoleInfo(r, tuple(sorted(int(l) for l in ls)), L, fp, fam.name, proc) for r, ls in roles_layers.items()}
    # What a store build would record for the role, as far as it applies to targets in memory
    # (no encoding: nothing is stored). text_tokens enters a run's identity, as a store's does.
    meta = {r: {"role": r, "family": fam.name, "teacher_path": str(teacher_dir), "checkpoint_fingerprint": fp, "processor_fingerprint": proc,
                "num_teacher_layers": L, "layers": list(infos[r].layers), "text_tokens": fam.text_tokens, "sample_ids": [s.id for s in samples]}
            for r in roles_layers}
    return InMemoryTargets(infos, targets, meta)
