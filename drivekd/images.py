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
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import click

from drivekd.errors import AlignmentError, ConfigError

# Qwen2.5-VL: 14-px patches merged 2x2 into one token, so one token covers 28 x 28 pixels.
QWEN_PIXELS_PER_TOKEN = 28 * 28
# nuScenes camera images; the default image size for token-count planning.
NUSCENES_CAMERA = (1600, 900)

_FAMILY_OF = {"tiling": "internvl", "max_patches": "internvl", "min_pixels": "qwen2_5_vl", "max_pixels": "qwen2_5_vl"}
_FAMILY_NAME = {"internvl": "InternVL", "qwen2_5_vl": "Qwen2.5-VL"}


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

    def processor_overrides(self, family: str) -> dict[str, Any]:
        """Image-processor keyword arguments for `family` (raises when a setting belongs to the other family)."""
        wrong = [k for k in self.given() if _FAMILY_OF[k] != family]
        if wrong:
            other = _FAMILY_NAME[_FAMILY_OF[wrong[0]]]
            raise ConfigError(
                f"{', '.join(flag(k) for k in wrong)} ([images].{wrong[0]}) applies to {other} models, but this model is "
                f"{_FAMILY_NAME.get(family, family)}: remove it from the command line or the [images] table"
            )
        if family == "internvl":
            out: dict[str, Any] = {}
            if self.tiling is False:
                out["max_patches"] = 1  # the processor forces crop_to_patches on; one tile = no tiling
            if self.max_patches is not None:
                out["max_patches"] = self.max_patches
            return out
        return {k: getattr(self, k) for k in ("min_pixels", "max_pixels") if getattr(self, k) is not None}


def processor_overrides(family: str, settings: "ImageSettings | dict | None") -> dict[str, Any]:
    """Image-processor kwargs from user settings, or a raw kwargs dict passed through (programmatic use)."""
    if settings is None:
        return {}
    if isinstance(settings, ImageSettings):
        return settings.processor_overrides(family)
    return dict(settings)


def effective(family: str, image_processor) -> dict[str, Any]:
    """The settings an image processor actually applies, in [images] keys: what the store records."""
    size = image_processor.size
    get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
    if family == "internvl":
        # InternVLProcessor passes crop_to_patches=True at call time: max_patches alone decides tiling.
        n = int(image_processor.max_patches)
        return {"tiling": n > 1, "max_patches": n, "tile_size": [int(get("height")), int(get("width"))]}
    return {"min_pixels": int(get("shortest_edge")), "max_pixels": int(get("longest_edge"))}


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


def image_options(f):
    """The four image flags, shared by drivekd-cache build, drivekd-train and drivekd-eval."""
    options = [
        click.option("--tiling/--no-tiling", "tiling", default=None, help="InternVL: tile large images into 448-px crops plus a thumbnail (default: the checkpoint's; [images].tiling)."),
        click.option("--max-patches", type=int, default=None, help="InternVL: most tiles per image (1 = no tiling; [images].max_patches)."),
        click.option("--min-pixels", type=int, default=None, help="Qwen2.5-VL: smallest image area in pixels, 784 per token ([images].min_pixels)."),
        click.option("--max-pixels", type=int, default=None, help="Qwen2.5-VL: largest image area in pixels, e.g. 200704 = 256 tokens ([images].max_pixels)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def pop_flags(kwargs: dict) -> dict:
    """Remove the image flags from a click kwargs dict and return them."""
    return {k: kwargs.pop(k) for k in ImageSettings.keys() if k in kwargs}


# ----------------------------------------------------------------------------- token counts


def _image_processor(folder: Path, family: str, settings: ImageSettings | dict | None):
    overrides = processor_overrides(family, settings)
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil.from_pretrained(folder, **overrides)
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    return GotOcr2ImageProcessorPil.from_pretrained(folder, **overrides)


def _image_seq_length(folder: Path) -> int:
    """InternVL tokens per tile: processor_config.json, else config.json's, else the 256 default."""
    for name in ("processor_config.json", "config.json"):
        p = folder / name
        if p.is_file():
            v = json.loads(p.read_text()).get("image_seq_length")
            if v:
                return int(v)
    return 256


def tokens_per_image(folder: str | Path, settings: ImageSettings | dict | None = None,
                     image_size: tuple[int, int] = NUSCENES_CAMERA) -> int:
    """Vision tokens (placeholder positions) one image of `image_size` (width, height) gives.

    Processor arithmetic only: needs `config.json` and the image-processor files, no tokenizer or
    weights, so it works on the shipped configs/models/ folders.
    """
    from drivekd.families.base import detect_family

    folder = Path(folder)
    family = detect_family(folder)
    ip = _image_processor(folder, family, settings)
    w, h = image_size
    if family == "qwen2_5_vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        eff = effective(family, ip)
        factor = ip.patch_size * ip.merge_size
        rh, rw = smart_resize(h, w, factor=factor, min_pixels=eff["min_pixels"], max_pixels=eff["max_pixels"])
        return (rh // ip.patch_size) * (rw // ip.patch_size) // ip.merge_size**2
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    size = effective(family, ip)["tile_size"]
    tiles = 1
    if ip.max_patches > 1:
        cols, rows = get_optimal_tiled_canvas((h, w), tuple(size), ip.min_patches, ip.max_patches)
        tiles = cols * rows
        tiles += 1 if tiles > 1 else 0  # the thumbnail, added whenever the image is split
    return tiles * _image_seq_length(folder)


def vision_tokens(folder: str | Path, settings: ImageSettings | dict | None = None, cameras=(1, 6),
                  image_size: tuple[int, int] = NUSCENES_CAMERA) -> dict[int, int]:
    """Vision tokens of a sample with each camera count in `cameras` (equal-sized images).

    The planner adds the text tokens (question, answer, chat template, 2 image delimiters per image)
    to get T. Example (configs/models/InternVL3-1B-hf, 1600x900): published settings {1: 2304,
    6: 13824}; ImageSettings(tiling=False): {1: 256, 6: 1536}.
    """
    per = tokens_per_image(folder, settings, image_size)
    return {int(n): int(n) * per for n in cameras}
