"""Write tiny offline teacher/student checkpoints of both families (see drivekd.demo.tiny_models)."""

from pathlib import Path

import click


@click.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder to write the checkpoints into.")
@click.option("--family", "families", multiple=True, type=click.Choice(["internvl", "qwen2_5_vl"]), help="Default: both.")
def main(out: Path, families: tuple[str, ...]) -> None:
    from drivekd.demo.tiny_models import make_tiny_models

    written = make_tiny_models(out, families or ("internvl", "qwen2_5_vl"))
    for name, path in written.items():
        click.echo(f"{name}: {path}")


if __name__ == "__main__":
    main()
