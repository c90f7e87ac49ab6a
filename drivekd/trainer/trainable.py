"""Which student weights train: `--freeze GROUPS` and `--lora` (LoRA adapters through `peft`).

Everything downstream takes the parameters with `requires_grad` only: the flat gradient, the
per-loss gradient rows and the Gram engine (drivekd/trainer/step.py), the optimizer, and the
planner's gradient/row/optimizer counts. So a frozen vision tower or a LoRA student costs neither
gradient memory nor projection work for the weights it does not train.

* `--freeze vision,projector,...` names module groups (`PARAM_GROUPS`); each family maps them to
  module-name prefixes of its HF model (`Family.param_groups`, drivekd/families/base.py).
* `--lora` wraps the student in a `peft.PeftModel`: every base weight is frozen and rank-r adapters
  (`--lora-rank`, `--lora-alpha`) are added to the Linear modules `--lora-targets` matches (default:
  the language model's attention and MLP projections, `Family.lora_targets`). The attention
  modules keep their class and `layer_idx`, so the attention capture works unchanged.
* Checkpoints of a LoRA run hold the adapter only (the frozen base is the --student checkpoint,
  whose identity resume checks); `final/` holds the adapter in `final/adapter/` and the merged
  model (W + alpha/r * B A) in `final/` itself, which loads with the family's `from_pretrained`.

Nothing here imports torch or peft at module level: the settings import PARAM_GROUPS.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import warnings
from pathlib import Path
from typing import Any, Callable

from drivekd.errors import ConfigError

# --freeze group names; what each covers is the family's business (Family.param_groups).
PARAM_GROUPS = ("vision", "projector", "language", "embeddings", "lm_head")
ADAPTER_DIR = "adapter"  # final/adapter/: the LoRA adapter next to the merged model
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_NAME = "default"


# ----------------------------------------------------------------------------- settings (pure)


def parse_list(spec: str | None) -> list[str]:
    """'a, b,,c' -> ['a', 'b', 'c']."""
    return [s.strip() for s in (spec or "").split(",") if s.strip()]


def check_settings(cfg) -> None:
    """The TrainConfig's --freeze / --lora fields on their own (no model needed)."""
    groups = parse_list(cfg.freeze)
    bad = [g for g in groups if g not in PARAM_GROUPS]
    if bad:
        raise ConfigError(f"--freeze: unknown group(s) {', '.join(bad)}; choose from {', '.join(PARAM_GROUPS)} (comma separated)")
    if cfg.freeze is not None and not groups:
        raise ConfigError("--freeze: give at least one group (" + ", ".join(PARAM_GROUPS) + ")")
    if cfg.lora and groups:
        raise ConfigError("--freeze with --lora: LoRA already freezes every base weight and trains only the adapters; "
                          "drop --freeze, or drop --lora to fine-tune the unfrozen groups in full")
    if not cfg.lora:
        from dataclasses import fields

        given = [f.name for f in fields(cfg) if f.name.startswith("lora_") and getattr(cfg, f.name) != f.default]
        if given:
            raise ConfigError(f"--{given[0].replace('_', '-')} applies to LoRA students: pass --lora too")
    if cfg.lora_targets is not None and not parse_list(cfg.lora_targets):
        raise ConfigError("--lora-targets: give at least one module name pattern, e.g. 'q_proj,v_proj'")


# ----------------------------------------------------------------------------- groups and targets (pure)


def group_of(name: str, prefixes: dict[str, tuple[str, ...]]) -> str | None:
    """The group of parameter/module `name`: the one with the longest matching prefix (so
    `model.language_model.embed_tokens.` is embeddings, not language), None when none matches."""
    best, best_len = None, -1
    for group, pfx in prefixes.items():
        for p in pfx:
            if (name == p.rstrip(".") or name.startswith(p)) and len(p) > best_len:
                best, best_len = group, len(p)
    return best


def matches(name: str, pattern: str) -> bool:
    """A --lora-targets pattern against a module name: a glob on the full dotted name
    (`model.language_model.layers.*.self_attn.q_proj`), or a bare name (`q_proj`, no dot, no
    wildcard) matching the name's last component, as peft's own target names do."""
    if "." not in pattern and not any(c in pattern for c in "*?["):
        return name.rsplit(".", 1)[-1] == pattern
    return fnmatch.fnmatchcase(name, pattern)


def resolve_targets(linear_names: list[str], patterns: list[str], flag: str = "--lora-targets") -> list[str]:
    """The Linear module names the patterns select, in model order. Each pattern must select at
    least one, else a ConfigError naming the flag, the pattern and some names that exist."""
    chosen = [n for n in linear_names if any(matches(n, p) for p in patterns)]
    dead = [p for p in patterns if not any(matches(n, p) for n in linear_names)]
    if dead:
        examples = ", ".join(linear_names[:3] + [n for n in linear_names if ".layers.0." in n][:4])
        raise ConfigError(f"{flag}: {', '.join(repr(p) for p in dead)} match(es) no Linear module of the student. Patterns are "
                          f"bare module names (q_proj) or globs on full names; e.g. {examples}")
    return chosen


# ----------------------------------------------------------------------------- on the model


def family_of(model):
    from drivekd.families.base import family_class

    return family_class(base_model(model).config.model_type)


def base_model(model):
    """The HF model under a PeftModel (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_lora(model) -> bool:
    """A peft.PeftModel (checked without importing peft for plain students)."""
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def freeze_groups(model, groups: list[str]) -> dict[str, int]:
    """requires_grad=False on every parameter of `groups`; returns the parameter count per group.
    Refuses a group the family does not have, an empty group, and freezing one of two tied
    weights (a tied lm_head *is* the embedding matrix)."""
    fam = family_of(model)
    prefixes = fam.param_groups
    sizes = {g: 0 for g in groups}
    for g in groups:
        if g not in prefixes:
            raise ConfigError(f"--freeze {g}: the {fam.name} family has no such group ({', '.join(prefixes)})")
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is not None and out.weight is inp.weight and ("embeddings" in groups) != ("lm_head" in groups):
        raise ConfigError("--freeze: this student ties lm_head to the input embeddings (tie_word_embeddings), one weight for "
                          "both; freeze embeddings and lm_head together, or neither")
    for name, p in model.named_parameters():
        g = group_of(name, prefixes)
        if g in sizes:
            p.requires_grad_(False)
            sizes[g] += p.numel()
    if "lm_head" in sizes and out is not None and out.weight is inp.weight:
        sizes["lm_head"] = sizes.get("embeddings", 0)  # named_parameters lists a tied weight once
    empty = [g for g, n in sizes.items() if n == 0]
    if empty:
        raise ConfigError(f"--freeze {','.join(empty)}: no parameters of this {fam.name} student are in that group")
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("--freeze: every parameter of the student is frozen; nothing would train")
    return sizes


def lora_config(model, cfg):
    """The peft LoraConfig of the run: explicit target module names, resolved from the patterns."""
    import torch
    from peft import LoraConfig

    fam = family_of(model)
    patterns = parse_list(cfg.lora_targets) if cfg.lora_targets is not None else list(fam.lora_targets)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = resolve_targets(linear, patterns)
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, bias="none", target_modules=targets,
                      base_model_name_or_path=str(cfg.student) if cfg.student is not None else None)


def apply_lora(model, cfg, resume_dir: Path | None = None):
    """Wrap `model` in a PeftModel (base frozen, adapters trainable). The adapters start as peft
    does (A Kaiming-uniform from torch's RNG, B = 0: the student starts as the base). With
    `resume_dir`, the adapter weights are the checkpoint's, bit for bit."""
    from peft import get_peft_model

    with _quiet_peft():
        peft_model = get_peft_model(model, lora_config(model, cfg))
    if resume_dir is not None:
        load_adapter(peft_model, Path(resume_dir))
    return peft_model


@contextlib.contextmanager
def _quiet_peft():
    """peft 0.21 reads `model.is_gradient_checkpointing` when it wraps a model, which transformers
    5.2x deprecates (FutureWarning) in favour of is_activation_checkpointing: nothing a user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def from_adapter(base, folder: str | Path):
    """A PeftModel: the HF model `base` with the adapter saved in `folder` (e.g. RUN/final/adapter)."""
    from peft import PeftModel

    with _quiet_peft():
        return PeftModel.from_pretrained(base, str(folder))


def load_adapter(peft_model, folder: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    f = folder / ADAPTER_WEIGHTS
    if not f.is_file():
        raise ConfigError(f"cannot resume the LoRA run from {folder}: no {ADAPTER_WEIGHTS} (a checkpoint of a run without --lora?)")
    sd = load_file(f, device=str(next(peft_model.parameters()).device))
    res = set_peft_model_state_dict(peft_model, sd)
    missing = [k for k in res.missing_keys if "lora_" in k]
    if missing or res.unexpected_keys:
        raise ConfigError(f"cannot resume the LoRA run from {folder}: its adapter does not fit this student "
                          f"(missing {missing[:3]}, unexpected {list(res.unexpected_keys)[:3]})")


def setup(model, cfg, resume_dir: Path | None = None):
    """--freeze / --lora on a loaded student (in prepare_student). Returns the model to train."""
    if cfg.lora:
        return apply_lora(model, cfg, resume_dir)
    groups = parse_list(cfg.freeze)
    if groups:
        freeze_groups(model, groups)
    return model


def weights_dir(cfg, resume_dir: Path | None) -> Path:
    """Where the student's (base) weights load from: a LoRA checkpoint holds the adapter only."""
    return Path(cfg.student) if cfg.lora or resume_dir is None else Path(resume_dir)


def counts(model) -> dict[str, int]:
    """{'params': all parameters (a tied weight once), 'trainable': those with requires_grad}."""
    ps = list(model.parameters())
    return {"params": sum(p.numel() for p in ps), "trainable": sum(p.numel() for p in ps if p.requires_grad)}


def model_writer(model, final: bool, keep: bool = False) -> Callable[[Path], Any] | None:
    """How a checkpoint folder gets the student (checkpoint.save_checkpoint's `write_model`);
    None: the default, the whole model with save_pretrained.

    LoRA: step checkpoints hold the adapter only (adapter_config.json, adapter_model.safetensors;
    the frozen base is --student). `final/` holds the adapter in adapter/ and the merged model at
    the top, the folder drivekd-eval loads. The merge is in place (merge_and_unload), so final is
    the last thing a run writes; `keep` (best/, written mid-run) merges a copy instead, so the
    live model keeps its adapters (one more copy of the student in memory while it is written)."""
    if not is_lora(model):
        return None

    def write(folder: Path) -> None:
        if not final:
            model.save_pretrained(folder, safe_serialization=True)
            return
        model.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)
        merged = (copy.deepcopy(model) if keep else model).merge_and_unload()
        merged.save_pretrained(folder, safe_serialization=True)

    return write
