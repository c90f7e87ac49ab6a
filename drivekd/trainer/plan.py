"""The run planner: `validate(cfg, targets)` checks a whole run before any model loads and
resolves it into a `RunPlan` - everything the training loop needs.

It reads the data, opens the store, checks roles, layers, processor fingerprints and coverage of
every sample, reads the student's depth from its config.json, and checks a resume against the
checkpoint it would continue; `validate` runs these as named checks, in that order. What differs
per kind of teacher term (which roles it reads, how its layers resolve, what it asks of the
student) is the term's own method (drivekd.terms); the --recipe is a `Recipe` looked up there. The
settings themselves (`TrainConfig`) check their own values when built (drivekd.trainer.settings).
Each problem raises one `ConfigError` (or `AlignmentError` / `StoreError`) naming the flag to change.
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
from drivekd.losses.recipes import TermPlan
from drivekd.roles import ROLES, capability_index, role_index
from drivekd.store.targets import RoleInfo, TargetSource
from drivekd.terms import ATTENTION, Recipe, Term, kinds, term_of
from drivekd.terms import recipe as recipe_named
from drivekd.trainer.settings import DEFAULT_MIX, RESUME_EXTENDABLE, RESUME_FREE, TrainConfig, flag

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
    def recipe(self) -> Recipe:
        return recipe_named(self.cfg.recipe)

    @property
    def student_layers(self) -> list[int]:
        """Layers whose student attention the losses need."""
        return sorted({s for t in self.terms for s in term_of(t).capture_layers(t)})

    @property
    def hidden_layers(self) -> list[int]:
        """Student layers whose hidden states a term needs."""
        return sorted({s for t in self.terms for s in term_of(t).hidden_layers(t)})

    @property
    def multi(self) -> bool:
        """Per-sample mixing of the terms (--recipe multi)."""
        return self.recipe.mixes

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
    if cfg.out.exists() and not cfg.out.is_dir():
        raise ConfigError(f"--out {cfg.out} is an existing file; a run is a folder (metrics.jsonl, checkpoints, final/): "
                          "give another path")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available on this machine; use --device cpu")


def _check_coverage(source: TargetSource, terms: list[TermPlan], samples: list[Sample]) -> tuple[list[Sample], list[str]]:
    """Every sample needs complete targets for every term. Samples the store marked 'skipped'
    (bad input at cache time) are dropped with a note; missing ones are an error."""
    dropped: set[str] = set()
    problems: list[str] = []
    for term in terms:
        need = term_of(term).store_signal  # None: the role's attention maps, which "complete" covers
        for s in samples:
            st = source.sample_status(term.role, s.id)
            if st == "complete" and need:
                st = source.signal_status(term.role, s.id, need)
                st = "complete" if st == "complete" else f"no {need}"
            if st == "skipped":
                dropped.add(s.id)
            elif st != "complete":
                problems.append(f"{s.id} ({term.role}: {st})")
    if problems:
        shown = ", ".join(problems[:10]) + (f" and {len(problems) - 10} more" if len(problems) > 10 else "")
        kd = [t for t in terms if term_of(t).store_signal]
        how = (f"`drivekd-cache build --teacher {kd[0].role} --signals {term_of(kd[0]).store_signal}` adds them (computing only "
               "what is missing)" if kd else "build or complete them with `drivekd-cache build`")
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


def _check_student(cfg: TrainConfig) -> tuple[Path, str, int]:
    """--student: a folder whose config.json gives its family and depth."""
    student = Path(cfg.student)
    if not student.is_dir():
        raise ConfigError(f"--student {student}: no such folder")
    return (student, *student_depth(student))


def _load_split(cfg: TrainConfig, rec: Recipe) -> list[Sample]:
    """--data (and --images), cut to the recipe's capability split."""
    from drivekd.data.loaders import load_samples

    if not Path(cfg.data).is_file():
        raise ConfigError(f"--data {cfg.data}: no such file")
    if cfg.images is not None and not Path(cfg.images).is_dir():
        raise ConfigError(f"--images {cfg.images}: no such folder")
    samples = load_samples(cfg.data, cfg.images, allow_outside_images=cfg.allow_outside_images)
    split = rec.split_of(cfg)
    if split is not None:
        samples = [s for s in samples if s.capability == split]
        if not samples:
            what = "--split" if rec.split_flag else f"--recipe {cfg.recipe}"
            raise ConfigError(f"{what}: {cfg.data} has no {split} samples (a single-teacher recipe trains on its "
                              "capability split only)")
    return samples


def _term_roles(cfg: TrainConfig, rec: Recipe, targets: TargetSource | None,
                student_L: int) -> tuple[list[Term], dict[str, list[str]], TargetSource | None]:
    """The recipe's term kinds that are on, the store roles each reads, and the opened source.
    Only teacher terms need targets: a CE-only run (--recipe sft, or every teacher weight 0)
    trains without a store."""
    on = [k for k in kinds(rec) if k.on(cfg, rec)]
    if cfg.w_ce == 0 and not on:
        raise ConfigError("--w-ce is 0 and no teacher term is on: nothing to train")
    source = open_source(cfg, targets) if on else targets
    roles = {k.name: k.roles(cfg, rec, source, student_L) for k in on}
    wanted = [r for rs in roles.values() for r in rs]
    have = source.roles() if wanted else []
    missing = [r for r in wanted if r not in have]
    if missing:
        raise ConfigError(
            f"--recipe {cfg.recipe} needs the {', '.join(missing)} teacher role(s), but the store has "
            f"{', '.join(have) or 'none'}; build them with `drivekd-cache build --teacher ROLE` (--cache) or set their weight to 0"
        )
    return on, roles, source


def _check_teachers(source: TargetSource, on: list[Term], roles: dict[str, list[str]], infos: dict[str, RoleInfo],
                    student_family, family: str, student: Path, cfg: TrainConfig) -> None:
    """Each term's own check of the student (--recipe kl: one vocabulary; first, to say what
    differs), then every role's teacher: the student's family, image settings and processor."""
    for k in on:
        k.check_student(cfg, {r: infos[r] for r in roles[k.name]}, student_family, student)
    if not infos:
        return
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


def _resolve_terms(cfg: TrainConfig, on: list[Term], roles: dict[str, list[str]], infos: dict[str, RoleInfo],
                   student_L: int) -> list[TermPlan]:
    """The run's terms, resolved against the student's depth and the store. With no term on,
    attention's resolution over no roles refuses --layers / --mid-range: nothing would read them."""
    if not on:
        return ATTENTION.resolve(cfg, [], {}, student_L)
    return [t for k in on for t in k.resolve(cfg, roles[k.name], infos, student_L)]


def _check_resume(cfg: TrainConfig, world: int, notes: list[str]) -> Path | None:
    """The checkpoint a run continues (--resume / --resume-from), with the same settings (but a
    larger --max-steps / --epochs, checked by _check_extension once the steps are counted) and
    process count; without either, --out must not already hold a run."""
    from drivekd.trainer.checkpoint import is_complete, latest_checkpoint, read_meta

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
    if resume_dir is None:
        return None
    meta = read_meta(resume_dir)
    old = meta["config"]
    new = cfg.to_json()
    # A key a checkpoint predates (written by an older drivekd) had its default then.
    defaults = TrainConfig().to_json()
    diffs = [k for k in new if k not in RESUME_FREE | RESUME_EXTENDABLE and old.get(k, defaults[k]) != new[k]]
    if diffs:
        lines = "; ".join(f"{flag(k)}: checkpoint {old.get(k)!r}, now {new[k]!r}" for k in diffs)
        raise ConfigError(f"cannot resume from {resume_dir}: settings differ ({lines}); resume with the same settings")
    if meta["world"] != world:
        raise ConfigError(f"cannot resume from {resume_dir}: it was written by {meta['world']} "
                          f"process(es), now {world}; use the same --nproc_per_node")
    return resume_dir


def validate(cfg: TrainConfig, targets: TargetSource | None = None, world: int = 1) -> RunPlan:
    """Check the whole run and resolve it. No model is loaded; the processor is (for the store check)."""
    from drivekd.families.base import Family
    from drivekd.trainer import identity

    _check_required(cfg)
    student, family, student_L = _check_student(cfg)
    mix = parse_mix(cfg.mix)
    rec = recipe_named(cfg.recipe)
    samples = _load_split(cfg, rec)
    on, roles, source = _term_roles(cfg, rec, targets, student_L)
    infos = {r: source.role_info(r) for rs in roles.values() for r in rs}
    student_family = Family.from_pretrained(student, text_tokens=cfg.text_tokens, image_processing=cfg.image_settings)
    _check_teachers(source, on, roles, infos, student_family, family, student, cfg)
    terms = _resolve_terms(cfg, on, roles, infos, student_L)
    samples, notes = _check_coverage(source, terms, samples)
    if not samples:
        raise ConfigError(f"--data {cfg.data}: no trainable samples left")
    micro_per_epoch = math.ceil(len(samples) / (cfg.micro_batch * world))
    resume_dir = _check_resume(cfg, world, notes)

    run_id = identity.run_identity(cfg, source, [t.role for t in terms], [s.id for s in samples])
    run_id["allowed_changes"] = identity.check_resume(resume_dir, run_id, cfg.resume_allow_changed)
    identity.check_alignment_all(student_family, samples, source, [t.role for t in terms], cfg.progress)

    row_names = ["ce"] + [t.name for t in terms]
    static = [cfg.w_ce] + [cfg.term_weight(t.name) for t in terms]
    plan = RunPlan(cfg, samples, family, student_L, terms, row_names, static, mix, infos, resume_dir, 0, micro_per_epoch,
                   world, notes, source, student_family, identity=run_id)
    plan.total_steps = math.ceil(plan.total_micro / cfg.grad_accum)
    if resume_dir is not None:
        _check_extension(cfg, resume_dir, plan.total_steps)
    return plan


def _check_extension(cfg: TrainConfig, resume_dir: Path, total_steps: int) -> None:
    """A resume may extend the run (a larger --max-steps / --epochs), never shorten it."""
    from drivekd.trainer.checkpoint import read_meta
    from drivekd.trainer.schedule import recorded

    meta = read_meta(resume_dir)
    end = recorded(meta, cfg).end
    if total_steps < end:
        old = meta["config"]
        was = f"--max-steps {old.get('max_steps')}" if old.get("max_steps") else f"--epochs {old.get('epochs')}"
        raise ConfigError(f"cannot resume from {resume_dir}: the run has {end} optimizer steps ({was}), these settings give "
                          f"{total_steps}; a resume can extend a run (a larger --max-steps or --epochs) but not shorten it")


def describe(plan: RunPlan) -> str:
    """One paragraph for the log: what will be trained."""
    terms = "; ".join(f"{t.role}: {t.signal} {t.kind} at " + ", ".join(f"S{s}<-T{list(ts)}" for s, ts in t.pairs) for t in plan.terms)
    return (f"recipe {plan.cfg.recipe}, {len(plan.samples)} samples, {plan.total_steps} optimizer steps, projection "
            f"{plan.cfg.projection}, terms: {terms or 'CE only'}")


__all__ = ["RunPlan", "describe", "parse_mix", "student_depth", "validate"]
