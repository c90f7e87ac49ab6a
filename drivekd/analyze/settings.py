"""The settings of one `drivekd-analyze` run, checked when built (an invalid one cannot exist)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from drivekd.errors import ConfigError

DEFAULT_TEMPERATURES = (1.0, 2.0, 4.0)  # the usual distillation temperatures


def parse_temperatures(text: str) -> tuple[float, ...]:
    """'1,2,4' -> (1.0, 2.0, 4.0); ConfigError naming --temperatures otherwise."""
    try:
        vals = tuple(float(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"--temperatures {text!r}: write positive numbers separated by commas, e.g. 1,2,4") from None
    if not vals:
        raise ConfigError("--temperatures: give at least one temperature, e.g. 1,2,4")
    return vals


@dataclass(frozen=True)
class AnalyzeConfig:
    model: Path  # checkpoint folder (teacher or student of a supported family)
    data: Path  # Drive-KD or DriveBench JSON; rewordings marked with `rewording_of` (drivekd.analyze.sampling)
    out: Path  # analysis.json, the PNGs, samples/ (per-sample partial results), run.json
    images: Path | None = None  # image root (default: the data file's folder)
    allow_outside_images: bool = False  # accept image paths escaping the image root
    samples: int | None = 200  # questions analysed (None = all); rewordings of them come on top
    per_image: int = 8  # at most this many questions per image group
    temperatures: tuple[float, ...] = DEFAULT_TEMPERATURES
    seed: int = 0  # order in which image groups are drawn
    device: str = "cpu"
    dtype: str = "float32"
    overwrite: bool = False  # discard partial results of another model, data or settings in --out
    progress: bool = True

    def __post_init__(self):
        object.__setattr__(self, "model", Path(self.model))
        object.__setattr__(self, "data", Path(self.data))
        object.__setattr__(self, "out", Path(self.out))
        if self.images is not None:
            object.__setattr__(self, "images", Path(self.images))
        object.__setattr__(self, "temperatures", tuple(float(t) for t in self.temperatures))
        if not self.model.is_dir():
            raise ConfigError(f"--model {self.model}: not a folder; pass a local checkpoint folder saved with save_pretrained")
        if not self.data.is_file():
            raise ConfigError(f"--data {self.data}: no such file")
        if self.images is not None and not self.images.is_dir():
            raise ConfigError(f"--images {self.images}: not a folder; pass the root the data's image paths are relative to")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(f"--samples must be >= 1, not {self.samples}")
        if self.per_image < 1:
            raise ConfigError(f"--per-image must be >= 1, not {self.per_image}")
        if not self.temperatures or any(not math.isfinite(t) or t <= 0 for t in self.temperatures):
            raise ConfigError(f"--temperatures must be positive numbers, not {','.join(f'{t:g}' for t in self.temperatures) or 'none'}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"--dtype must be float32, bfloat16 or float16, not {self.dtype!r}")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"--out {self.out}: exists and is not a folder")
