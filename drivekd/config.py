"""The project config file (drivekd.toml): settings shared by the cache, trainer and eval commands.

    [data]
    train = "demo/data/train.json"      # Drive-KD or DriveBench format
    images = "demo/data"                # image root for relative paths

    [teachers]                          # a checkpoint folder per role; roles may share one
    perception = "demo/models/internvl-teacher"
    reasoning = "demo/models/internvl-teacher"
    planning = "demo/models/internvl-teacher"

    [cache]
    out = "cache/"

    [train]                             # drivekd-train flags, underscores for dashes

    [images]                            # image settings for cache, train and eval (drivekd/images.py)
    tiling = false                      # InternVL: one 448-px tile per camera (--tiling/--no-tiling)
    max_pixels = 200704                 # Qwen2.5-VL: <= 256 tokens per camera (--min-pixels/--max-pixels)

Relative paths are resolved against the config file's folder. Command-line flags override it.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from drivekd.errors import ConfigError

DEFAULT_NAME = "drivekd.toml"


def find_config(path: str | Path | None) -> Path | None:
    """The given config, or ./drivekd.toml when it exists."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config {p}: no such file")
        return p
    p = Path(DEFAULT_NAME)
    return p if p.is_file() else None


def load_config(path: str | Path | None) -> dict:
    """Parsed TOML with relative paths of [data], [teachers] and [cache] resolved."""
    p = find_config(path)
    if p is None:
        return {}
    try:
        cfg = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e
    base = p.parent
    for table, keys in (("data", ("train", "images", "eval")), ("teachers", None), ("cache", ("out",))):
        t = cfg.get(table, {})
        for k, v in list(t.items()):
            if (keys is None or k in keys) and isinstance(v, str):
                t[k] = str((base / v).resolve()) if not Path(v).is_absolute() else v
    cfg["_path"] = str(p)
    return cfg
