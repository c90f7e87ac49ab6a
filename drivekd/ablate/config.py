"""The ablation file: many drivekd-train runs from one store, checked whole before any training.

    [ablation]                      # how the runs are repeated, evaluated and reported
    out = "ablation"                # runs/NAME/seed-S/, eval/NAME/seed-S/, state/, report.{md,json,png}
    seeds = [42, 43, 44]            # every run is trained once per seed (mean ± std in the report)
    eval_data = "bench.json"        # default: [data].eval of the project config (drivekd.toml)
    eval_images = "images/"         # default: [data].images of the project config
    max_new_tokens = 64             # drivekd-eval generation settings
    checkpoint = "final"            # the checkpoint each run is evaluated at: final (the last step) |
                                    # best (RUN/best/, chosen on the validation set: every run needs
                                    # save_best and eval_data, a validation set other than eval_data)
    project = "drivekd.toml"        # project config giving the [train] defaults; default ./drivekd.toml
                                    # when present; false: none (the file alone defines the runs)

    [base]                          # drivekd-train settings shared by every run (TrainConfig keys)
    lr = 5e-5

    [[runs]]
    name = "ce-perception"          # folder name: letters, digits, . _ -
    row = "CE"                      # Table-4 row; several runs may fill one row, each its capabilities
    report = ["perception"]         # capabilities this run reports (default: all three)
    recipe = "sft"                  # ... and any TrainConfig key, overriding [base]
    split = "perception"
    optional = false                # true: a recipe or key this drivekd does not know yet makes the
                                    # row "unavailable: ..." instead of an error (lights up once merged)

A run's settings are, lowest first: TrainConfig defaults < the project config's [train] table <
[base] < the run's keys; `out`, `seed` (with `seeds`) and `resume` are chosen by the ablation. The
project's [data].eval is the ablation's test set, so a run does not validate on it unless [base], the
run or the project's [train] table names eval_data itself.
Relative paths in this file are resolved against its folder. `load_ablation` builds every run's
TrainConfig per seed, so a bad value anywhere is one ConfigError naming the run and the key, raised
before anything trains.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from drivekd.errors import ConfigError, DriveKDError
from drivekd.images import ImageSettings
from drivekd.roles import CAPABILITIES
from drivekd.trainer.settings import PATH_KEYS, RECIPES, VALIDATION_KEYS, TrainConfig, config_from_sources

ABLATION_KEYS = ("out", "seeds", "eval_data", "eval_images", "max_new_tokens", "eval_batch_size", "eval_limit", "title",
                 "project", "checkpoint")
CHECKPOINTS = ("final", "best")  # which checkpoint of a run is evaluated
RUN_META = ("name", "row", "report", "optional")
CHOSEN = ("out", "resume", "resume_from")  # the ablation decides these for every run
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Job:
    """One training + evaluation: a run at one seed."""

    run: str
    seed: int | None
    cfg: TrainConfig

    @property
    def key(self) -> str:
        return f"{self.run}/seed-{self.seed}" if self.seed is not None else self.run


@dataclass
class RunSpec:
    """One [[runs]] entry, resolved: its jobs (one per seed), or why it cannot run here."""

    name: str
    row: str
    report: tuple[str, ...]
    settings: dict[str, Any]  # the run's own keys (without the meta keys)
    jobs: list[Job] = field(default_factory=list)
    unavailable: str | None = None  # set for an optional run this drivekd cannot express


@dataclass
class Ablation:
    path: Path
    out: Path
    seeds: list[int] | None
    runs: list[RunSpec]
    eval_data: Path | None
    eval_images: Path | None
    max_new_tokens: int = 512
    eval_batch_size: int = 8
    eval_limit: int | None = None
    title: str = "Ablation"
    project: Path | None = None
    checkpoint: str = "final"  # final | best (chosen on each run's validation set: drivekd-train --save-best)

    def run(self, name: str) -> RunSpec:
        for r in self.runs:
            if r.name == name:
                return r
        raise ConfigError(f"no run named {name!r} in {self.path} (runs: {', '.join(r.name for r in self.runs)})")

    @property
    def rows(self) -> list[str]:
        """Table rows in the order of their first run."""
        return list(dict.fromkeys(r.row for r in self.runs))

    def run_dir(self, job: Job) -> Path:
        return self.out / "runs" / job.key

    def eval_dir(self, job: Job) -> Path:
        return self.out / "eval" / job.key

    def state_path(self, job: Job) -> Path:
        return self.out / "state" / (job.key.replace("/", ".") + ".json")


def _resolve(base: Path, v: Any) -> Any:
    return str((base / v).resolve()) if isinstance(v, str) and not Path(v).is_absolute() else v


def _where(path: Path, run: str | None, key: str | None = None) -> str:
    parts = [str(path)]
    if run is not None:
        parts.append(f"run {run!r}")
    if key is not None:
        parts.append(f"key {key!r}")
    return ": ".join(parts)


def load_ablation(path: str | Path, *, out: str | Path | None = None, project: str | Path | bool | None = None,
                  need_eval: bool = True) -> Ablation:
    """Read and check the whole ablation file; every run's TrainConfig is built per seed here.

    out / project: command-line overrides of [ablation].out / .project (relative to the cwd); project
    False: no project config (not even ./drivekd.toml).
    need_eval: an evaluation set must be known (from the file or the project config).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    here = path.resolve().parent
    extra = sorted(set(raw) - {"ablation", "base", "runs"})
    if extra:
        raise ConfigError(f"{path}: unknown table(s) {', '.join(extra)} (an ablation file has [ablation], [base], [[runs]])")
    head = raw.get("ablation", {})
    base = raw.get("base", {})
    runs = raw.get("runs", [])
    if not isinstance(head, dict) or not isinstance(base, dict):
        raise ConfigError(f"{path}: [ablation] and [base] must be tables")
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise ConfigError(f"{path}: no runs: add [[runs]] tables, each with a name and its drivekd-train settings")
    unknown = sorted(set(head) - set(ABLATION_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) in [ablation]: {', '.join(unknown)} (valid: {', '.join(ABLATION_KEYS)})")

    seeds = head.get("seeds")
    if seeds is not None:
        if (not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)
                or len(set(seeds)) != len(seeds)):
            raise ConfigError(f"{_where(path, None, 'seeds')}: give a list of distinct integers >= 0, e.g. [42, 43, 44]; got {seeds!r}")

    if project is None and "project" in head:  # the file's key: relative to the file; the flag: to the cwd
        v = head["project"]
        project = Path(_resolve(here, v)) if isinstance(v, str) else v
    if project is False:  # no project config at all: the file alone defines the runs
        project_cfg, project_path = {}, None
    else:
        if project is not None and not isinstance(project, (str, Path)):
            raise ConfigError(f"{_where(path, None, 'project')}: a path, or false for none; got {project!r}")
        project_path = None if project is None else Path(project)
        from drivekd.config import load_config

        project_cfg = load_config(project_path)  # ./drivekd.toml when none is given and it exists
        project_path = Path(project_cfg["_path"]) if project_cfg else None

    abl = Ablation(
        path=path,
        out=Path(out) if out is not None else Path(_resolve(here, head.get("out", "ablation"))),
        seeds=seeds,
        runs=[],
        eval_data=_path_or_none(head.get("eval_data"), here) or _path_or_none(project_cfg.get("data", {}).get("eval"), here),
        eval_images=_path_or_none(head.get("eval_images"), here) or _path_or_none(project_cfg.get("data", {}).get("images"), here),
        max_new_tokens=_int(head, "max_new_tokens", 512, path),
        eval_batch_size=_int(head, "eval_batch_size", 8, path),
        eval_limit=_int(head, "eval_limit", None, path),
        title=str(head.get("title", f"Ablation: {path.stem}")),
        project=project_path,
        checkpoint=head.get("checkpoint", "final"),
    )
    if abl.checkpoint not in CHECKPOINTS:
        raise ConfigError(f"{_where(path, None, 'checkpoint')}: one of {', '.join(CHECKPOINTS)}, got {abl.checkpoint!r}")
    if need_eval and abl.eval_data is None:
        raise ConfigError(f"{path}: no evaluation set: set [ablation].eval_data, or [data].eval in the project config "
                          f"({project_path or 'drivekd.toml'})")
    if need_eval and not abl.eval_data.is_file():  # found now, not after the first training
        raise ConfigError(f"{_where(path, None, 'eval_data')}: {abl.eval_data} does not exist; give a DriveBench JSON file")
    if need_eval and abl.eval_images is not None and not abl.eval_images.is_dir():
        raise ConfigError(f"{_where(path, None, 'eval_images')}: {abl.eval_images} is not a folder")

    own_eval = "eval_data" in project_cfg.get("train", {})  # the project's [train] names a validation set itself
    base_settings = _settings(base, here, path, None)
    for key in base_settings:
        _check_not_chosen(key, path, None, seeds)
    names: set[str] = set()
    for i, entry in enumerate(runs):
        spec = _run_spec(entry, i, base_settings, here, abl, names, own_eval)
        abl.runs.append(spec)
    _check_rows(abl)
    return abl


def _path_or_none(v: Any, here: Path) -> Path | None:
    return None if v is None else Path(_resolve(here, v))


def _int(head: dict, key: str, default: int | None, path: Path) -> int | None:
    v = head.get(key, default)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"{_where(path, None, key)}: must be an integer >= 1, got {v!r}")
    return v


def _settings(table: dict, here: Path, path: Path, run: str | None) -> dict[str, Any]:
    """A table's drivekd-train keys with relative paths resolved against the ablation file's folder."""
    out = {}
    for k, v in table.items():
        out[k] = _resolve(here, v) if k in PATH_KEYS else v
    return out


def _check_not_chosen(key: str, path: Path, run: str | None, seeds: list[int] | None) -> None:
    if key in CHOSEN:
        raise ConfigError(f"{_where(path, run, key)}: the ablation chooses each run's --out and resumes it itself; "
                          f"remove {key!r} (set [ablation].out for the folder of all runs)")
    if key == "seed" and seeds is not None:
        raise ConfigError(f"{_where(path, run, key)}: [ablation].seeds sets the seed of every run; remove 'seed' or 'seeds'")


def _run_spec(entry: dict, i: int, base: dict, here: Path, abl: Ablation, names: set[str], own_eval: bool = False) -> RunSpec:
    path = abl.path
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{path}: run #{i + 1} needs a name of letters, digits, '.', '_' or '-' (it names its folders), "
                          f"got {name!r}")
    if name in names:
        raise ConfigError(f"{_where(path, name)}: two runs have this name; names must be unique")
    names.add(name)
    row = entry.get("row", name)
    report = entry.get("report", list(CAPABILITIES))
    if isinstance(report, str):
        report = [report]
    if not isinstance(report, list) or not report or any(c not in CAPABILITIES for c in report):
        raise ConfigError(f"{_where(path, name, 'report')}: a list of capabilities among {', '.join(CAPABILITIES)}, got {report!r}")
    optional = entry.get("optional", False)
    if not isinstance(optional, bool):
        raise ConfigError(f"{_where(path, name, 'optional')}: true or false, got {optional!r}")
    own = _settings({k: v for k, v in entry.items() if k not in RUN_META}, here, path, name)
    for key in own:
        _check_not_chosen(key, path, name, abl.seeds)
    spec = RunSpec(name=name, row=str(row), report=tuple(c for c in CAPABILITIES if c in report), settings=own)

    merged = {**base, **own}
    known = set(TrainConfig.keys()) | set(ImageSettings.keys())
    unknown = sorted(set(merged) - known)
    recipe = merged.get("recipe")
    missing = []
    if recipe is not None and recipe not in RECIPES:
        missing.append(f"recipe {recipe}")
    if unknown:
        missing.append(f"setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    if missing:
        what = " and ".join(missing)
        if optional:
            spec.unavailable = f"{what} not known to this drivekd"
            return spec
        key = "recipe" if recipe is not None and recipe not in RECIPES else unknown[0]
        hint = (f"recipes are {', '.join(RECIPES)}" if key == "recipe" else
                "keys are the drivekd-train flag names with underscores")
        raise ConfigError(f"{_where(path, name, key)}: {what} not known to this drivekd ({hint}); fix it, or mark the "
                          f"run optional = true to report it as unavailable until a drivekd that has it")

    for seed in abl.seeds or [None]:
        job = Job(name, seed, None)  # type: ignore[arg-type]
        settings = {**merged, "out": str(abl.run_dir(job).resolve()), "resume": True}
        if seed is not None:
            settings["seed"] = seed
        try:
            job.cfg = config_from_sources(settings, abl.project) if abl.project is not None else _without_project(settings)
            if "eval_data" not in merged and not own_eval and job.cfg.eval_data is not None:
                # inherited from the project's [data].eval: the ablation's test set, not a validation set
                job.cfg = replace(job.cfg, eval_data=None)
        except DriveKDError as e:
            where = f"{_where(path, name)}{'' if seed is None else f' (seed {seed})'}"
            hint = ("; the project's [data].eval is the ablation's test set, so name a validation set with eval_data in [base] "
                    "or the run" if "eval_data" not in merged and set(merged) & set(VALIDATION_KEYS) else "")
            raise ConfigError(f"{where}: {e}{hint}") from None
        _check_best(abl, name, job.cfg)
        spec.jobs.append(job)
    return spec


def _check_best(abl: Ablation, run: str, cfg: TrainConfig) -> None:
    """checkpoint = "best": the run keeps a best/ (save_best), chosen on a validation set that is not
    the ablation's test set."""
    if abl.checkpoint != "best":
        return
    if cfg.save_best is None:
        raise ConfigError(f"{_where(abl.path, run, 'save_best')}: [ablation].checkpoint = \"best\" evaluates each run's best/, "
                          "so every run needs save_best (e.g. save_best = \"eval/ce\" and eval_data = \"val.json\" in [base])")
    if abl.eval_data is not None and cfg.eval_data is not None and Path(cfg.eval_data).resolve() == Path(abl.eval_data).resolve():
        raise ConfigError(f"{_where(abl.path, run, 'eval_data')}: the run would choose its checkpoint on {cfg.eval_data}, the "
                          "ablation's test set (eval_data of [ablation]); give it a separate validation set")


def _without_project(settings: dict[str, Any]) -> TrainConfig:
    """config_from_sources without a project config (it would read ./drivekd.toml)."""
    from drivekd.images import pop_flags

    d = dict(settings)
    image_settings = ImageSettings.from_sources(pop_flags(d), {})
    return TrainConfig.from_dict({"image_settings": image_settings, **d}, where="ablation file")


def _check_rows(abl: Ablation) -> None:
    """Within one row each capability comes from one run (the table has one number per cell)."""
    for row in abl.rows:
        seen: dict[str, str] = {}
        for r in abl.runs:
            if r.row != row:
                continue
            for c in r.report:
                if c in seen:
                    raise ConfigError(f"{_where(abl.path, r.name, 'report')}: row {row!r} already takes {c} from run "
                                      f"{seen[c]!r}; give one of them another row or report")
                seen[c] = r.name


__all__ = ["Ablation", "CHECKPOINTS", "Job", "RunSpec", "load_ablation"]
