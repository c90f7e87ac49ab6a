"""The run planner: `validate(cfg, targets)` checks a whole run before any model loads and
resolves it into a `RunPlan` - everything the training loop needs.

It reads the data, opens the store, checks roles, layers, processor fingerprints and coverage of
every sample, reads the student's depth from its config.json, and checks a resume against the
checkpoint it would continue. The settings themselves (`TrainConfig`) check their own values when
built (drivekd.trainer.settings). Each problem raises one `ConfigError` (or `AlignmentError` /
`StoreError`) naming the flag to change.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from drivekd.data.sample import Sample
from drivekd.errors import AlignmentError, ConfigError, StoreError
from drivekd.images import check_store
from drivekd.layers import LayerSpecError, mid_range_spec, parse_role_layers
from drivekd.losses.recipes import TermPlan, plan_term
from drivekd.roles import ROLES, capability_index, role_index
from drivekd.store.targets import RoleInfo, TargetSource
from drivekd.trainer.settings import DEFAULT_MIX, KD_RECIPES, RESUME_FREE, TrainConfig, flag

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the resolved run


@dataclass
class RunPlan:
    """A validated run: what `train` needs, resolved from the config before any model loads."""

    cfg: TrainConfig
    samples: list[Sample]
    family: str
    student_layers_total: int
    terms: list[TermPlan]  # one per active teacher term, in ROLES order
    row_names: list[str]  # "ce", then the terms' roles: rows of the gradient buffer
    static_weights: list[float]  # per row
    mix: torch.Tensor  # (3, 3); for single recipes the term weight is 1 (no mixing)
    role_infos: dict[str, RoleInfo]
    resume_dir: Path | None
    total_steps: int
    micro_per_epoch: int
    world: int = 1
    notes: list[str] = field(default_factory=list)
    source: Any = None  # the opened TargetSource
    student_family: Any = None  # the student's drivekd.families.Family (processor loaded once, here)
    identity: dict = field(default_factory=dict)  # data/store/student content identity (drivekd.trainer.identity)

    @property
    def student_layers(self) -> list[int]:
        """Layers whose student attention the losses need."""
        return sorted({s for t in self.terms if t.attention for s in t.student_layers})

    @property
    def hidden_layers(self) -> list[int]:
        """Student layers whose hidden states a hidden term needs."""
        return sorted({s for t in self.terms if t.signal == "hidden" for s in t.student_layers})

    @property
    def multi(self) -> bool:
        return self.cfg.recipe == "multi"

    @property
    def total_micro(self) -> int:
        """Micro-steps of the whole run (per process)."""
        cfg = self.cfg
        return cfg.max_steps * cfg.grad_accum if cfg.max_steps else cfg.epochs * self.micro_per_epoch

    def mix_weights(self, capabilities: list[str]) -> torch.Tensor:
        """(B, n_terms) per-sample weights M[c_b, k] of the active terms (all ones for a single recipe)."""
        if not self.multi:
            return torch.ones(len(capabilities), len(self.terms))
        rows = torch.tensor([capability_index(c) for c in capabilities], dtype=torch.long)
        cols = torch.tensor([role_index(t.role) for t in self.terms], dtype=torch.long)
        return self.mix[rows][:, cols]


def parse_mix(spec: str) -> torch.Tensor:
    """'a,b,c;d,e,f;g,h,i' -> (3, 3) float tensor, each row normalised to sum 1 as the reference
    trainer does (so '8,1,1;...' means the paper's default). ConfigError naming --mix on a bad value."""
    try:
        rows = [[float(x) for x in r.split(",")] for r in spec.strip().split(";") if r.strip()]
    except ValueError:
        raise ConfigError(f"--mix {spec!r}: not a matrix of numbers; write rows separated by ';' and columns by ',', "
                          f"e.g. {DEFAULT_MIX!r}") from None
    if len(rows) != 3 or any(len(r) != 3 for r in rows):
        shape = f"{len(rows)}x{'/'.join(str(len(r)) for r in rows)}"
        raise ConfigError(f"--mix must be 3x3 (rows = sample capability, columns = teacher: perception, reasoning, "
                          f"planning), got {shape}: {spec!r}")
    m = torch.tensor(rows, dtype=torch.float32)
    if not torch.isfinite(m).all() or (m < 0).any():
        raise ConfigError(f"--mix entries must be finite and >= 0, got {spec!r}")
    sums = m.sum(1, keepdim=True)
    if (sums == 0).any():
        row = ROLES[int((sums[:, 0] == 0).nonzero()[0])]
        raise ConfigError(f"--mix: the {row} row is all zeros; each row (a sample capability) needs some teacher weight "
                          "(rows are normalised to sum 1). To switch a teacher off use --w-<role> 0")
    return m / sums


def student_depth(student: Path) -> tuple[str, int]:
    """(family, number of decoder layers) from the student's config.json, without loading weights."""
    from drivekd.errors import ModelError
    from drivekd.families.base import detect_family

    try:
        family = detect_family(student)
    except ModelError as e:
        raise ConfigError(f"--student: {e}") from None
    cfg = json.loads((Path(student) / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    n = text.get("num_hidden_layers")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"--student {student}: config.json has no text_config.num_hidden_layers")
    return family, n


def _check_required(cfg: TrainConfig) -> None:
    """What a real run needs beyond valid values: the inputs, and a device this machine has."""
    for key in ("student", "data", "out"):
        if getattr(cfg, key) is None:
            raise ConfigError(f"{flag(key)} is required (or set {key} in the [train] table of drivekd.toml)")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available on this machine; use --device cpu")


def _plan_terms(cfg: TrainConfig, roles: list[str], student_L: int, infos: dict[str, RoleInfo]) -> list[TermPlan]:
    """The active teacher terms (`roles`: the recipe's roles with a weight > 0), resolved."""
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


def _check_coverage(source: TargetSource, terms: list[TermPlan], samples: list[Sample]) -> tuple[list[Sample], list[str]]:
    """Every sample needs complete targets for every term. Samples the store marked 'skipped'
    (bad input at cache time) are dropped with a note; missing ones are an error."""
    dropped: set[str] = set()
    problems: list[str] = []
    for term in terms:
        for s in samples:
            st = source.sample_status(term.role, s.id)
            if st == "complete" and not term.attention:
                st = source.signal_status(term.role, s.id, term.signal)
                st = "complete" if st == "complete" else f"no {term.signal}"
            if st == "skipped":
                dropped.add(s.id)
            elif st != "complete":
                problems.append(f"{s.id} ({term.role}: {st})")
    if problems:
        shown = ", ".join(problems[:10]) + (f" and {len(problems) - 10} more" if len(problems) > 10 else "")
        kd = [t for t in terms if not t.attention]
        how = (f"`drivekd-cache build --teacher {kd[0].role} --signals {kd[0].signal}` adds them (computing only what is missing)"
               if kd else "build or complete them with `drivekd-cache build`")
        raise StoreError(f"--cache: {len(problems)} sample target(s) are not in the store: {shown}; "
                         f"{how}, or train on data the store covers (--data)")
    notes = [f"{len(dropped)} sample(s) skipped as bad input when the store was built are left out"] if dropped else []
    return [s for s in samples if s.id not in dropped], notes


def open_source(cfg: TrainConfig, targets: TargetSource | None) -> TargetSource:
    if targets is not None:
        return targets
    if cfg.cache is None:
        raise ConfigError("--cache is required: the teacher store built with `drivekd-cache build`")
    from drivekd.store.zarr_store import TeacherStore

    try:
        return TeacherStore(cfg.cache)
    except StoreError as e:
        raise ConfigError(f"--cache: {e}") from None


def validate(cfg: TrainConfig, targets: TargetSource | None = None, world: int = 1) -> RunPlan:
    """Check the whole run and resolve it. No model is loaded; the processor is (for the store check)."""
    from drivekd.data.loaders import load_samples
    from drivekd.trainer.checkpoint import is_complete, latest_checkpoint, read_meta

    _check_required(cfg)
    student = Path(cfg.student)
    if not student.is_dir():
        raise ConfigError(f"--student {student}: no such folder")
    family, student_L = student_depth(student)
    mix = parse_mix(cfg.mix)
    if not Path(cfg.data).is_file():
        raise ConfigError(f"--data {cfg.data}: no such file")
    if cfg.images is not None and not Path(cfg.images).is_dir():
        raise ConfigError(f"--images {cfg.images}: no such folder")
    samples = load_samples(cfg.data, cfg.images)
    split = cfg.split if cfg.recipe in ("sft", *KD_RECIPES) else (None if cfg.recipe == "multi" else cfg.recipe)
    if split is not None:
        samples = [s for s in samples if s.capability == split]
        if not samples:
            what = "--split" if cfg.recipe in ("sft", *KD_RECIPES) else f"--recipe {cfg.recipe}"
            raise ConfigError(f"{what}: {cfg.data} has no {split} samples (a single-teacher recipe trains on its "
                              "capability split only)")
    kd = cfg.recipe in KD_RECIPES and cfg.w_kd > 0
    roles = [] if cfg.recipe in ("sft", *KD_RECIPES) else list(ROLES) if cfg.recipe == "multi" else [cfg.recipe]
    roles = [r for r in roles if cfg.term_weight(r) > 0]
    if cfg.w_ce == 0 and not roles and not kd:
        raise ConfigError("--w-ce is 0 and no teacher term is on: nothing to train")

    # Only teacher terms need targets: a CE-only run (--recipe sft, or every teacher weight 0)
    # trains without a store.
    source = open_source(cfg, targets) if roles or kd else targets
    if kd:
        roles = [kd_role(cfg, source, student_L)]
    have = source.roles() if roles else []
    missing = [r for r in roles if r not in have]
    if missing:
        raise ConfigError(
            f"--recipe {cfg.recipe} needs the {', '.join(missing)} teacher role(s), but the store has "
            f"{', '.join(have) or 'none'}; build them with `drivekd-cache build --teacher ROLE` (--cache) or set their weight to 0"
        )
    infos = {r: source.role_info(r) for r in roles}
    from drivekd.families.base import Family

    student_family = Family.from_pretrained(student, text_tokens=cfg.text_tokens, image_processing=cfg.image_settings)
    if kd and cfg.recipe == "kl":
        check_vocabulary(infos[roles[0]], student_family, student)  # before the generic processor check: say what differs
    if infos:
        fp = student_family.fingerprint()
        for r, info in infos.items():
            if info.family != family:
                raise AlignmentError(f"--cache: the {r} teacher is {info.family} but --student is {family}; distillation needs one family")
            check_store(source, r, student_family)  # names each image setting that differs
            if info.processor != fp:
                raise AlignmentError(
                    f"--cache: the {r} targets were built with another processor/chat template/--text-tokens setting than "
                    f"--student's; their tokens would not line up. Rebuild the store or match --text-tokens"
                )
    terms = [kd_term(cfg, roles[0], infos[roles[0]], student_L)] if kd else _plan_terms(cfg, roles, student_L, infos)
    samples, notes = _check_coverage(source, terms, samples)
    if not samples:
        raise ConfigError(f"--data {cfg.data}: no trainable samples left")

    micro_per_epoch = math.ceil(len(samples) / (cfg.micro_batch * world))

    resume_dir = None
    out = Path(cfg.out)
    if cfg.resume_from is not None:
        resume_dir = Path(cfg.resume_from)
        if not is_complete(resume_dir):
            raise ConfigError(f"--resume-from {resume_dir}: not a complete checkpoint (no COMPLETE marker)")
    elif cfg.resume:
        resume_dir = latest_checkpoint(out)
        if resume_dir is None:
            notes.append(f"--resume: no complete checkpoint in {out}; starting from the beginning")
    elif out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} already holds a run; pass --resume to continue it, or choose another --out")
    if resume_dir is not None:
        meta = read_meta(resume_dir)
        old = meta["config"]
        new = cfg.to_json()
        # A key a checkpoint predates (written by an older drivekd) had its default then.
        defaults = TrainConfig().to_json()
        diffs = [k for k in new if k not in RESUME_FREE and old.get(k, defaults[k]) != new[k]]
        if diffs:
            lines = "; ".join(f"{flag(k)}: checkpoint {old.get(k)!r}, now {new[k]!r}" for k in diffs)
            raise ConfigError(f"cannot resume from {resume_dir}: settings differ ({lines}); resume with the same settings")
        if meta["world"] != world:
            raise ConfigError(f"cannot resume from {resume_dir}: it was written by {meta['world']} "
                              f"process(es), now {world}; use the same --nproc_per_node")

    from drivekd.trainer import identity

    run_id = identity.run_identity(cfg, source, [t.role for t in terms], [s.id for s in samples])
    run_id["allowed_changes"] = identity.check_resume(resume_dir, run_id, cfg.resume_allow_changed)
    identity.check_alignment_all(student_family, samples, source, [t.role for t in terms], cfg.progress)

    row_names = ["ce"] + [t.name for t in terms]
    static = [cfg.w_ce] + [cfg.term_weight(t.name) for t in terms]
    plan = RunPlan(cfg, samples, family, student_L, terms, row_names, static, mix, infos, resume_dir, 0, micro_per_epoch,
                   world, notes, source, student_family, identity=run_id)
    plan.total_steps = math.ceil(plan.total_micro / cfg.grad_accum)
    return plan


def kd_role(cfg: TrainConfig, source: TargetSource, student_L: int) -> str:
    """The store role whose logits / hidden states --recipe kl / hidden reads: --teacher-role, or
    the first role (perception, reasoning, planning) holding that signal."""
    signal = KD_RECIPES[cfg.recipe]
    have = source.roles()
    fix = f"`drivekd-cache build --teacher ROLE --signals {signal}` adds them to the store (computing only what is missing)"
    if cfg.teacher_role is not None:
        if cfg.teacher_role not in have:
            raise ConfigError(f"--teacher-role {cfg.teacher_role}: the store has no such role (have {', '.join(have) or 'none'})")
        if signal not in source.role_info(cfg.teacher_role).signals:
            raise ConfigError(f"--teacher-role {cfg.teacher_role}: its store role holds no {signal}; {fix.replace('ROLE', cfg.teacher_role)}")
        return cfg.teacher_role
    holding = [r for r in have if signal in source.role_info(r).signals]
    if signal == "hidden" and len(holding) > 1:  # the first role that stores the layers asked for
        for r in holding:
            try:
                kd_term(cfg, r, source.role_info(r), student_L)
                return r
            except ConfigError:
                continue
    if holding:
        return holding[0]
    raise ConfigError(f"--recipe {cfg.recipe} reads the teacher's {signal}, but no role of the store ({', '.join(have) or 'none'}) "
                      f"holds them (--cache); {fix}")


def check_vocabulary(info: RoleInfo, family, student: Path) -> None:
    """--recipe kl compares distributions over token ids: teacher and student must share the
    tokenizer, and the student's LM head must have a row for every id the teacher's top-k can name.
    Refused before any model loads. (LM heads padded to other sizes, as Qwen2.5-VL 3B's 151936 vs
    7B's 152064 rows, are fine: the store keeps padding rows out of the top-k.)"""
    from drivekd.store.signals import vocab_identity, vocab_rows

    lg = info.signals["logits"]
    mine = vocab_identity(family.tokenizer)
    rows = vocab_rows(json.loads((Path(student) / "config.json").read_text()))
    if mine["tokenizer_fingerprint"] != lg["tokenizer_fingerprint"]:
        raise AlignmentError(
            f"--recipe kl: the {info.role} teacher's vocabulary ({lg['tokenizer_size']} token ids) is not --student's "
            f"({mine['tokenizer_size']} token ids, another token -> id map); a KL between their next-token distributions "
            "needs one vocabulary: use a teacher of the student's tokenizer, or another recipe")
    if rows < lg["tokenizer_size"]:
        raise AlignmentError(
            f"--recipe kl: --student's LM head has {rows} rows (vocab_size in its config.json) but the {info.role} teacher's "
            f"vocabulary has {lg['tokenizer_size']} token ids (its LM head {lg['vocab_size']} rows); the vocabularies differ, "
            "so the stored top-k ids cannot all be scored by the student")


def kd_term(cfg: TrainConfig, role: str, info: RoleInfo, student_L: int) -> TermPlan:
    """The KL or hidden term of --recipe kl / hidden, resolved against the store."""
    if cfg.recipe == "kl":
        if cfg.layers or cfg.mid_range:
            raise ConfigError("--layers / --mid-range choose hidden or attention layers; --recipe kl compares next-token distributions")
        return TermPlan(role, "logits", "kl", ())
    from drivekd.layers import resolve_layers
    from drivekd.losses.attention import layer_groups
    from drivekd.roles import RECIPE_LAYERS

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
    return TermPlan(role, "hidden", "mse", tuple(pairs), int(st["hidden_size"]))


def describe(plan: RunPlan) -> str:
    """One paragraph for the log: what will be trained."""
    terms = "; ".join(f"{t.role}: {t.signal} {t.kind} at " + ", ".join(f"S{s}<-T{list(ts)}" for s, ts in t.pairs) for t in plan.terms)
    return (f"recipe {plan.cfg.recipe}, {len(plan.samples)} samples, {plan.total_steps} optimizer steps, projection "
            f"{plan.cfg.projection}, terms: {terms or 'CE only'}")


__all__ = ["RunPlan", "describe", "parse_mix", "student_depth", "validate"]
