"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): dynamic resolution, M-RoPE.

An image is resized (smart_resize) so both sides are multiples of 28 and its area lies within
[min_pixels, max_pixels], cut into 14-px patches, and every 2 x 2 patches merge into one token:
one token per 28 x 28 pixels. The vision tower runs window attention in most layers and full
attention in the layers listed by `fullatt_block_indexes`: two layer kinds.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from drivekd.families.base import Family
from drivekd.families.processors import Qwen2_5_VLProcessorNoVideo
from drivekd.images import ImageSettings


class Qwen25VLFamily(Family):
    """Qwen2.5-VL: M-RoPE positions (3, B, T), one token per merge_size^2 patches of the
    dynamic-resolution grid, right padding."""

    name = "qwen2_5_vl"
    display_name = "Qwen2.5-VL"
    padding_side = "right"
    vision_delimiter_tokens = ("<|vision_start|>", "<|vision_end|>")
    image_keys = ("min_pixels", "max_pixels")
    vision_layer_kinds = ("window", "full")
    processor_class = Qwen2_5_VLProcessorNoVideo
    param_groups = {
        "vision": ("model.visual.",),
        "projector": ("model.visual.merger.",),  # the patch merger: vision features -> text hidden size
        "language": ("model.language_model.",),
        "embeddings": ("model.language_model.embed_tokens.",),
        "lm_head": ("lm_head.",),
    }

    @staticmethod
    def model_class():
        from transformers import Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLForConditionalGeneration

    # ----- image settings and token counts (config files only) -----
    @staticmethod
    def image_processor_class():
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        return Qwen2VLImageProcessorPil

    @staticmethod
    def _overrides(settings: ImageSettings) -> dict[str, Any]:
        return {k: getattr(settings, k) for k in ("min_pixels", "max_pixels") if getattr(settings, k) is not None}

    @staticmethod
    def effective_image_settings(image_processor) -> dict[str, Any]:
        size = image_processor.size
        get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
        return {"min_pixels": int(get("shortest_edge")), "max_pixels": int(get("longest_edge"))}

    @classmethod
    def count_image_tokens(cls, image_processor, tile_tokens: int, image_size: tuple[int, int]) -> int:
        # The processor's own resize rule (transformers' smart_resize), at the effective bounds.
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        w, h = image_size
        eff = cls.effective_image_settings(image_processor)
        patch, merge = image_processor.patch_size, image_processor.merge_size
        rh, rw = smart_resize(h, w, factor=patch * merge, min_pixels=eff["min_pixels"], max_pixels=eff["max_pixels"])
        return (rh // patch) * (rw // patch) // merge**2

    # ----- depth and layer kinds -----
    @staticmethod
    def vision_depth(vision_config) -> tuple[int, ...]:
        full = len(set(getattr(vision_config, "fullatt_block_indexes", []) or []))
        return (int(vision_config.depth) - full, full)

    @staticmethod
    def set_vision_depth(vision_config, counts: tuple[int, ...]) -> None:
        window, full = counts  # the full-attention layers last
        vision_config.depth = window + full
        vision_config.fullatt_block_indexes = list(range(window, window + full))

    # ----- processor outputs and model inputs -----
    def expected_vision_tokens(self, enc) -> int:
        merge = self.processor.image_processor.merge_size ** 2
        return int(enc["image_grid_thw"].prod(-1).sum()) // merge if "image_grid_thw" in enc else 0

    def _image_tokens(self, enc) -> int:
        return int(enc["image_grid_thw"].prod()) // self.processor.image_processor.merge_size ** 2

    @staticmethod
    def delimiter_ids(config) -> tuple[int | None, int | None]:
        return getattr(config, "vision_start_token_id", None), getattr(config, "vision_end_token_id", None)

    @staticmethod
    def synthetic_image_inputs(config, vision: torch.Tensor, cameras: int, tokens_per_camera: int) -> dict[str, torch.Tensor]:
        vc = config.vision_config
        merge = int(getattr(vc, "spatial_merge_size", 2))
        patch, tps = int(vc.patch_size), int(getattr(vc, "temporal_patch_size", 2))
        # A camera of gh x gw merged tokens: (gh * merge) x (gw * merge) patches of 14 px.
        gh = int(math.isqrt(tokens_per_camera))
        while tokens_per_camera % gh:
            gh -= 1
        gw = tokens_per_camera // gh
        grid = torch.tensor([[1, gh * merge, gw * merge]] * cameras)
        return {"pixel_values": torch.zeros(int(grid.prod(-1).sum()), 3 * tps * patch * patch),
                "image_grid_thw": grid, "mm_token_type_ids": vision.long()[None]}

    @staticmethod
    def rope_positions(model, tensors: dict, device) -> torch.Tensor | None:
        """M-RoPE position ids of the whole sequence, (3, 1, T) on the CPU, from the model's own
        `get_rope_index` (without them the cached branch cannot rebuild positions for a suffix)."""
        if "image_grid_thw" not in tensors:
            return None
        pos, _ = model.model.get_rope_index(
            tensors["input_ids"].to(device), tensors["mm_token_type_ids"].to(device),
            image_grid_thw=tensors["image_grid_thw"].to(device), attention_mask=tensors["attention_mask"].to(device),
        )
        return pos.cpu()
