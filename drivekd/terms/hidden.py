"""The hidden-state term of the CE+Hidden baseline (--recipe hidden, METHOD.md 3): MSE between the
student's hidden states at --layers, mapped to the teacher's width by a learned projection the term
owns, and the teacher's stored ones at the text positions (drivekd.losses.hidden). Row name "hidden".
"""

from __future__ import annotations

import torch

from drivekd.errors import ConfigError
from drivekd.layers import LayerSpecError, mid_range_spec, parse_role_layers, resolve_layers
from drivekd.losses.attention import layer_groups
from drivekd.losses.hidden import HiddenProjection, hidden_mse
from drivekd.losses.recipes import TermPlan
from drivekd.roles import RECIPE_LAYERS
from drivekd.store.targets import RoleInfo, SampleTargets
from drivekd.terms.base import Recipe, Term, TermForward, batch_offset


def hidden_term(cfg, role: str, info: RoleInfo, student_L: int) -> TermPlan:
    """The hidden term reading `role`: --layers (or --mid-range, else the role's recipe layers)
    resolved against both depths and paired by layer-group matching, checked against the store."""
    st = info.signals["hidden"]
    try:
        spec = mid_range_spec(cfg.mid_range) if cfg.mid_range else parse_role_layers(cfg.layers, [role]).get(role, RECIPE_LAYERS[role])
        pairs = layer_groups(resolve_layers(spec, student_L), resolve_layers(spec, info.num_teacher_layers))
    except LayerSpecError as e:
        raise ConfigError(f"--layers for --recipe hidden: {e} (student has {student_L} decoder layers, the teacher "
                          f"{info.num_teacher_layers})") from None
    need = sorted({t for _, ts in pairs for t in ts})
    missing = [t for t in need if t not in st["layers"]]
    if missing:
        raise ConfigError(f"--layers: --recipe hidden needs teacher hidden states of layers {missing}, but the store's {role} role "
                          f"holds only {st['layers']}; choose other --layers, another --teacher-role, or build that role with "
                          f"`drivekd-cache build --teacher {role} --layers ... --signals hidden`")
    return TermPlan(role, "hidden", "mse", tuple(pairs), int(st["hidden_size"]), row="hidden")


class HiddenTerm(Term):
    name = "hidden"
    signals = ("hidden",)
    store_signal = "hidden"
    recipe = Recipe("hidden", ("hidden",), split_flag=True, picks_role=True)

    def resolve(self, cfg, roles: list[str], infos: dict[str, RoleInfo], student_L: int) -> list[TermPlan]:
        return [hidden_term(cfg, role, infos[role], student_L) for role in roles]

    def reads(self, plan: TermPlan) -> tuple[list[int], dict | None]:
        return [], {"hidden": plan.teacher_layers}

    def collate(self, inputs, targets: list[SampleTargets], plan: TermPlan) -> dict:
        """Per student layer the (mean-over-group) teacher hidden states at the stored text positions,
        placed in the padded batch: (B, T, H_teacher); "mask" (B, T) marks those positions."""
        T = inputs.tensors["input_ids"].shape[1]
        out: dict = {s: torch.zeros(len(targets), T, plan.teacher_width) for s, _ in plan.pairs}
        out["mask"] = torch.zeros(len(targets), T, dtype=torch.bool)
        for b, (lay, t) in enumerate(zip(inputs.layouts, targets)):
            pos = t.hidden.positions + batch_offset(inputs, lay)
            out["mask"][b, pos] = True
            for s, ts in plan.pairs:
                out[s][b, pos] = torch.stack([t.hidden.layers[l] for l in ts]).mean(0)  # layer-group matching, as the maps
        return out

    def hidden_layers(self, plan: TermPlan) -> list[int]:
        return plan.student_layers

    def make_state(self, plan: TermPlan, student_width: int) -> torch.nn.Module:
        """The learned student -> teacher width maps, one per student layer (identity when equal)."""
        return HiddenProjection(sorted(set(plan.student_layers)), student_width, int(plan.teacher_width))

    def loss(self, plan: TermPlan, fw: TermForward, targets: dict) -> torch.Tensor:
        """Mean over the term's layers of the masked MSE; the output of layer s is hidden_states[s + 1]."""
        per_layer = []
        for s, _ in plan.pairs:
            with fw.autocast():
                h = fw.state(s, fw.out.hidden_states[s + 1])  # (B, T, H_teacher)
            per_layer.append(hidden_mse(h, targets[s], targets["mask"]))
        return torch.stack(per_layer).mean(0)


HIDDEN = HiddenTerm()
