"""`TrainConfig`: the settings of one `drivekd-train` run, checked when built.

Each field is one `drivekd-train` flag (underscores for dashes) and one key of the [train] table of
drivekd.toml; its default, help text and allowed values are written once, here, and the CLI
(`drivekd.cli.train`) derives its options from them. Fields are grouped by concern (`group` in
their metadata: inputs, distillation, gradients, optimisation, runtime, checkpoints), and the
object checks every value in `__post_init__`, so an invalid TrainConfig cannot exist: a bad value
raises `ConfigError` naming its flag. What needs files or models (data, store, student depth,
resume) is checked by the run planner, `drivekd.trainer.plan.plan_run`.
"""

from __future__ import annotations

import math
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from drivekd.errors import ConfigError
from drivekd.images import ImageSettings, pop_flags
from drivekd.losses.attention import DEFAULT_FULL_REDUCTION, FULL_REDUCTION_ALIASES, FULL_REDUCTIONS, full_reduction_name
from drivekd.losses.kl import DEFAULT_TEMPERATURE
from drivekd.optim.precision import PRECISIONS
from drivekd.roles import CAPABILITIES, ROLES
from drivekd.terms import RECIPES as RECIPE_TABLE
from drivekd.terms import ATTENTION, TERMS, flag_recipes
from drivekd.trainer.report_to import default_report_to, parse_report_to
from drivekd.trainer.trainable import PARAM_GROUPS
from drivekd.trainer.trainable import check_settings as check_trainable

RECIPES = tuple(RECIPE_TABLE)  # perception, reasoning, planning, multi, sft, kl, hidden (drivekd.terms)
PROJECTIONS = ("agp", "g1", "g2", "none")
DEFAULT_MIX = "0.8,0.1,0.1;0.1,0.8,0.1;0.1,0.1,0.8"
PRECISION_CHOICES = tuple(PRECISIONS)
GROUPS = ("inputs", "distillation", "gradients", "optimisation", "runtime", "validation", "checkpoints")

# Validation during training (drivekd/trainer/validation.py): what it measures never changes the
# trained numbers, so a resume may change any of it.
VALIDATION_KEYS = ("eval_data", "eval_images", "eval_every", "eval_generate", "eval_max_samples", "eval_max_new_tokens",
                   "save_best", "save_best_mode")

# Keys that may differ between a checkpoint's run and the run resuming it (they do not change the
# numbers): everything else must match, or the resumed run would not continue the same run.
RESUME_FREE = {"grad_engine", "resume", "resume_from", "resume_allow_changed", "num_workers", "progress", "plan_memory", "save_every", "keep_last", "log_every", "out", "cache",
               "data", "images", "allow_outside_images", "student", "device", "report_to", "contribution", "contribution_warn",
               "contribution_warn_steps", "contribution_every", "max_skip_share", *VALIDATION_KEYS}
# Keys a resume may raise: the run is extended, its schedule re-stretched (drivekd/trainer/schedule.py);
# a smaller total is refused by the planner.
RESUME_EXTENDABLE = {"max_steps", "epochs"}


def opt(default: Any, help: str, *, group: str, choices: tuple | None = None, minimum: str | None = None,
        required: bool = False, aliases: tuple[str, ...] = ()) -> Any:
    """A settings field: default, help and checks in one place.

    minimum: ">0" or ">=0" for numbers; `required`: the planner needs it for a real run;
    `aliases`: further flag spellings (a torchrun-safe one where torchrun's parser refuses the flag).
    """
    meta = {"help": help, "group": group, "choices": choices, "minimum": minimum, "required": required, "aliases": aliases}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """One `drivekd-train` run. Defaults follow METHOD.md section 8."""

    # ----- inputs
    student: Path | None = opt(None, "Student checkpoint folder (HF, safetensors).", group="inputs", required=True)
    data: Path | None = opt(None, "Training data JSON (Drive-KD, DriveBench, DriveLM or RoboSense format).", group="inputs", required=True)
    out: Path | None = opt(None, "Run folder: metrics.jsonl, step-NNNNNN/ checkpoints, final/.", group="inputs", required=True)
    cache: Path | None = opt(None, "Teacher store built by drivekd-cache.", group="inputs")
    images: Path | None = opt(None, "Image root for relative paths (default: the data file's folder).", group="inputs")
    allow_outside_images: bool = opt(False, "Accept image paths that escape the image root (a relative ../x.jpg, or an "
                                     "absolute path outside --images); refused by default.", group="inputs")

    # ----- distillation: which teacher terms, which signal, which layers, how mixed
    recipe: str = opt("multi", "perception | reasoning | planning (one teacher, its capability split) | multi (all samples, "
                      "three teachers, mixing matrix) | sft (CE only, the fine-tuning baseline; no store needed) | kl (CE + "
                      "tau^2 KL to the stored teacher distribution) | hidden (CE + MSE to the stored teacher hidden states "
                      "at --layers). kl and hidden need a store built with drivekd-cache build --signals logits / hidden.",
                      group="distillation", choices=RECIPES)
    split: str | None = opt(None, "With --recipe sft, kl or hidden: train on one capability split, as the single-teacher "
                            "recipes do (default: all samples).", group="distillation", choices=ROLES)
    kl_temperature: float = opt(DEFAULT_TEMPERATURE, "--recipe kl: temperature tau of CE + tau^2 KL(teacher || student) over the "
                                "stored top-k + tail buckets. Default 1.0: the paper gives no tau for its CE + KL row and its "
                                "KL pre-study works at ~1, and only at tau = 1 is the bucketed KL exact (at 2.0 it was "
                                "0.64-0.88 of the full KL; docs/STORE.md, METHOD.md 3).", group="distillation", minimum=">0")
    w_kd: float = opt(1.0, "Static weight of the KL or hidden term of --recipe kl / hidden.", group="distillation", minimum=">=0")
    teacher_role: str | None = opt(None, "--recipe kl / hidden: the store role whose logits / hidden states to read "
                                   "(default: the first role holding them).", group="distillation", choices=ROLES)
    # torchrun's own parser refuses --signal (an abbreviation of its --signals-to-handle): hence the alias.
    signal: str | None = opt(None, "Ablation: t2v | full for every teacher term (default: each recipe's own). Under "
                             "torchrun spell it --attention-signal (torchrun refuses --signal as an abbreviation of its "
                             "--signals-to-handle).", group="distillation", choices=("t2v", "full"),
                             aliases=("--attention-signal",))
    loss: str = opt("mse", "Attention loss.", group="distillation", choices=("mse", "cosine"))
    layers: str | None = opt(None, "Layer spec, e.g. 0, L-2, 1..L-3; several terms: 'perception=0;planning=L-2'.",
                             group="distillation")
    mid_range: str | None = opt(None, "Reasoning layer range variant, e.g. mid2 (indices 1..L-3); default 0..L-2.",
                                group="distillation")
    full_reduction: str = opt(DEFAULT_FULL_REDUCTION, "Full-map MSE reduction (eq. 11): entries (the authors' code, whose "
                              "numbers the paper reports: mean over all T x T entries, masked ones 0 in both maps) | "
                              "per-query (each query's mean over its keys, then the mean over queries; the system-prompt "
                              "rows dominate it). Older names, still read: reference = entries, paper = per-query.",
                              group="distillation", choices=(*FULL_REDUCTIONS, *FULL_REDUCTION_ALIASES))
    text_tokens: str = opt("paper", "Text query set X: paper (no special tokens) | not_vision (reference code). Must match "
                           "the store.", group="distillation", choices=("paper", "not_vision"))
    mix: str = opt(DEFAULT_MIX, "3x3 mixing matrix M, rows ';' columns ',': rows = sample capability, columns = teacher "
                   "(perception, reasoning, planning); each row is normalised to sum 1, as the reference trainer does.",
                   group="distillation")
    w_ce: float = opt(1.0, "Static weight of the answer CE.", group="distillation", minimum=">=0")
    w_perception: float = opt(1.0, "Static weight of the perception teacher term (0 switches it off).",
                              group="distillation", minimum=">=0")
    w_reasoning: float = opt(1.0, "Static weight of the reasoning teacher term (0 switches it off).",
                             group="distillation", minimum=">=0")
    w_planning: float = opt(1.0, "Static weight of the planning teacher term (0 switches it off).",
                            group="distillation", minimum=">=0")
    calibrate_kd: float | None = opt(None, "Set each teacher term's static weight so that its weighted gradient norm is "
                                     "this fraction of CE's (e.g. 0.1), measured on --calibrate-batches micro-batches "
                                     "before step 1 (the first ones the run trains on); the norms and weights go to "
                                     "run.json and a resume reuses them. Default: off, the paper's weights (--w-*).",
                                     group="distillation", minimum=">0")
    calibrate_batches: int = opt(4, "Micro-batches --calibrate-kd measures the gradient norms on.", group="distillation",
                                 minimum=">0")

    # ----- gradients: conflict handling and online re-weighting
    projection: str = opt("agp", "Gradient-conflict handling.", group="gradients", choices=PROJECTIONS)
    dynamic_weights: bool = opt(True, "Online loss re-weighting (METHOD.md section 7).", group="gradients")
    reweight_alpha: float = opt(0.0, "Re-weighting alpha (reaction to relative loss decay).", group="gradients",
                                minimum=">=0")
    reweight_lr: float = opt(3e-4, "Learning rate of the re-weighting AdamW.", group="gradients", minimum=">0")
    grad_engine: str = opt("auto", "Per-loss gradients for the projection: rows (K gradient rows, fastest) | gram (the "
                           "K x K Gram without rows, for students whose rows do not fit) | auto (rows while they take "
                           "<= 1/4 of the GPU, else gram; logged).", group="gradients", choices=("auto", "rows", "gram"))
    grad_buffer_dtype: str = opt("float32", "dtype of the per-loss gradient rows (bfloat16 halves their memory).",
                                 group="gradients", choices=("float32", "bfloat16"))

    # ----- optimisation
    lr: float = opt(5e-5, "Peak learning rate (AdamW).", group="optimisation", minimum=">0")
    epochs: int = opt(3, "Passes over the training samples (ignored when --max-steps is set).", group="optimisation",
                      minimum=">0")
    micro_batch: int = opt(1, "Samples per forward pass per process.", group="optimisation", minimum=">0")
    grad_accum: int = opt(4, "Micro-steps per optimizer step.", group="optimisation", minimum=">0")
    warmup_ratio: float = opt(0.03, "Share of optimizer steps with linear warmup, in [0, 1).", group="optimisation",
                              minimum=">=0")
    min_lr_ratio: float = opt(0.01, "Cosine floor as a fraction of lr, in [0, 1].", group="optimisation", minimum=">=0")
    weight_decay: float = opt(0.0, "AdamW weight decay.", group="optimisation", minimum=">=0")
    max_grad_norm: float = opt(0.0, "Clip the global gradient norm before each optimizer step (0: no clipping, as the "
                               "paper and the reference trainer; AGP sums ~K-1 copies of the CE gradient, so a small "
                               "norm would clip every step).",
                               group="optimisation", minimum=">=0")
    seed: int = opt(42, "Seed of the data order, the AGP permutations and torch's RNG.", group="optimisation",
                    minimum=">=0")
    max_steps: int | None = opt(None, "Stop after this many optimizer steps (overrides --epochs).", group="optimisation",
                                minimum=">0")
    precision: str = opt("fp32", "Weights, gradients and AdamW state (drivekd/optim/precision.py): fp32 (fp32 weights, "
                         "gradients and AdamW, 16 bytes/parameter) | bf16-offload (bf16 weights and gradients on the GPU, fp32 "
                         "master weights and AdamW on the host: exact fp32 AdamW; 4 bytes/parameter on the GPU, 16 on the "
                         "host) | bf16-kahan (bf16 weights + bf16 Kahan compensation, bf16 moments; 10 bytes/parameter) | "
                         "bf16-stochastic (bf16 weights and moments, stochastic rounding; 8 bytes/parameter, noisier) | "
                         "bf16-pure (round to nearest, as the authors' trainer: drops updates below bf16's resolution; for "
                         "comparison only). bf16 modes compute in bf16.", group="optimisation", choices=PRECISION_CHOICES)
    # which weights train (drivekd.trainer.trainable): frozen groups, or LoRA adapters
    freeze: str | None = opt(None, f"Freeze these module groups (comma list of {', '.join(PARAM_GROUPS)}): their weights "
                             "get no gradient, rows or optimizer state.", group="optimisation")
    lora: bool = opt(False, "Train LoRA adapters (peft) instead of the weights; final/ holds the adapter (adapter/) and "
                     "the merged model.", group="optimisation")
    lora_rank: int = opt(16, "LoRA rank r.", group="optimisation", minimum=">0")
    lora_alpha: float = opt(32.0, "LoRA alpha (the update is scaled by alpha / r).", group="optimisation", minimum=">0")
    lora_targets: str | None = opt(None, "Modules that get adapters: comma list of module names (q_proj) or globs on full "
                                   "names (default: the language model's attention and MLP projections).",
                                   group="optimisation")

    # ----- runtime
    dtype: str = opt("auto", "Compute dtype under autocast (weights and optimizer stay fp32): auto = bfloat16 on GPU, "
                     "float32 on CPU.", group="runtime", choices=("auto", "float32", "bfloat16", "float16"))
    device: str = opt("auto", "cpu, cuda, cuda:N (auto: cuda when available; under torchrun cuda:LOCAL_RANK).",
                      group="runtime")
    gradient_checkpointing: bool = opt(False, "Recompute decoder activations in backward (less memory, ~30% more time).",
                                       group="runtime")
    fsdp: bool = opt(False, "Under torchrun: shard the student's weights, gradients and optimizer state over the ranks "
                     "(FSDP2, one unit per decoder layer / vision block); AGP stays exact (README: Past one GPU).",
                     group="runtime")
    num_workers: int = opt(2, "DataLoader workers reading targets and decoding images while the model computes.",
                           group="runtime", minimum=">=0")
    skip_nonfinite: bool = opt(False, "Skip a micro-batch whose loss is NaN/inf instead of stopping.", group="runtime")
    max_skip_share: float = opt(0.01, "With --skip-nonfinite: stop, naming the samples, once more than this share of the "
                                "run's micro-batches was skipped (counted per rank over the whole run: a --resume continues "
                                "the count its checkpoint recorded); a start that trained on nothing never writes final/.", group="runtime")
    log_every: int = opt(1, "Write a metrics line every N optimizer steps.", group="runtime", minimum=">0")
    progress: bool = opt(True, "Show a tqdm progress bar (--no-progress: one plain line per logged step instead, for "
                         "log files).", group="runtime")
    plan_memory: bool = opt(True, "On a CUDA run, count the step's peak GPU memory with the planner at start (as --dry-run "
                            "does: seconds of CPU) for the banner and run.json; --no-plan-memory skips it.", group="runtime")
    contribution: bool = opt(True, "Log each row's share of the applied update (share_<row>, along_<row> in "
                             "metrics.jsonl) and warn when a teacher term's stays small. Free with a projection or "
                             "re-weighting (the step has the per-loss Gram); with --projection none and no re-weighting "
                             "the first micro-step of a logged step measures it (see --contribution-every; one K-batched "
                             "backward: K x the activation gradients of one point of the backward; turn it off if that "
                             "does not fit).",
                             group="runtime")
    contribution_every: int = opt(100, "With --projection none and no re-weighting (no per-loss gradients kept), "
                                  "measure the shares on the first --contribution-warn-steps logged steps, then on every "
                                  "Nth logged step (0: only those first ones). A measured step costs 1.5-7x a plain one "
                                  "on CPU (README).", group="runtime", minimum=">=0")
    contribution_warn: float = opt(0.01, "Warn (console and run.json) when a teacher term's mean share of the update "
                                   "over the first --contribution-warn-steps logged steps is under this (0: never).",
                                   group="runtime", minimum=">=0")
    contribution_warn_steps: int = opt(20, "Logged steps the --contribution-warn check averages over (fewer when the "
                                       "run logs fewer).", group="runtime", minimum=">0")
    report_to: str = opt(default_report_to(), "Also log every metrics line to: tensorboard (RUN/tensorboard/; the default "
                         "when installed), wandb (offline unless WANDB_MODE is set), a comma list, or none.", group="runtime")

    # ----- validation (drivekd/trainer/validation.py)
    eval_data: Path | None = opt(None, "Validation data (same formats as --data; with --eval-every, --eval-generate or "
                                 "--save-best the default is [data] eval of drivekd.toml): the "
                                 "student's loss rows over it (eval/ce, and the teacher terms' when the store holds their "
                                 "targets for these samples) every --eval-every steps and at the end of training.",
                                 group="validation")
    eval_images: Path | None = opt(None, "Image root of --eval-data's relative paths (default: --images, else the eval "
                                   "file's folder).", group="validation")
    eval_every: int = opt(0, "Validate every N optimizer steps (0: only at the end of training).", group="validation",
                          minimum=">=0")
    eval_generate: bool = opt(False, "Also answer a subset of --eval-data's multiple-choice questions by generation and "
                              "score them as drivekd-eval does: eval/acc_<capability> (%) and eval/acc.",
                              group="validation")
    eval_max_samples: int = opt(16, "--eval-generate: questions answered per validation (the first N multiple-choice "
                                "questions by sample id, the same ones every time).", group="validation", minimum=">0")
    eval_max_new_tokens: int = opt(32, "--eval-generate: new tokens per answer (greedy).", group="validation", minimum=">0")
    save_best: str | None = opt(None, "Keep the checkpoint with the best value of this validation metric as RUN/best/ "
                                "(drop-in, like final/; step and value in run.json): eval/ce, eval/loss_<term>, "
                                "eval/raw_<term>, eval/acc, eval/acc_<capability>.", group="validation")
    save_best_mode: str = opt("auto", "Whether --save-best keeps the smallest or largest value (auto: max for eval/acc*, "
                              "min for the losses).", group="validation", choices=("auto", "min", "max"))

    # ----- checkpoints
    save_every: int = opt(500, "Checkpoint every N optimizer steps (0: only the final model).", group="checkpoints",
                          minimum=">=0")
    keep_last: int = opt(2, "Keep the last K step checkpoints.", group="checkpoints", minimum=">0")
    resume: bool = opt(False, "Continue from the latest complete checkpoint in --out (a fresh start if there is none).",
                       group="checkpoints")
    resume_from: Path | None = opt(None, "Continue from this checkpoint folder.", group="checkpoints")
    resume_allow_changed: str | None = opt(None, "Resume although these changed since the checkpoint: data, cache, student "
                                           "(comma separated; recorded in run.json's history).", group="checkpoints")

    # ----- image settings: their own typed object and flags (drivekd.images), shared with the cache and eval
    image_settings: ImageSettings = field(default_factory=ImageSettings, metadata={
        "help": "[images] table / --tiling, --max-patches, --min-pixels, --max-pixels; must match the store's.",
        "group": "inputs", "cli": False})

    def __post_init__(self) -> None:
        if isinstance(self.image_settings, dict):
            self.image_settings = ImageSettings(**self.image_settings)
        if not isinstance(self.image_settings, ImageSettings):
            raise ConfigError(f"image_settings must be an [images] table, got {self.image_settings!r}")
        for f in fields(self):
            v = getattr(self, f.name)
            if not f.metadata.get("cli", True):
                continue
            if f.name in PATH_KEYS:
                if v is not None and not isinstance(v, Path):
                    if not isinstance(v, str):
                        raise ConfigError(f"{flag(f.name)} must be a path, got {v!r}")
                    setattr(self, f.name, Path(v))
                continue
            if v is None and f.default is None:
                continue
            _check_type(f.name, v, kind(f))
            choices, minimum = f.metadata.get("choices"), f.metadata.get("minimum")
            if choices and v not in choices:
                raise ConfigError(f"{flag(f.name)} must be one of {', '.join(choices)}, got {v!r}")
            if minimum == ">0" and not v > 0:
                raise ConfigError(f"{flag(f.name)} must be > 0, got {v!r}")
            if minimum == ">=0" and not v >= 0:
                raise ConfigError(f"{flag(f.name)} must be >= 0, got {v!r}")
        # One name per objective in run.json and checkpoints: an older alias is stored as its current name.
        self.full_reduction = full_reduction_name(self.full_reduction)
        if self.warmup_ratio >= 1:
            raise ConfigError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.min_lr_ratio > 1:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            raise ConfigError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        recipe = RECIPE_TABLE[self.recipe]
        if self.split is not None and not recipe.split_flag:
            raise ConfigError(f"--split applies to --recipe {_names(flag_recipes('split_flag'))} (recipe {self.recipe!r} "
                              "chooses its own split)")
        if self.teacher_role is not None and not recipe.picks_role:
            raise ConfigError(f"--teacher-role applies to --recipe {_names(flag_recipes('picks_role'))} (recipe "
                              f"{self.recipe!r} reads its own roles)")
        if recipe.terms and "attention" not in recipe.terms and (self.signal is not None or self.loss != "mse"):
            raise ConfigError(f"--signal and --loss choose the attention terms; --recipe {self.recipe} has none (drop them)")
        parse_report_to(self.report_to)  # unknown names, or a reporter whose package is missing
        if self.precision != "fp32" and self.dtype in ("float32", "float16"):
            raise ConfigError(f"--precision {self.precision} keeps bf16 weights, so the step computes in bf16: use --dtype auto "
                              f"or bfloat16 (not {self.dtype}), or --precision fp32")
        if self.precision != "fp32" and self.lora:
            raise ConfigError(f"--precision {self.precision} with --lora is not supported: LoRA's few trainable parameters "
                              "need little optimizer memory; use --precision fp32 with --lora")
        check_trainable(self)  # --freeze groups, --lora-* only with --lora
        if not 0 <= self.max_skip_share <= 1:
            raise ConfigError(f"--max-skip-share is a share of the run's micro-batches in [0, 1], got {self.max_skip_share}")
        if self.contribution_warn >= 1:
            raise ConfigError(f"--contribution-warn is a share of the update in [0, 1), got {self.contribution_warn}")
        if self.fsdp:
            _check_fsdp(self)
        if self.resume and self.resume_from is not None:
            raise ConfigError("give either --resume (latest checkpoint in --out) or --resume-from DIR, not both")
        check_validation(self)  # --eval-* and --save-best, by name (drivekd/trainer/validation.py checks the data)

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> "TrainConfig":
        unknown = sorted(set(d) - set(cls.keys()))
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (keys are the drivekd-train flag names with "
                              f"underscores: {', '.join(cls.keys())})")
        return cls(**d)

    def term_weight(self, role: str) -> float:
        """Static weight of a teacher term (by its row name: a role, or kl / hidden)."""
        return getattr(self, f"w_{role}") if role in ROLES else self.w_kd


def _check_fsdp(cfg: TrainConfig) -> None:
    """What --fsdp does not combine with, refused before any model loads (drivekd/trainer/fsdp.py)."""
    refuse = {
        "lora": (cfg.lora, "--lora trains adapters small enough for every GPU; drop --fsdp (or --lora)"),
        "grad_engine": (cfg.grad_engine == "gram", "--grad-engine gram batches K backwards with vmap, which FSDP's "
                        "collective backward hooks do not support; --fsdp shards the gradient rows instead: use "
                        "--grad-engine auto or rows"),
        "precision": (cfg.precision != "fp32", f"--precision {cfg.precision}'s BF16AdamW is not checked on sharded "
                      "parameters; use --precision fp32 (sharding divides its optimizer state by the ranks)"),
        "calibrate_kd": (cfg.calibrate_kd is not None, "--calibrate-kd measures with the Gram engine, which --fsdp "
                         "refuses; set the teacher weights (--w-*) from a --calibrate-kd run without --fsdp"),
        "recipe": (cfg.recipe == "hidden", "--recipe hidden trains a projection outside the student that --fsdp does "
                   "not shard or checkpoint; drop --fsdp"),
        # each rank validates its own share of --eval-data, but a sharded forward is collective: ranks
        # with uneven shares (and generation's uneven lengths) would wait on each other forever
        "validation": (cfg.eval_data is not None or cfg.eval_every > 0 or cfg.eval_generate or cfg.save_best is not None,
                       "validation during training (--eval-data, --eval-every, --eval-generate, --save-best) is not "
                       "supported with --fsdp yet; evaluate final/ after training, or drop --fsdp"),
    }
    for _, (bad, why) in refuse.items():
        if bad:
            raise ConfigError(f"--fsdp: {why}")


def _names(names: list[str]) -> str:
    """'a, b and c'."""
    return ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else "".join(names)


PATH_KEYS = ("student", "data", "images", "cache", "out", "resume_from", "eval_data", "eval_images")


def _full_mse_used(d: dict[str, Any]) -> bool:
    """Whether a run with settings `d` may have a full-map MSE term (conservative: True when unsure)."""
    r = RECIPE_TABLE.get(d.get("recipe"))
    if d.get("loss", "mse") != "mse" or (r is not None and ATTENTION.name not in r.terms):
        return False  # no attention term (sft, kl, hidden): no full-map MSE
    signal = d.get("signal")
    if signal is not None:
        return signal == "full"
    return d.get("recipe") in ("reasoning", "multi")  # the reasoning teacher's own signal is the full map


# Settings whose default changed (issue 22: kl_temperature 2.0 -> 1.0, full_reduction per-query ->
# entries), each with the test of whether it enters a run's numbers at all.
_CHANGED_DEFAULTS = {"kl_temperature": lambda d: d.get("recipe") == "kl", "full_reduction": _full_mse_used}


def recorded_settings(d: dict[str, Any]) -> dict[str, Any]:
    """Settings recorded by a run (a checkpoint's config, an ablation job's state), in today's terms,
    for comparison with the settings of a run that would continue it.

    An older alias becomes its current name (full_reduction paper -> per-query, reference -> entries),
    so a run recorded under either name resumes under either. A setting whose default has changed
    since, but which cannot change that run's numbers (kl_temperature outside --recipe kl,
    full_reduction without a full-map MSE term), reads as today's default, so such runs resume
    without naming it; where it does enter the run, the recorded value stays and a run resumed
    without it is refused, naming the flag, instead of silently changing objective.
    """
    d = dict(d)
    if isinstance(d.get("full_reduction"), str):
        d["full_reduction"] = FULL_REDUCTION_ALIASES.get(d["full_reduction"], d["full_reduction"])
    defaults = {f.name: f.default for f in fields(TrainConfig) if f.name in _CHANGED_DEFAULTS}
    for key, used in _CHANGED_DEFAULTS.items():
        if key in d and not used(d):
            d[key] = defaults[key]
    return d


# ----------------------------------------------------------------------------- validation metrics by name

# Row names of teacher terms: a role (attention terms), or a store-signal term's own name (kl, hidden).
TERM_ROWS = (*ROLES, *(t.name for t in TERMS if t.store_signal))
_METRIC = re.compile(r"^eval/(?:(?P<ce>ce)|(?P<acc>acc)(?:_(?P<cap>\w+))?|(?P<kind>loss|raw)_(?P<row>\w+))$")
METRICS_HELP = ("eval/ce, eval/loss_<term>, eval/raw_<term> (term: " + ", ".join(TERM_ROWS) + "), eval/acc, eval/acc_<capability> "
                "(" + ", ".join(CAPABILITIES) + ")")


# ----------------------------------------------------------------------------- the settings, by name


def parse_metric(name: str) -> dict[str, str | None]:
    """'eval/loss_perception' -> {"kind": "loss", "row": "perception"}; ConfigError naming --save-best otherwise."""
    m = _METRIC.match(name)
    bad = m is None or (m["cap"] is not None and m["cap"] not in CAPABILITIES) or (m["row"] is not None and m["row"] not in TERM_ROWS)
    if bad:
        raise ConfigError(f"--save-best {name!r}: not a validation metric; choose one of {METRICS_HELP}")
    if m["ce"]:
        return {"kind": "ce", "row": None}
    if m["acc"]:
        return {"kind": "acc", "cap": m["cap"]}
    return {"kind": m["kind"], "row": m["row"]}


def metric_mode(name: str, mode: str = "auto") -> str:
    """'min' or 'max': --save-best-mode, or (auto) max for the accuracies and min for the losses."""
    if mode != "auto":
        return mode
    return "max" if parse_metric(name)["kind"] == "acc" else "min"


def check_validation(cfg) -> None:
    """The validation settings by themselves (TrainConfig.__post_init__): what needs --eval-data, and
    the --save-best name. What needs the data or the store is checked by
    drivekd.trainer.validation.prepare, still before the student loads."""
    if cfg.eval_data is None:
        for key, on in (("eval_every", cfg.eval_every > 0), ("eval_generate", cfg.eval_generate),
                        ("save_best", cfg.save_best is not None), ("eval_images", cfg.eval_images is not None)):
            if on:
                raise ConfigError(f"--{key.replace('_', '-')} needs --eval-data FILE (or [data] eval in drivekd.toml): the "
                                  "validation set")
    if cfg.save_best is not None:
        kind = parse_metric(cfg.save_best)["kind"]
        if kind == "acc" and not cfg.eval_generate:
            raise ConfigError(f"--save-best {cfg.save_best} is measured by generation: add --eval-generate (or choose eval/ce)")


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def kind(f) -> type:
    """The value type of a settings field: bool, int, float, str or Path."""
    ann = str(f.type)
    for name, t in (("bool", bool), ("int", int), ("float", float), ("Path", Path), ("str", str)):
        if ann.startswith(name):
            return t
    raise TypeError(f"settings field {f.name} has an unsupported type {ann}")


def _check_type(key: str, v: Any, t: type) -> None:
    ok = {
        bool: isinstance(v, bool),
        int: isinstance(v, int) and not isinstance(v, bool),
        float: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        str: isinstance(v, str),
    }.get(t, True)
    if not ok:
        what = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[t]
        raise ConfigError(f"{flag(key)} must be {what}, got {v!r}")


def default_of(f) -> Any:
    return None if f.default is MISSING else f.default


def config_from_sources(cli: dict[str, Any], config_path: str | Path | None = None) -> TrainConfig:
    """Merge drivekd.toml ([train], with [data]/[cache] as fallbacks) and the flags given on the
    command line (`cli` holds only explicitly given flags; they win)."""
    from drivekd.config import load_config

    raw = load_config(config_path)
    cli = dict(cli)
    merged: dict[str, Any] = {"image_settings": ImageSettings.from_sources(pop_flags(cli), raw)}
    if raw:
        train = dict(raw.get("train", {}))
        unknown = sorted(set(train) - set(TrainConfig.keys()))
        if unknown:
            raise ConfigError(f"{raw['_path']}: unknown key(s) in [train]: {', '.join(unknown)} "
                              f"(keys are the drivekd-train flag names with underscores)")
        train.setdefault("data", raw.get("data", {}).get("train"))
        train.setdefault("images", raw.get("data", {}).get("images"))
        train.setdefault("cache", raw.get("cache", {}).get("out"))
        merged.update({k: v for k, v in train.items() if v is not None})
    merged.update({k: v for k, v in cli.items() if v is not None})
    # [data] eval: the validation set of a run that asks for validation (--eval-every, --eval-generate,
    # --save-best); a project whose [data] eval is a test set (drivekd-ablate's) does not validate on it
    # unasked.
    if raw and merged.get("eval_data") is None and any(merged.get(k) for k in ("eval_every", "eval_generate", "save_best")):
        merged["eval_data"] = raw.get("data", {}).get("eval")
    return TrainConfig.from_dict(merged, where=str(raw.get("_path", "flags")))


__all__ = ["DEFAULT_MIX", "METRICS_HELP", "VALIDATION_KEYS", "metric_mode", "parse_metric", "GROUPS", "PROJECTIONS", "RECIPES", "RESUME_EXTENDABLE", "RESUME_FREE", "TrainConfig", "config_from_sources", "flag",
           "recorded_settings"]
