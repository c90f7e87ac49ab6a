"""`BuildConfig`: everything a teacher store build needs, checked before any model loads."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from drivekd.errors import ConfigError
from drivekd.images import ImageSettings
from drivekd.layers import LayerSpecError, check_spec, spec_of
from drivekd.roles import ROLES
from drivekd.store.format import Encoding
from drivekd.store.signals import DEFAULT_TOP_K, parse_signals


@dataclass
class BuildConfig:
    """Everything a build needs, validated before any model loads."""

    teachers: dict[str, Path]  # role -> checkpoint folder
    data: Path
    images: Path | None
    out: Path
    layers: dict[str, str | list[int]] | None = None  # role -> layer spec (drivekd.layers) or indices; None = recipe
    batch_size: int = 1
    encoding: Encoding = field(default_factory=Encoding)
    skip_bad: bool = False
    # Samples whose targets hold NaN/inf: stop the build naming them (default), or record them as
    # skipped with the reason (`drivekd-cache info` lists them). Never stored as complete.
    skip_nonfinite: bool = False
    allow_outside_images: bool = False  # accept image paths escaping the image root (drivekd.data.load_samples)
    overwrite: bool = False
    device: str = "cpu"
    dtype: str = "float32"
    image_processing: ImageSettings | dict | None = None  # [images] table / image flags, or raw processor kwargs
    text_tokens: str = "paper"  # the text query set X stored with each sample: paper | not_vision
    progress: bool = True
    share_prefix: bool = True  # run each image group's shared token prefix once
    # Signals to store (drivekd.store.signals): attention always; logits and hidden on request. A
    # store that lacks some of them for some samples gets only what is missing computed.
    signals: tuple[str, ...] = ("attention",)
    logits_top_k: int = DEFAULT_TOP_K  # k of the stored top-k next-token log-probabilities
    # Threads that quantise, compress and write (Blosc releases the GIL). With a fast GPU teacher
    # a reasoning role writes ~27 layers per sample: one thread would bound the build.
    writers: int = field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)))
    # Teachers larger than one device (drivekd.teacher.parallel): "tp" shards each teacher over
    # tp_size ranks under torchrun (default: all of them; world = data-parallel replicas x tp_size);
    # device_map "auto" spreads one process's teacher over the visible GPUs.
    teacher_parallel: str = "none"
    tp_size: int | None = None
    device_map: str | None = None

    def validate(self) -> None:
        if not self.teachers:
            raise ConfigError("no teacher: pass --teacher ROLE with --model DIR, or set [teachers] in drivekd.toml")
        for role, path in self.teachers.items():
            if role not in ROLES:
                raise ConfigError(f"--teacher: unknown role {role!r} (choose from {', '.join(ROLES)} or all)")
            if not Path(path).is_dir():
                raise ConfigError(f"--model for role {role}: {path} is not a folder (set --model or [teachers].{role} in drivekd.toml)")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"--out {self.out} is an existing file; a teacher store is a folder: pass a folder path (new or a store)")
        if not Path(self.data).is_file():
            raise ConfigError(f"--data {self.data}: no such file (or set [data].train in drivekd.toml)")
        for role, spec in (self.layers or {}).items():
            try:
                check_spec(spec_of(spec))
            except LayerSpecError as e:
                raise ConfigError(f"--layers for role {role}: {e}") from None
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, not {self.batch_size}")
        if self.writers < 1:
            raise ConfigError(f"--writers must be >= 1, not {self.writers}")
        if self.text_tokens not in ("paper", "not_vision"):
            raise ConfigError(f"--text-tokens must be paper or not_vision, not {self.text_tokens!r}")
        self.signals = parse_signals(self.signals)
        if self.logits_top_k < 1:
            raise ConfigError(f"--logits-top-k must be >= 1, not {self.logits_top_k}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be float32, bfloat16 or float16, not {self.dtype!r}")
        from drivekd.teacher.parallel import check_parallel_flags, world_from_env

        check_parallel_flags(self.teacher_parallel, self.tp_size, self.device_map, world_from_env(), self.device)
