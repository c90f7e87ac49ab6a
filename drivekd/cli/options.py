"""Click options shared by several commands, built from the settings objects they fill."""

from __future__ import annotations

import click

from drivekd.images import QWEN_PIXELS_PER_TOKEN


def image_options(f):
    """The four image flags (drivekd.images.ImageSettings), shared by drivekd-cache build,
    drivekd-train and drivekd-eval; `drivekd.images.pop_flags` takes them back out of the kwargs."""
    options = [
        click.option("--tiling/--no-tiling", "tiling", default=None, help="InternVL: tile large images into 448-px crops plus a thumbnail (default: the checkpoint's; [images].tiling)."),
        click.option("--max-patches", type=int, default=None, help="InternVL: most tiles per image (1 = no tiling; [images].max_patches)."),
        click.option("--min-pixels", type=int, default=None, help=f"Qwen2.5-VL: smallest image area in pixels, {QWEN_PIXELS_PER_TOKEN} per token ([images].min_pixels)."),
        click.option("--max-pixels", type=int, default=None, help="Qwen2.5-VL: largest image area in pixels, e.g. 200704 = 256 tokens ([images].max_pixels)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f
