"""Write the synthetic demo data set: images, train.json (Drive-KD), drivebench.json, scenes.json.

    python tools/make_demo_data.py --out demo/data [--groups 12] [--six-view-fraction 0.5]
        [--questions-per-group 4] [--seed 42] [--size 224x128]
"""

from __future__ import annotations

import click

from drivekd.demo.scenes import DEFAULT_SIZE, MAX_QUESTIONS_PER_GROUP, make_demo_data, summary_line


def _parse_size(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT such as 224x128, got {value!r}") from None
    if w < 64 or h < 32:
        raise click.BadParameter(f"must be at least 64x32 pixels, got {value!r}")
    return w, h


@click.command()
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write into.")
@click.option("--groups", default=12, show_default=True, type=click.IntRange(min=1), help="Image groups (scenes).")
@click.option("--six-view-fraction", default=0.5, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Share of six-camera groups (rounded half up); the rest are single front views.")
@click.option("--questions-per-group", default=4, show_default=True,
              type=click.IntRange(1, MAX_QUESTIONS_PER_GROUP), help="Questions per image group.")
@click.option("--seed", default=42, show_default=True, type=int, help="Same seed -> byte-identical files.")
@click.option("--size", default=f"{DEFAULT_SIZE[0]}x{DEFAULT_SIZE[1]}", show_default=True, callback=_parse_size,
              help="Image size WIDTHxHEIGHT in pixels.")
def main(out: str, groups: int, six_view_fraction: float, questions_per_group: int, seed: int,
         size: tuple[int, int]) -> None:
    summary = make_demo_data(out, groups, six_view_fraction=six_view_fraction,
                             questions_per_group=questions_per_group, seed=seed, size=size)
    click.echo(summary_line(summary))


if __name__ == "__main__":
    main()
