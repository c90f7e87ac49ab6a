"""The attention term (Drive-KD's own, METHOD.md sections 3-5): the student's head-mean attention at
its loss layers against the role teacher's stored maps, t2v or full, mse or cosine. One term per
teacher role of the recipe; its row name is the role.

It also provides the Drive-KD recipes: one teacher (perception, reasoning, planning: that role's
term on its capability split) and multi (all three on every sample, mixed per sample by --mix).
"""

from __future__ import annotations

import torch

from drivekd.errors import ConfigError
from drivekd.layers import LayerSpecError, mid_range_spec, parse_role_layers
from drivekd.losses.attention import SIGNALS, attention_loss, place_maps
from drivekd.losses.recipes import TermPlan, plan_term
from drivekd.roles import ROLES
from drivekd.store.targets import RoleInfo, SampleTargets
from drivekd.terms.base import Recipe, Term, TermForward

RECIPES = (*(Recipe(r, ("attention",), roles=(r,), split=r) for r in ROLES),
           Recipe("multi", ("attention",), roles=ROLES, mixes=True))


def layer_specs(cfg, roles: list[str]) -> dict[str, str]:
    """{role: layer spec} from --layers and --mid-range (roles not named keep their recipe layers).
    With no roles this refuses both flags: nothing would read them."""
    try:
        per_role = parse_role_layers(cfg.layers, roles)
    except LayerSpecError as e:
        raise ConfigError(f"--layers {cfg.layers!r}: {e}") from None
    if cfg.mid_range is not None:
        if "reasoning" not in roles:
            raise ConfigError(f"--mid-range applies to the reasoning term; recipe {cfg.recipe!r} has none")
        if "reasoning" in per_role:
            raise ConfigError("give the reasoning layers either with --layers or with --mid-range, not both")
        try:
            per_role["reasoning"] = mid_range_spec(cfg.mid_range)
        except LayerSpecError as e:
            raise ConfigError(f"--mid-range: {e}") from None
    return per_role


def plan_terms(cfg, roles: list[str], student_L: int, infos: dict[str, RoleInfo]) -> list[TermPlan]:
    """The attention terms of `roles` (the recipe's roles with a weight > 0), resolved against the
    student's depth and the layers the store holds for each role (`infos`)."""
    per_role = layer_specs(cfg, roles)
    terms = []
    for role in roles:
        info = infos[role]
        what = "--mid-range" if role == "reasoning" and cfg.mid_range else "--layers"
        try:
            term = plan_term(role, student_L, info.num_teacher_layers, signal=cfg.signal, kind=cfg.loss, layers=per_role.get(role))
        except LayerSpecError as e:
            raise ConfigError(f"{what} for the {role} term: {e} (student has {student_L} decoder layers, "
                              f"the {role} teacher {info.num_teacher_layers})") from None
        missing = [t for t in term.teacher_layers if t not in info.layers]
        if missing:
            raise ConfigError(
                f"{what}: the {role} term needs teacher layers {missing}, but the store has only {list(info.layers)} for "
                f"{role}; choose other layers or rebuild with `drivekd-cache build --teacher {role} --layers ...`"
            )
        terms.append(term)
    return terms


class AttentionTerm(Term):
    name = "attention"
    signals = SIGNALS  # t2v | full
    store_signal = None  # the role's attention maps: what every store role holds

    def on(self, cfg, recipe: Recipe) -> bool:
        return bool(recipe.weighted_roles(cfg))

    def roles(self, cfg, recipe: Recipe, source, student_L: int) -> list[str]:
        return recipe.weighted_roles(cfg)

    def resolve(self, cfg, roles: list[str], infos: dict[str, RoleInfo], student_L: int) -> list[TermPlan]:
        return plan_terms(cfg, roles, student_L, infos)

    def reads(self, plan: TermPlan) -> tuple[list[int], dict | None]:
        return plan.teacher_layers, None

    def collate(self, inputs, targets: list[SampleTargets], plan: TermPlan) -> dict[int, torch.Tensor]:
        """Student layer -> (B, T, T) fp32: each sample's (mean-over-group) teacher map placed at its
        offset in the padded batch."""
        T = inputs.tensors["input_ids"].shape[1]
        out = {}
        for s_layer, t_layers in plan.pairs:
            # Layer-group matching: the student layer learns the mean of its teacher group.
            ms = [(t.maps[t_layers[0]] if len(t_layers) == 1 else torch.stack([t.maps[l] for l in t_layers]).mean(0)).float()
                  for t in targets]
            out[s_layer] = place_maps(ms, T, inputs.padding_side)
        return out

    def capture_layers(self, plan: TermPlan) -> list[int]:
        return plan.student_layers

    def loss(self, plan: TermPlan, fw: TermForward, targets: dict) -> torch.Tensor:
        per_layer = [attention_loss(plan.signal, plan.kind, fw.maps[s], targets[s], text=fw.text, vision=fw.vision,
                                    valid=fw.valid, reduction=fw.cfg.full_reduction) for s, _ in plan.pairs]
        return torch.stack(per_layer).mean(0)  # (B,): mean over the term's layers


ATTENTION = AttentionTerm()
