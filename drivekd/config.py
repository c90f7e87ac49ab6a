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
from drivekd.roles import ROLES

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


# Keys each table may hold; [train] holds the drivekd-train settings (drivekd.trainer.settings).
# A typo in any table is an error naming the key, never silently ignored.
TABLE_KEYS = {
    "data": ("train", "images", "eval"),
    "teachers": ROLES,
    "cache": ("out", "device", "dtype", "encoding", "keepbits", "layers", "batch_size", "skip_bad", "skip_nonfinite", "share_prefix",
              "writers", "text_tokens", "signals", "logits_top_k"),
}
# Keys holding paths: resolved against the config file's folder.
PATH_KEYS = {
    "data": ("train", "images", "eval"),
    "teachers": ROLES,
    "cache": ("out",),
    "train": ("student", "data", "images", "cache", "out", "resume_from", "eval_data", "eval_images"),
}


def load_config(path: str | Path | None) -> dict:
    """Parsed TOML with every table's keys checked (except [train], which the trainer checks) and
    relative paths resolved against the config file's folder."""
    p = find_config(path)
    if p is None:
        return {}
    try:
        cfg = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e
    for table, keys in TABLE_KEYS.items():
        t = cfg.get(table, {})
        if not isinstance(t, dict):
            raise ConfigError(f"{p}: [{table}] must be a table")
        unknown = sorted(set(t) - set(keys))
        if unknown:
            raise ConfigError(f"{p}: unknown key(s) in [{table}]: {', '.join(unknown)} (valid: {', '.join(keys)})")
    base = p.parent
    for table, keys in PATH_KEYS.items():
        t = cfg.get(table, {})
        for k in keys:
            v = t.get(k)
            if isinstance(v, str) and not Path(v).is_absolute():
                t[k] = str((base / v).resolve())
    cfg["_path"] = str(p)
    return cfg
