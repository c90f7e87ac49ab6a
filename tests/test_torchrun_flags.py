"""Flags of the CLIs that run under torchrun against torchrun's own parser.

torchrun's argparse classifies every option string of the command line, also those after the
script, and refuses one that is an ambiguous prefix of its own options (`--signals` could be
`--signals-to-handle` or `--signals_to_handle`) before the script ever starts. Each option a user
may pass under torchrun must therefore have a spelling torchrun lets through. No launch here:
the real parser (`torch.distributed.run.get_args_parser`) on the real option lists.
"""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner
from torch.distributed.run import get_args_parser

from drivekd.cli import analyze, cache, train

# The commands a user may run under `torchrun ... -m <module> [subcommand]`.
TORCHRUN_COMMANDS = {
    ("drivekd.cli.cache", "build"): cache.main.commands["build"],
    ("drivekd.cli.train",): train.main,
    ("drivekd.cli.analyze",): analyze.main,
}
# Options that plan a launch rather than run in one (--dry-run only): never passed under torchrun.
DRY_RUN_ONLY = {"--nproc"}


def _passes_torchrun(module: tuple[str, ...], args: list[str]) -> bool:
    """Whether torchrun's parser accepts `torchrun --nproc_per_node=2 -m MODULE ARGS` and hands
    ARGS to the script unchanged."""
    argv = ["--nproc_per_node=2", "-m", *module, *args]
    try:
        ns = get_args_parser().parse_args(argv)
    except SystemExit:
        return False
    return [ns.training_script, *ns.training_script_args] == list(argv[2:])


def _options(cmd: click.Command) -> list[click.Option]:
    return [p for p in cmd.get_params(click.Context(cmd)) if isinstance(p, click.Option)]


def test_store_signals_passes_torchrun_and_means_signals():
    build = ("drivekd.cli.cache", "build")
    assert not _passes_torchrun(build, ["--teacher", "all", "--signals", "logits"])  # the reason for the second name
    assert _passes_torchrun(build, ["--teacher", "all", "--store-signals", "logits,hidden"])
    for spelling in ("--signals", "--store-signals"):
        ctx = cache.main.commands["build"].make_context("build", ["--teacher", "all", spelling, "logits,hidden"])
        assert ctx.params["signals"] == "logits,hidden"


@pytest.mark.parametrize("spelling", ["--signals", "--store-signals"])
def test_store_signals_reaches_the_build_settings(spelling, tmp_path, monkeypatch):
    """Both spellings fill the same setting: a bad value is refused by the signal parser, before any
    model loads (the checkpoint and data named here do not exist)."""
    monkeypatch.chdir(tmp_path)  # no drivekd.toml
    res = CliRunner().invoke(cache.main, ["build", "--teacher", "perception", "--model", "none", "--data", "none.json",
                                          spelling, "logits,bogus"])
    assert res.exit_code == 2, res.output
    assert "unknown signal(s) bogus" in res.output


def test_attention_signal_passes_torchrun_and_means_signal():
    module = ("drivekd.cli.train",)
    assert not _passes_torchrun(module, ["--fsdp", "--signal", "full"])
    assert _passes_torchrun(module, ["--fsdp", "--attention-signal", "full"])
    for spelling in ("--signal", "--attention-signal"):
        assert train.main.make_context("drivekd-train", [spelling, "full"]).params["signal"] == "full"


def test_every_option_has_a_spelling_torchrun_accepts():
    """Each option of drivekd-cache build, drivekd-train and drivekd-analyze, with a value after it,
    passes torchrun's parser under at least one of its names; the names it refuses are listed."""
    refused, unreachable = {}, []
    for module, cmd in TORCHRUN_COMMANDS.items():
        for opt in _options(cmd):
            names = [*opt.opts, *opt.secondary_opts]
            bad = [n for n in names if not _passes_torchrun(module, [n, "x"])]
            if bad:
                refused.setdefault(" ".join(module), []).extend(bad)
            if len(bad) == len(names) and not set(names) <= DRY_RUN_ONLY:
                unreachable.append(f"{' '.join(module)} {'/'.join(names)}")
    assert not unreachable, f"options torchrun refuses under every name (add a torchrun-safe alias): {unreachable}"
    # The refused spellings, each with its torchrun-safe alias above (or --dry-run only). A new one
    # here is fine once it has an alias: update the list.
    assert refused == {"drivekd.cli.cache build": ["--signals", "--nproc"], "drivekd.cli.train": ["--signal", "--nproc"]}
