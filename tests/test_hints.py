"""Every `--flag` that drivekd's messages name exists on the command that prints them (issue 25).

The messages are the string literals of drivekd/ (help texts included, docstrings and comments not).
A flag in a literal belongs to the command that owns the module (OWNERS); after a command is named in
the same literal ("rebuild with drivekd-cache build --signals logits") the flags belong to that one.
A module shared by commands that load data (the loaders, the families) must name only flags that all
of them have: "pass --skip-bad" there reached drivekd-train users, and only the cache build has it.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import click
import pytest

from drivekd.errors import DataError

PKG = Path(__file__).resolve().parents[1] / "drivekd"

# command name -> "module:attribute" of its click command
COMMANDS = {
    "train": "drivekd.cli.train:main",
    "cache": "drivekd.cli.cache:main",
    "eval": "drivekd.cli.eval:main",
    "ablate": "drivekd.cli.ablate:main",
    "analyze": "drivekd.cli.analyze:main",
    "report": "drivekd.cli.report:main",
    "analyze-demo": "drivekd.analyze.demo:main",  # python -m drivekd.analyze.demo (make analyze-demo)
    "benchmark": "drivekd.demo.benchmark:main",  # python -m drivekd.demo.benchmark
}
# How a message names another command; the flags after it are that command's.
NAMED = {f"drivekd-{c}": c for c in ("train", "cache", "eval", "ablate", "analyze", "report")}
MENTION = re.compile("|".join(re.escape(k) for k in sorted(NAMED, key=len, reverse=True)))

LOADS_DATA = ("train", "cache", "eval", "analyze")
# Module path prefix (relative to drivekd/) -> (commands that print its messages, every): with every=True
# each flag must exist on all of them; with False on at least one (the module speaks for several
# commands, naming each one's own flags, e.g. the planner's "--student" for drivekd-train --dry-run and
# "--model" for drivekd-cache build --dry-run). The longest matching prefix wins.
OWNERS: dict[str, tuple[tuple[str, ...], bool]] = {
    "cli/train.py": (("train",), True),
    "cli/cache.py": (("cache",), True),
    "cli/eval.py": (("eval",), True),
    "cli/ablate.py": (("ablate",), True),
    "cli/analyze.py": (("analyze",), True),
    "cli/report.py": (("report",), True),
    "cli/options.py": (("train", "cache", "eval"), True),  # the image flags, added to these three
    "images.py": (("train", "cache", "eval"), True),
    "data/": (LOADS_DATA, True),
    "families/": (LOADS_DATA, True),
    "trainer/": (("train",), True),
    # drivekd-report's messages are about the runs drivekd-train wrote ("one record per --log-every").
    "trainer/runs_report.py": (("report", "train"), False),
    "terms/": (("train",), True),
    "losses/": (("train",), True),
    "projection/": (("train",), True),
    "layers.py": (("train", "cache"), True),
    "planner/": (("train", "cache"), False),
    "config.py": (("train", "cache", "ablate"), True),  # drivekd.toml, read through --config
    "teacher/": (("cache",), True),
    "store/": (("cache",), True),
    "eval/": (("eval",), True),
    "ablate/": (("ablate",), True),
    "analyze/": (("analyze",), True),
    # It builds drivekd-analyze's argument list ("--model", "--data", ...) beside its own options.
    "analyze/demo.py": (("analyze-demo", "analyze"), False),
    "demo/benchmark.py": (("benchmark",), True),
}
# Flags of other programs that a message may name, and why.
FOREIGN = {"--nproc_per_node": "torchrun's: resuming needs the same number of processes",
           "--signals-to-handle": "torchrun's: the option whose abbreviation torchrun takes --signal(s) for"}

# A flag; a following "-*", "-<role>" or "-{...}" makes it a family of flags ("--judge-*", "--w-<role>").
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*)(-[*<{])?")


def _flags(cmd: click.Command) -> set[str]:
    names = {"--help"}  # click adds it to every command
    for p in cmd.params:
        names.update(o for o in (*p.opts, *p.secondary_opts) if o.startswith("--"))
    if isinstance(cmd, click.Group):
        for sub in cmd.commands.values():
            names |= _flags(sub)
    return names


@pytest.fixture(scope="module")
def flags() -> dict[str, set[str]]:
    out = {}
    for name, target in COMMANDS.items():
        mod, attr = target.split(":")
        out[name] = _flags(getattr(importlib.import_module(mod), attr))
    return out


def _literals(tree: ast.AST):
    """(line, text) of each string literal but docstrings; an f-string is one text, "{}" per field."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                skip.add(id(first.value))
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
            yield node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def _owner(rel: str) -> tuple[tuple[str, ...], bool]:
    matches = [k for k in OWNERS if rel == k or (k.endswith("/") and rel.startswith(k))]
    assert matches, f"drivekd/{rel}: add it to OWNERS (which commands print its messages?)"
    return OWNERS[max(matches, key=len)]


def named_flags(text: str, owners: tuple[str, ...]):
    """(flag, is_family, commands it should exist on) for each flag in `text`."""
    pieces, start = [], 0
    for m in MENTION.finditer(text):
        if m.start() < start:  # inside a quoted command already taken
            continue
        pieces.append((text[start:m.start()], owners))
        # `drivekd-cache build --teacher ROLE` (--cache): a quoted command ends at its closing backquote
        end = text.find("`", m.end()) if text[m.start() - 1:m.start()] == "`" else -1
        end = len(text) if end < 0 else end
        pieces.append((text[m.end():end], (NAMED[m.group(0)],)))
        start = end
    pieces.append((text[start:], owners))
    for piece, commands in pieces:
        for m in FLAG.finditer(piece):
            yield m.group(1), m.group(2) is not None, commands


def _exists(flag: str, family: bool, names: set[str]) -> bool:
    return any(n.startswith(flag + "-") for n in names) if family else flag in names


def test_every_flag_named_in_a_message_exists_on_its_command(flags):
    wrong, seen = [], 0
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).as_posix()
        if rel.endswith("__init__.py") and rel != "__init__.py":
            rel = rel.removesuffix("__init__.py")  # a package's own module: its folder's owners
        for line, text in _literals(ast.parse(path.read_text())):
            if "--" not in text:
                continue
            commands, every = _owner(rel)  # asked only of modules that name flags
            for flag, family, on in named_flags(text, commands):
                seen += 1
                if flag in FOREIGN:
                    continue
                ok = [_exists(flag, family, flags[c]) for c in on]
                if not (all(ok) if every or len(on) == 1 else any(ok)):
                    missing = [c for c, k in zip(on, ok) if not k]
                    wrong.append(f"drivekd/{rel}:{line}: {flag}{'-*' if family else ''} (not on {', '.join(missing)})")
    assert seen > 200  # the scan reads the messages (about 390 flag mentions today)
    assert not wrong, "messages name flags their command lacks:\n" + "\n".join(wrong)


@pytest.mark.parametrize("text,owners,found", [
    # the hints this test was written for: each names a flag its command lacks
    ("does not exist; pass images_root (--images-root) pointing to the folder", LOADS_DATA, [("--images-root", False)]),
    ("cannot read image x.png. Fix or remove the file, or pass --skip-bad", LOADS_DATA, [("--skip-bad", False)]),
    # a named command takes the flags after it; families of flags
    ("build them with `drivekd-cache build --teacher ROLE` (--cache)", ("train",), [("--teacher", False), ("--cache", False)]),
    ("a store built with drivekd-cache build --signals hidden", ("train",), [("--signals", False)]),
    ("put --judge-* after it; to switch a teacher off use --w-<role> 0", ("eval",), [("--judge", True), ("--w", True)]),
])
def test_the_scan_finds_flags_and_their_command(flags, text, owners, found):
    got = list(named_flags(text, owners))
    assert [(f, fam) for f, fam, _ in got] == found
    if "images-root" in text or "skip-bad" in text:  # today's wrong hints would fail the scan
        assert not all(_exists(f, fam, flags[c]) for f, fam, on in got for c in on)
    if "`drivekd-cache" in text:  # --teacher is the quoted build's; (--cache) is drivekd-train's own again
        assert got[0][2] == ("cache",) and got[1][2] == ("train",)
    elif "drivekd-cache" in text:  # unquoted: to the end of the message
        assert got[0][2] == ("cache",)


def test_unreadable_image_names_skip_bad_only_in_the_cache_build(tmp_path):
    """The family's image error reaches drivekd-train, -eval and -analyze users: no --skip-bad there;
    the cache build, which has the flag, adds it."""
    from types import SimpleNamespace

    from drivekd.data.sample import Sample
    from drivekd.families.base import Family
    from drivekd.teacher.build import _Pass

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    s = Sample("s1", "perception", (bad,), "What is ahead?", "A car.")
    with pytest.raises(DataError) as e:
        Family.load_images(s)
    assert "broken.png" in str(e.value) and "--skip-bad" not in str(e.value)

    fam = SimpleNamespace(images=Family.load_images)
    build = _Pass(None, fam, None, [], None, None, SimpleNamespace(skip_bad=False), None, {}, None)
    with pytest.raises(DataError, match=r"broken\.png.*pass --skip-bad"):
        build.readable([s])
