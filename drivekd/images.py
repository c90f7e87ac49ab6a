"""Image settings users can set: the [images] table of drivekd.toml and the matching flags.

A sample's sequence length T is mostly vision tokens, and how many depends on image settings the
checkpoint ships for single photos, not six driving cameras: a published InternVL3 processor tiles a
1600x900 camera into 8 tiles plus a thumbnail (9 x 256 = 2304 tokens, 13824 for six cameras), a
published Qwen2.5-VL one keeps ~1824 tokens per camera. The paper's six-camera samples are ~1800
tokens in all. These settings choose that, and the cache, trainer and evaluation apply them
identically (the store records them; a train run with other settings is refused, naming them):

    [images]
    tiling = false          # InternVL: one 448-px tile per image (256 tokens); flag --tiling/--no-tiling
    max_patches = 6         # InternVL: at most N tiles (+ a thumbnail when N > 1); flag --max-patches
    min_pixels = 3136       # Qwen2.5-VL: resize bounds in pixels, one token per 28 x 28; --min-pixels
    max_pixels = 200704     #   (256 tokens per image at most); --max-pixels

Unset keys keep the checkpoint's own values. A setting of the other family is an error, not ignored.

This module holds the settings alone; what they mean for a model (processor arguments, tokens per
image) is the family's (drivekd.families: `Family.processor_overrides`, `Family.image_tokens`), and
the flags that build them are the CLI's (drivekd.cli.options).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from drivekd.errors import AlignmentError, ConfigError

# Qwen2.5-VL: 14-px patches merged 2x2 into one token, so one token covers 28 x 28 pixels.
QWEN_PIXELS_PER_TOKEN = 28 * 28
# nuScenes camera images; the default image size for token-count planning.
NUSCENES_CAMERA = (1600, 900)


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


@dataclass(frozen=True)
class ImageSettings:
    """Image-processor settings chosen by the user; None keeps the checkpoint's value."""

    tiling: bool | None = None
    """InternVL: split large images into 448-px tiles plus a thumbnail (false: one tile per image)."""
    max_patches: int | None = None
    """InternVL: most tiles per image when tiling (1 = no tiling)."""
    min_pixels: int | None = None
    """Qwen2.5-VL: images smaller than this many pixels are upscaled (one token per 28 x 28 px)."""
    max_pixels: int | None = None
    """Qwen2.5-VL: images larger than this many pixels are downscaled: at most max_pixels/784 tokens."""

    def __post_init__(self) -> None:
        if self.tiling is not None and not isinstance(self.tiling, bool):
            raise ConfigError(f"--tiling/--no-tiling ([images].tiling): expected true or false, got {self.tiling!r}")
        for key in ("max_patches", "min_pixels", "max_pixels"):
            v = getattr(self, key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{flag(key)} ([images].{key}): expected a whole number >= 1, got {v!r}")
        if self.tiling is False and self.max_patches not in (None, 1):
            raise ConfigError(f"--no-tiling with --max-patches {self.max_patches}: no tiling means one tile per image; "
                              "drop one of them ([images].tiling / [images].max_patches)")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ConfigError(f"--min-pixels {self.min_pixels} is above --max-pixels {self.max_pixels}; "
                              "min_pixels must not exceed max_pixels ([images] table)")
        if self.max_pixels is not None and self.max_pixels < QWEN_PIXELS_PER_TOKEN:
            raise ConfigError(f"--max-pixels {self.max_pixels}: below one token ({QWEN_PIXELS_PER_TOKEN} px = 28 x 28); "
                              f"use at least {QWEN_PIXELS_PER_TOKEN}")

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def given(self) -> dict[str, Any]:
        """The settings that are set (not None)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_sources(cls, flags: dict[str, Any], config: dict | None = None) -> "ImageSettings":
        """Merge the [images] table of a loaded drivekd.toml (`drivekd.config.load_config`) with the
        flags given on the command line (None = not given; flags win)."""
        table = dict((config or {}).get("images", {}))
        unknown = sorted(set(table) - set(cls.keys()))
        if unknown:
            where = (config or {}).get("_path", "drivekd.toml")
            raise ConfigError(f"{where}: unknown key(s) in [images]: {', '.join(unknown)} (valid: {', '.join(cls.keys())})")
        table.update({k: v for k, v in flags.items() if k in cls.keys() and v is not None})
        return cls(**table)


def check_same(stored: dict | None, current: dict, what: str, fix: str) -> None:
    """Refuse a run whose effective image settings differ from the stored ones, naming each setting."""
    if not stored:
        return  # a store written before settings were recorded: the processor fingerprint still guards it
    diffs = [k for k in sorted(set(stored) | set(current)) if stored.get(k) != current.get(k)]
    if diffs:
        lines = "; ".join(f"{flag(k)} ([images].{k}): {what} {stored.get(k)!r}, this run {current.get(k)!r}" for k in diffs)
        raise AlignmentError(f"image settings differ from {lines}. {fix}")


def check_store(source, role: str, family) -> None:
    """The student `family`'s image settings must be those the `role` targets were built with."""
    meta = source.role_meta(role)
    check_same(meta.get("image_settings"), family.image_settings(), f"the {role} store's",
               "Pass the store's values (flags or the [images] table of drivekd.toml), or rebuild the store")


def pop_flags(kwargs: dict) -> dict:
    """Remove the image flags from a click kwargs dict and return them."""
    return {k: kwargs.pop(k) for k in ImageSettings.keys() if k in kwargs}
