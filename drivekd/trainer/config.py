"""The training run's typed config and its up-front validation.

`TrainConfig` holds exactly the `drivekd-train` flags (underscores for dashes; the same keys are
accepted in the [train] table of drivekd.toml). `validate(cfg, targets)` checks the whole run
before any model loads - flags, data, store roles and layers, the student's depth read from its
config.json - and returns a `RunPlan`: everything the loop needs, resolved. Each problem raises
one `ConfigError` (or `AlignmentError`/`StoreError`) naming the flag to change.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from drivekd.data.sample import CAPABILITIES, Sample
from drivekd.errors import AlignmentError, ConfigError, StoreError
from drivekd.losses.recipes import LayerSpecError, TermPlan, mid_range_spec, parse_role_layers, plan_term
from drivekd.store.targets import ROLES, RoleInfo, TargetSource

log = logging.getLogger(__name__)

RECIPES = ("perception", "reasoning", "planning", "multi")
PROJECTIONS = ("agp", "g1", "g2", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MIX = "0.8,0.1,0.1;0.1,0.8,0.1;0.1,0.1,0.8"

# Keys that may differ between a checkpoint's run and the run resuming it (they do not change the
# numbers): everything else must match, or the resumed run would not continue the same run.
RESUME_FREE = {"resume", "resume_from", "resume_allow_changed", "num_workers", "progress", "save_every", "keep_last", "log_every", "out", "cache",
               "data", "images", "student", "device"}
PATH_KEYS = ("student", "data", "images", "cache", "out", "resume_from")


@dataclass
class TrainConfig:
    """One `drivekd-train` run. Defaults follow METHOD.md section 8."""

    student: Path | None = None
    """Student checkpoint folder (HF, safetensors)."""
    data: Path | None = None
    """Training data JSON (Drive-KD or DriveBench format)."""
    out: Path | None = None
    """Run folder: metrics.jsonl, step-NNNNNN/ checkpoints, final/."""
    cache: Path | None = None
    """Teacher store (Zarr). Not needed when targets are passed to `train` directly."""
    images: Path | None = None
    """Image root for relative paths (default: the data file's folder)."""

    recipe: str = "multi"
    """perception | reasoning | planning (one teacher, its capability split) | multi (all samples, three teachers, mixing matrix)."""
    signal: str | None = None
    """Ablation: t2v | full for every teacher term (default: each recipe's own)."""
    loss: str = "mse"
    """mse | cosine attention loss."""
    layers: str | None = None
    """Layer spec, e.g. '0', 'L-2', '1..L-3'; with several terms 'perception=0;planning=L-2'."""
    mid_range: str | None = None
    """Reasoning layer range variant, e.g. 'mid2' (indices 1..L-3); default 0..L-2."""
    full_reduction: str = "paper"
    """Full-map MSE reduction: paper (eq. 11, per-query mean over valid keys) | reference (mean over T x T)."""
    text_tokens: str = "paper"
    """Text query set X: paper (no special tokens) | not_vision (reference code). Must match the store."""
    mix: str = DEFAULT_MIX
    """3x3 mixing matrix M, rows = sample capability, columns = teacher (perception, reasoning, planning)."""
    w_ce: float = 1.0
    """Static weight of the answer CE."""
    w_perception: float = 1.0
    """Static weight of the perception teacher term."""
    w_reasoning: float = 1.0
    """Static weight of the reasoning teacher term."""
    w_planning: float = 1.0
    """Static weight of the planning teacher term."""
    projection: str = "agp"
    """Gradient-conflict handling: agp | g1 | g2 | none."""
    dynamic_weights: bool = True
    """Online loss re-weighting (METHOD.md section 7)."""
    reweight_alpha: float = 0.0
    """Re-weighting alpha (reaction to relative loss decay)."""
    reweight_lr: float = 3e-4
    """Learning rate of the re-weighting AdamW."""

    lr: float = 5e-5
    """Peak learning rate (AdamW)."""
    epochs: int = 3
    """Passes over the training samples (ignored when max_steps is set)."""
    micro_batch: int = 1
    """Samples per forward pass per process."""
    grad_accum: int = 4
    """Micro-steps per optimizer step."""
    warmup_ratio: float = 0.03
    """Share of optimizer steps with linear warmup."""
    min_lr_ratio: float = 0.01
    """Cosine floor as a fraction of lr."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm before each optimizer step (0: no clipping)."""
    seed: int = 42
    """Seed of the data order, the AGP permutations and torch's RNG."""
    dtype: str = "auto"
    """Compute dtype under autocast (weights and optimizer stay fp32): auto = bfloat16 on GPU, float32 on CPU."""
    grad_buffer_dtype: str = "float32"
    """dtype of the per-loss gradient rows (float32 | bfloat16): bf16 halves their memory."""
    device: str = "auto"
    """cpu, cuda, cuda:1 ... (auto: cuda when available; under torchrun cuda:LOCAL_RANK)."""
    gradient_checkpointing: bool = False
    """Recompute decoder activations in backward (less memory, ~30% more time)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides epochs; tests and demos)."""
    num_workers: int = 2
    """DataLoader workers reading targets and decoding images while the model computes."""
    save_every: int = 500
    """Checkpoint every N optimizer steps (0: only the final model)."""
    keep_last: int = 2
    """Keep the last K step checkpoints."""
    resume: bool = False
    """Continue from the latest complete checkpoint in --out (a fresh start if there is none)."""
    resume_from: Path | None = None
    """Continue from this checkpoint folder."""
    resume_allow_changed: str | None = None
    """Resume although these changed since the checkpoint: data, cache, student (comma separated; recorded in run.json)."""
    skip_nonfinite: bool = False
    """Skip a micro-batch whose loss is NaN/inf instead of stopping."""
    log_every: int = 1
    """Write a metrics line every N optimizer steps."""
    progress: bool = True
    """Show a tqdm progress bar."""

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "TrainConfig":
        unknown = sorted(set(d) - set(cls.keys()))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (valid: {', '.join(cls.keys())})")
        kw = {}
        for k, v in d.items():
            kw[k] = Path(v) if k in PATH_KEYS and v is not None else v
        return cls(**kw)


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def config_from_sources(cli: dict[str, Any], config_path: str | Path | None = None) -> TrainConfig:
    """Merge drivekd.toml ([train], plus [data]/[cache] fallbacks) with the flags given on the
    command line (`cli` holds only explicitly given flags; they win)."""
    from drivekd.config import load_config

    raw = load_config(config_path)
    merged: dict[str, Any] = {}
    if raw:
        base = Path(raw["_path"]).parent
        train = dict(raw.get("train", {}))
        unknown = sorted(set(train) - set(TrainConfig.keys()))
        if unknown:
            raise ConfigError(f"{raw['_path']}: unknown key(s) in [train]: {', '.join(unknown)} "
                              f"(keys are the drivekd-train flag names with underscores)")
        for k in PATH_KEYS:
            if isinstance(train.get(k), str) and not Path(train[k]).is_absolute():
                train[k] = str((base / train[k]).resolve())
        if "data" not in train and raw.get("data", {}).get("train"):
            train["data"] = raw["data"]["train"]
        if "images" not in train and raw.get("data", {}).get("images"):
            train["images"] = raw["data"]["images"]
        if "cache" not in train and raw.get("cache", {}).get("out"):
            train["cache"] = raw["cache"]["out"]
        merged.update(train)
    merged.update({k: v for k, v in cli.items() if v is not None})
    return TrainConfig.from_dict(merged, where=str(raw.get("_path", "flags")))


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
    identity: dict = field(default_factory=dict)  # data/store/student content identity (drivekd.trainer.identity)

    @property
    def student_layers(self) -> list[int]:
        """Layers whose student attention the losses need."""
        return sorted({s for t in self.terms for s in t.student_layers})

    @property
    def multi(self) -> bool:
        return self.cfg.recipe == "multi"

    def mix_weights(self, capabilities: list[str]) -> torch.Tensor:
        """(B, n_terms) per-sample weights M[c_b, k] of the active terms (all ones for a single recipe)."""
        if not self.multi:
            return torch.ones(len(capabilities), len(self.terms))
        rows = torch.tensor([CAPABILITIES.index(c) for c in capabilities])
        cols = torch.tensor([ROLES.index(t.role) for t in self.terms])
        return self.mix[rows][:, cols]


def parse_mix(spec: str) -> torch.Tensor:
    """'a,b,c;d,e,f;g,h,i' -> (3, 3) float tensor. ConfigError naming --mix on a bad value."""
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
    return m


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


def _check_options(cfg: TrainConfig) -> None:
    def choice(key, options):
        v = getattr(cfg, key)
        if v not in options:
            raise ConfigError(f"{flag(key)} must be one of {', '.join(options)}, got {v!r}")

    def positive(key, allow_zero=False, integer=False):
        v = getattr(cfg, key)
        if integer and (not isinstance(v, int) or isinstance(v, bool)):
            raise ConfigError(f"{flag(key)} must be an integer, got {v!r}")
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
            raise ConfigError(f"{flag(key)} must be {'>= 0' if allow_zero else '> 0'}, got {v!r}")

    for key in ("student", "data", "out"):
        if getattr(cfg, key) is None:
            raise ConfigError(f"{flag(key)} is required (or set {key} in the [train] table of drivekd.toml)")
    choice("recipe", RECIPES)
    if cfg.signal is not None:
        choice("signal", ("t2v", "full"))
    choice("loss", ("mse", "cosine"))
    choice("full_reduction", ("paper", "reference"))
    choice("text_tokens", ("paper", "not_vision"))
    choice("projection", PROJECTIONS)
    choice("dtype", DTYPES)
    choice("grad_buffer_dtype", ("float32", "bfloat16"))
    for key in ("w_ce", "w_perception", "w_reasoning", "w_planning", "weight_decay", "max_grad_norm", "reweight_alpha",
                "warmup_ratio", "min_lr_ratio"):
        positive(key, allow_zero=True)
    for key in ("lr", "reweight_lr"):
        positive(key)
    for key in ("epochs", "micro_batch", "grad_accum", "keep_last", "log_every"):
        positive(key, integer=True)
    for key in ("num_workers", "save_every"):
        positive(key, allow_zero=True, integer=True)
    if cfg.max_steps is not None:
        positive("max_steps", integer=True)
    if cfg.warmup_ratio >= 1:
        raise ConfigError(f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.min_lr_ratio > 1:
        raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise ConfigError(f"--seed must be an integer >= 0, got {cfg.seed!r}")
    if cfg.device != "auto" and cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available on this machine; use --device cpu")
    if cfg.device != "auto" and not cfg.device.startswith(("cpu", "cuda")):
        raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {cfg.device!r}")
    if cfg.resume and cfg.resume_from is not None:
        raise ConfigError("give either --resume (latest checkpoint in --out) or --resume-from DIR, not both")


def _plan_terms(cfg: TrainConfig, student_L: int, infos: dict[str, RoleInfo]) -> list[TermPlan]:
    roles = list(ROLES) if cfg.recipe == "multi" else [cfg.recipe]
    weights = {r: getattr(cfg, f"w_{r}") for r in ROLES}
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
        if weights[role] == 0:
            continue  # a zero weight switches the term off: no targets read, no backward
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
    status_fn = getattr(source, "sample_status", None)
    dropped: set[str] = set()
    problems: list[str] = []
    for term in terms:
        for s in samples:
            if status_fn is not None:
                st = status_fn(term.role, s.id)
            else:
                try:
                    source.get(term.role, s.id, [])
                    st = "complete"
                except StoreError:
                    st = "missing"
            if st == "skipped":
                dropped.add(s.id)
            elif st != "complete":
                problems.append(f"{s.id} ({term.role}: {st})")
    if problems:
        shown = ", ".join(problems[:10]) + (f" and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise StoreError(f"--cache: {len(problems)} sample target(s) are not in the store: {shown}; "
                         "build or complete them with `drivekd-cache build`, or train on data the store covers (--data)")
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

    _check_options(cfg)
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
    if cfg.recipe != "multi":
        samples = [s for s in samples if s.capability == cfg.recipe]
        if not samples:
            raise ConfigError(f"--recipe {cfg.recipe}: {cfg.data} has no {cfg.recipe} samples (a single-teacher recipe "
                              "trains on its capability split only)")
    if cfg.w_ce == 0 and all(getattr(cfg, f"w_{r}") == 0 for r in ROLES):
        raise ConfigError("--w-ce and every teacher weight are 0: nothing to train")

    source = open_source(cfg, targets)
    roles = list(ROLES) if cfg.recipe == "multi" else [cfg.recipe]
    roles = [r for r in roles if getattr(cfg, f"w_{r}") > 0]
    have = source.roles()
    missing = [r for r in roles if r not in have]
    if missing:
        raise ConfigError(
            f"--recipe {cfg.recipe} needs the {', '.join(missing)} teacher role(s), but the store has "
            f"{', '.join(have) or 'none'}; build them with `drivekd-cache build --teacher ROLE` (--cache) or set their weight to 0"
        )
    infos = {r: source.role_info(r) for r in roles}
    if infos:
        from drivekd.families.base import Family

        fp = Family.from_pretrained(student, text_tokens=cfg.text_tokens).fingerprint()
        for r, info in infos.items():
            if info.family != family:
                raise AlignmentError(f"--cache: the {r} teacher is {info.family} but --student is {family}; distillation needs one family")
            if info.processor != fp:
                raise AlignmentError(
                    f"--cache: the {r} targets were built with another processor/chat template/--text-tokens setting than "
                    f"--student's; their tokens would not line up. Rebuild the store or match --text-tokens"
                )
    terms = _plan_terms(cfg, student_L, infos)
    samples, notes = _check_coverage(source, terms, samples)
    if not samples:
        raise ConfigError(f"--data {cfg.data}: no trainable samples left")

    G = cfg.micro_batch * world
    micro_per_epoch = math.ceil(len(samples) / G)
    total_micro = cfg.max_steps * cfg.grad_accum if cfg.max_steps else cfg.epochs * micro_per_epoch
    total_steps = math.ceil(total_micro / cfg.grad_accum)

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
        old = read_meta(resume_dir)["config"]
        new = cfg.to_json()
        diffs = [k for k in new if k not in RESUME_FREE and old.get(k) != new[k]]
        if diffs:
            lines = "; ".join(f"{flag(k)}: checkpoint {old.get(k)!r}, now {new[k]!r}" for k in diffs)
            raise ConfigError(f"cannot resume from {resume_dir}: settings differ ({lines}); resume with the same settings")
        if read_meta(resume_dir)["world"] != world:
            raise ConfigError(f"cannot resume from {resume_dir}: it was written by {read_meta(resume_dir)['world']} "
                              f"process(es), now {world}; use the same --nproc_per_node")

    from drivekd.trainer import identity

    run_id = identity.run_identity(cfg, source, [t.role for t in terms], [s.id for s in samples])
    run_id["allowed_changes"] = identity.check_resume(resume_dir, run_id, cfg.resume_allow_changed)
    identity.check_alignment_all(student, cfg.text_tokens, samples, source, [t.role for t in terms], cfg.progress)

    row_names = ["ce"] + [t.role for t in terms]
    static = [cfg.w_ce] + [getattr(cfg, f"w_{t.role}") for t in terms]
    return RunPlan(cfg, samples, family, student_L, terms, row_names, static, mix, infos, resume_dir, total_steps,
                   micro_per_epoch, world, notes, source, identity=run_id)


def describe(plan: RunPlan) -> str:
    """One paragraph for the log: what will be trained."""
    terms = "; ".join(f"{t.role}: {t.signal} {t.kind} at " + ", ".join(f"S{s}<-T{list(ts)}" for s, ts in t.pairs) for t in plan.terms)
    return (f"recipe {plan.cfg.recipe}, {len(plan.samples)} samples, {plan.total_steps} optimizer steps, projection "
            f"{plan.cfg.projection}, terms: {terms or 'CE only'}")


__all__ = ["RunPlan", "TrainConfig", "config_from_sources", "describe", "flag", "parse_mix", "validate"]
