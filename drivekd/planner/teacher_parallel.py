"""`drivekd-cache build --dry-run --teacher-parallel tp --nproc N`: one rank's peak of a teacher pass
sharded N ways (drivekd.teacher.parallel).

transformers' plan for the language model shards q/k/v and gate/up column-wise and o/down
row-wise, and the output head column-wise (gathered after): a rank holds H/N query heads, Hkv/N kv
heads and I/N of the MLP width of every layer, and 1/N of the head's rows. The embeddings, norms,
vision tower and projector have no plan: every rank holds them whole. So the rank's forward is
counted on the real model built from a shard's config (heads, kv heads and MLP width divided by N,
head_dim kept) on fake tensors, as the single-device teacher pass is (drivekd.planner.plan), with
the output head's other N-1 shards taken off. Its activations are the rank's: full hidden states
(B, T, hidden), its own heads' attention and MLP width, and the full (B, T, T) fp32 head mean of
each captured layer (every rank holds the all-reduced map).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from drivekd.errors import ConfigError
from drivekd.images import ImageSettings
from drivekd.planner.plan import GiB, count_teacher_pass, margin_bytes, model_depth, shapes_for, student_config


def shard_config(config, n: int):
    """The config of one rank's shard of a tensor-parallel teacher over n ranks."""
    text = config.text_config
    for name in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        if int(getattr(text, name)) % n:
            raise ConfigError(f"--nproc {n}: the text model's {name} = {getattr(text, name)} does not divide into {n} equal shards; "
                              "pick an --nproc that divides it")
    out = copy.deepcopy(config)
    t = out.text_config
    t.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads  # unchanged by the split
    t.num_attention_heads = text.num_attention_heads // n
    t.num_key_value_heads = text.num_key_value_heads // n
    t.intermediate_size = text.intermediate_size // n
    return out


def _head_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of an untied output head (vocab x hidden); a tied one is the embedding, replicated."""
    tied = bool(getattr(config, "tie_word_embeddings", False))
    text = config.text_config
    return 0 if tied else text.vocab_size * text.hidden_size * torch.finfo(dtype).bits // 8


def count_rank(ckpt: Path, layers: list[int] | None, shapes, n: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """One rank's counted teacher pass: categories, tracked peak, parameters it holds, FLOPs."""
    config = student_config(ckpt)
    c = count_teacher_pass(ckpt, layers, shapes, dtype, config=shard_config(config, n) if n > 1 else None)
    # The fake shard builds the whole output head; the rank holds 1/n of its rows.
    off = _head_bytes(config, dtype) * (n - 1) // n
    cats = dict(c.categories)
    cats["weights"] = cats.get("weights", 0) - off
    peak = c.peak - off
    per_param = torch.finfo(dtype).bits // 8
    return {"categories": cats, "tracked_peak_bytes": peak, "params": c.params - off // per_param, "flops": c.flops}


def dry_run_teacher_tp(teachers: dict[str, Path], layers: str | None = None, *, nproc: int, seq_len: int | None = None,
                       cameras: int = 6, dtype: str = "bfloat16", images: ImageSettings | None = None) -> dict[str, Any]:
    """Per-rank peak of each checkpoint's teacher pass over `nproc` tensor-parallel ranks (roles
    naming one checkpoint share one forward, as in the build)."""
    from drivekd.layers import LayerSpecError, recipe_layers, resolve_layers

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, not {nproc}")
    by_ckpt: dict[Path, list[str]] = {}
    for role, path in teachers.items():
        by_ckpt.setdefault(Path(path), []).append(role)
    out = []
    for ckpt, roles in by_ckpt.items():
        family, L = model_depth(ckpt, "--model")
        shapes = shapes_for(family, student_config(ckpt), ckpt, cameras, seq_len, images, "--model")
        try:
            want = sorted({l for r in roles for l in (resolve_layers(layers, L) if layers else recipe_layers(r, L))})
        except LayerSpecError as e:
            raise ConfigError(f"--layers {layers!r}: {e} (the teacher {ckpt} has {L} decoder layers)") from None
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
