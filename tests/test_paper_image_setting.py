"""The paper's image setting: the authors' trainer squashes every camera image (single- or six-view
samples alike) to one 448 x 448 tile, bicubic, ImageNet mean/std: 256 tokens per camera for InternVL3.
drivekd's `--no-tiling` ([images] tiling = false) gives the same pixels and tokens."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from drivekd.families import family_class
from drivekd.images import ImageSettings

MODELS = Path(__file__).resolve().parents[1] / "configs" / "models"
PAPER = ImageSettings(tiling=False)


def _reference_tile(image: Image.Image, side: int = 448) -> torch.Tensor:
    """One square tile by hand: resize (aspect not kept), scale to [0, 1], ImageNet normalisation."""
    x = np.asarray(image.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float64) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return torch.from_numpy(x.transpose(2, 0, 1)).float()


def test_no_tiling_is_the_papers_one_squashed_tile():
    rng = np.random.default_rng(0)
    camera = Image.fromarray(rng.integers(0, 256, (900, 1600, 3), dtype=np.uint8))
    fam = family_class("internvl")
    for name in ("InternVL3-1B-hf", "InternVL3-2B-hf", "InternVL3-8B-hf"):
        folder = MODELS / name
        ip = fam.load_image_processor(folder, PAPER)
        out = ip(images=[camera], return_tensors="pt")
        assert out["pixel_values"].shape == (1, 3, 448, 448), name  # one tile, no thumbnail
        assert torch.allclose(out["pixel_values"][0], _reference_tile(camera), atol=2e-2), name
        assert fam.image_tokens(folder, PAPER) == 256  # per camera, 1536 for six
        # The published setting tiles the same camera: 8 tiles + a thumbnail.
        assert fam.image_tokens(folder) == 9 * 256
