"""HF-native InternVL3 (`InternVLForConditionalGeneration`, Qwen2 text model, InternViT vision tower).

Images become 448-px tiles (`image_seq_length` tokens each, 256 for InternVL3: 32 x 32 patches
pixel-shuffled to 16 x 16); with `max_patches` > 1 a large image is split into up to that many tiles
plus a thumbnail (the processor always asks for tiling, so `max_patches` alone decides it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from drivekd.families.base import Family
from drivekd.families.processors import InternVLProcessorNoVideo
from drivekd.images import ImageSettings

# Tokens per tile when neither processor_config.json nor config.json states it (InternVL3's value).
DEFAULT_TILE_TOKENS = 256


class InternVLFamily(Family):
    """HF-native InternVL3: 1-D RoPE, `image_seq_length` tokens per 448-px tile, left padding."""

    name = "internvl"
    display_name = "InternVL"
    padding_side = "left"
    vision_delimiter_tokens = ("<img>", "</img>")
    image_keys = ("tiling", "max_patches")
    vision_layer_kinds = ("layer",)
    processor_class = InternVLProcessorNoVideo
    param_groups = {
        "vision": ("model.vision_tower.",),  # InternViT
        "projector": ("model.multi_modal_projector.",),  # mlp1 of the original checkpoints
        "language": ("model.language_model.",),
        "embeddings": ("model.language_model.embed_tokens.",),
        "lm_head": ("lm_head.",),
    }

    @staticmethod
    def model_class():
        from transformers import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration

    # ----- image settings and token counts (config files only) -----
    @staticmethod
    def image_processor_class():
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        return GotOcr2ImageProcessorPil

    @staticmethod
    def _overrides(settings: ImageSettings) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if settings.tiling is False:
            out["max_patches"] = 1  # the processor forces crop_to_patches on; one tile = no tiling
        if settings.max_patches is not None:
            out["max_patches"] = settings.max_patches
        return out

    @staticmethod
    def effective_image_settings(image_processor) -> dict[str, Any]:
        size = image_processor.size
        get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
        n = int(image_processor.max_patches)
        return {"tiling": n > 1, "max_patches": n, "tile_size": [int(get("height")), int(get("width"))]}

    @classmethod
    def tokens_per_tile(cls, folder: str | Path) -> int:
        """`image_seq_length` of a checkpoint folder: processor_config.json, else config.json, else 256."""
        for name in ("processor_config.json", "config.json"):
            p = Path(folder) / name
            if p.is_file():
                v = json.loads(p.read_text()).get("image_seq_length")
                if v:
                    return int(v)
        return DEFAULT_TILE_TOKENS

    @classmethod
    def processor_kwargs(cls, folder: str | Path) -> dict[str, Any]:
        # image_seq_length must be passed, or the processor silently falls back to its default 256.
        return {"image_seq_length": cls.tokens_per_tile(folder)}

    @classmethod
    def count_image_tokens(cls, image_processor, tile_tokens: int, image_size: tuple[int, int]) -> int:
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        w, h = image_size
        tiles = 1
        if image_processor.max_patches > 1:
            tile = tuple(cls.effective_image_settings(image_processor)["tile_size"])
            cols, rows = get_optimal_tiled_canvas((h, w), tile, image_processor.min_patches, image_processor.max_patches)
            tiles = cols * rows
            tiles += 1 if tiles > 1 else 0  # the thumbnail, added whenever the image is split
        return tiles * tile_tokens

    # ----- depth and layer kinds -----
    @staticmethod
    def vision_depth(vision_config) -> tuple[int, ...]:
        return (int(vision_config.num_hidden_layers),)

    @staticmethod
    def set_vision_depth(vision_config, counts: tuple[int, ...]) -> None:
        vision_config.num_hidden_layers = counts[0]

    # ----- processor outputs and model inputs -----
    def expected_vision_tokens(self, enc) -> int:
        if "pixel_values" not in enc:
            return 0
        return int(enc["pixel_values"].shape[0]) * int(self.processor.image_seq_length)  # tiles x tokens per tile

    def _image_tokens(self, enc) -> int:
        return int(enc["num_patches"][0]) * int(self.processor.image_seq_length)

    @staticmethod
    def synthetic_image_inputs(config, vision: torch.Tensor, cameras: int, tokens_per_camera: int) -> dict[str, torch.Tensor]:
        # Each camera is tokens_per_camera / image_seq_length tiles (the thumbnail included) of
        # (3, S, S) pixels: pixel_values (cameras * tiles, 3, S, S), as the processor returns them.
        per_tile = int(config.image_seq_length)
        if tokens_per_camera % per_tile:
            raise ValueError(f"{tokens_per_camera} image tokens per camera is not a whole number of {per_tile}-token tiles")
        size = config.vision_config.image_size
        size = size[0] if isinstance(size, (list, tuple)) else size
        return {"pixel_values": torch.zeros(cameras * (tokens_per_camera // per_tile), 3, int(size), int(size))}
