"""`drivekd-cache build --dry-run --teacher-parallel tp --nproc N`: one rank's peak of a teacher pass
sharded N ways (drivekd.teacher.parallel).

transformers' plan for the language model shards q/k/v and gate/up column-wise and o/down
row-wise, and the output head column-wise (gathered after): a rank holds H/N query heads, Hkv/N kv
heads and I/N of the MLP width of every layer, and 1/N of the head's rows. The embeddings, norms,
vision tower and projector have no plan: every rank holds them whole (but a head tied to the
embeddings splits them too). So the rank's forward is
counted on the real model, built on fake tensors as the single-device teacher pass is
(drivekd.planner.plan) and cut to one rank's shard of the plan (`shard_model`). Its activations are the rank's: full hidden states
(B, T, hidden), its own heads' attention and MLP width, and the full (B, T, T) fp32 head mean of
each captured layer (every rank holds the all-reduced map).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from drivekd.errors import ConfigError
from drivekd.images import ImageSettings
from drivekd.planner.plan import GiB, count_teacher_pass, margin_bytes, student_config, teacher_passes


def check_divisible(config, n: int) -> None:
    text = config.text_config
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if int(getattr(text, name)) % n:
            raise ConfigError(f"--nproc {n}: the text model's {name} = {getattr(text, name)} does not divide into {n} equal shards; "
                              "pick an --nproc that divides it")


def shard_model(model, plan: dict[str, str], n: int) -> None:
    """Cut a built model (fake tensors) to one rank's shard of transformers' plan, in place:
    colwise modules keep 1/n of their output rows (weight and bias), rowwise ones 1/n of their input
    columns (their bias stays whole), the output head 1/n of its vocabulary rows (with the input
    embeddings when tied: one tensor). The forward then runs with the rank's local shapes, as under
    transformers' tensor parallelism (attention views its projections as (-1, head_dim), so a
    rank's q/k/v give H/n and Hkv/n heads)."""
    import fnmatch

    rules = [(f"model.language_model.{pat}".replace("*", "[0-9]*"), style) for pat, style in plan.items()]
    rules.append(("lm_head", "colwise"))

    def cut(t: torch.Tensor, dim: int) -> torch.nn.Parameter:
        # A copy, not a view: the rank holds only its shard (a view would keep the whole tensor alive).
        return torch.nn.Parameter(t.detach().narrow(dim, 0, t.shape[dim] // n).clone(), requires_grad=False)

    tied = model.lm_head.weight is model.get_input_embeddings().weight
    for name, module in list(model.named_modules()):
        style = next((st for pat, st in rules if fnmatch.fnmatchcase(name, pat)), None)
        if style is None or not isinstance(module, torch.nn.Linear):
            continue
        if style.startswith("colwise"):
            module.weight = cut(module.weight, 0)
            if module.bias is not None:
                module.bias = cut(module.bias, 0)
        elif style.startswith("rowwise"):
            module.weight = cut(module.weight, 1)
    if tied:
        emb = model.get_input_embeddings()
        emb.weight = model.lm_head.weight
        emb.padding_idx = None  # a gradient-only setting that would check the id against the cut table


def count_rank(ckpt: Path, layers: list[int] | None, shapes, n: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """One rank's counted teacher pass: categories, tracked peak, parameters it holds, FLOPs."""
    from drivekd.families.base import text_tp_plan

    config = student_config(ckpt)
    if n > 1:
        check_divisible(config, n)
    plan = text_tp_plan(config)
    c = count_teacher_pass(ckpt, layers, shapes, dtype, shard=(lambda m: shard_model(m, plan, n)) if n > 1 else None)
    return {"categories": dict(c.categories), "tracked_peak_bytes": c.peak, "params": c.params, "flops": c.flops}


def dry_run_teacher_tp(teachers: dict[str, Path], layers: str | None = None, *, nproc: int, seq_len: int | None = None,
                       cameras: int = 6, dtype: str = "bfloat16", images: ImageSettings | None = None) -> dict[str, Any]:
    """Per-rank peak of each checkpoint's teacher pass over `nproc` tensor-parallel ranks (roles
    naming one checkpoint share one forward, as in the build)."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, not {nproc}")
    out = []
    for ckpt, roles, shapes, want in teacher_passes(teachers, layers, seq_len=seq_len, cameras=cameras, images=images):
        r = count_rank(ckpt, want, shapes, nproc, getattr(torch, dtype))
        peak = r["tracked_peak_bytes"]
        out.append({"model": str(ckpt), "roles": roles, "layers": want, "seq_len": shapes.seq_len, "nproc": nproc,
                    "params_per_rank": r["params"], "peak_bytes": peak + margin_bytes(peak), "tracked_peak_bytes": peak,
                    "categories": {**r["categories"], "allocator_margin": margin_bytes(peak)}, "flops_per_rank": r["flops"]})
    return {"teachers": out}


def format_tp_report(r: dict[str, Any]) -> str:
    lines = []
    for t in r["teachers"]:
        cats = ", ".join(f"{k} {v / GiB:.2f}" for k, v in t["categories"].items() if v)
        lines.append(f"teacher pass {t['model']} ({'+'.join(t['roles'])}, {len(t['layers'])} captured layer(s), T = {t['seq_len']}) "
                     f"over {t['nproc']} tensor-parallel rank(s): per-rank peak {t['peak_bytes'] / GiB:.2f} GiB "
                     f"({t['params_per_rank'] / 1e9:.2f} B parameters held per rank; GiB by category: {cats}), "
                     f"{t['flops_per_rank'] / 1e12:.2f} TFLOP per rank")
    return "\n".join(lines)
