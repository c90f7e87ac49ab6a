"""Shared fixtures: tiny checkpoints and demo data are built once per test session, offline."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP thread, here and in every process a test starts (torchrun ranks, CLI subprocesses inherit
# it): the tiny models' ops are below torch's parallel grain, and on 2 cores a second thread only
# spin-waits while another process (a second rank, a worker) holds the other core (measured on three
# subprocess-heavy tests: 52 -> 46 CPU s, 52 -> 47 s wall). OMP_NUM_THREADS=N in the environment overrides it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> Path:
    from drivekd.demo.tiny_models import make_tiny_models

    out = tmp_path_factory.mktemp("tiny-models")
    make_tiny_models(out)
    return out


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from drivekd.demo.scenes import make_demo_data

    out = tmp_path_factory.mktemp("demo-data")
    make_demo_data(out, groups=4, questions_per_group=3, seed=0)
    return out


@pytest.fixture(scope="session")
def samples(demo_data):
    """The demo training samples (a module may define its own `samples`; the nearest fixture wins)."""
    from drivekd.data.loaders import load_samples

    return load_samples(demo_data / "train.json")


@pytest.fixture(scope="session")
def targets(tiny_models, samples):
    """Teacher targets of the tiny InternVL teacher on the demo samples (TEACHER_LAYERS), computed once."""
    from online_targets import TEACHER_LAYERS, compute_targets

    return compute_targets(tiny_models / "internvl-teacher", samples, TEACHER_LAYERS)


@pytest.fixture(scope="session")
def small_data(demo_data, tmp_path_factory) -> Path:
    """Five samples of the demo data: a six-view group of two questions (shared prefix) and three
    single views, image paths resolved."""
    import json

    recs = json.loads((demo_data / "train.json").read_text())
    six = [r for r in recs if len(r["images"]) == 6][:2]
    one = [r for r in recs if len(r["images"]) == 1][:3]
    d = tmp_path_factory.mktemp("small")
    for r in six + one:
        r["images"] = [str(demo_data / p) for p in r["images"]]
    (d / "train.json").write_text(json.dumps(six + one))
    return d / "train.json"


@pytest.fixture(scope="session")
def padded_pair(tmp_path_factory):
    """Two samples on solid-colour images, the second longer, so a batch of them really pads."""
    from PIL import Image

    from drivekd.data.sample import Sample

    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for i, c in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200)]):
        im = Image.new("RGB", (224, 112), c)
        im.paste((255, 255, 0), (20 + 30 * i, 30, 60 + 30 * i, 70))
        p = d / f"{i}.png"
        im.save(p)
        paths.append(p)
    a = Sample("s-a", "perception", (paths[0], paths[1]), "What colour is the light?", "Red.")
    b = Sample("s-b", "planning", (paths[2],), "What should the ego vehicle do next?", "Stop and wait for the light to turn green.")
    return a, b


@pytest.fixture(scope="module")
def one_thread():
    """Training tests run tiny ops: one thread is as fast, and far faster when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def five_with_ids(demo_data: Path, d: Path) -> Path:
    """Five demo samples with explicit ids s0..s4 (a six-view group of two, a shared prefix, and three
    single views), their images copied beside the data file (its folder is the default image root)."""
    import json
    import shutil

    recs = json.loads((demo_data / "train.json").read_text())
    six = [r for r in recs if len(r["images"]) == 6][:2]
    one = [r for r in recs if len(r["images"]) == 1][:3]
    for i, r in enumerate(six + one):
        for p in r["images"]:
            (d / p).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(demo_data / p, d / p)
        r["id"] = f"s{i}"
    (d / "train.json").write_text(json.dumps(six + one))
    return d / "train.json"


def config_copy(src: Path, dst: Path, text: int, vision: int) -> Path:
    """A copy of a tiny student's config.json (no weights) with `text` text and `vision` vision layers (Qwen2.5-VL:
    periods of window layers closed by a full-attention one): for planner counts, which need no weights,
    deeper to check depth scaling or shallower where a count's point is per parameter (its cost is its ops)."""
    import json
    import shutil

    c = json.loads((src / "config.json").read_text())
    c["text_config"]["num_hidden_layers"] = text
    if c["text_config"].get("layer_types"):
        c["text_config"]["layer_types"] = c["text_config"]["layer_types"][:1] * text
    vc = c["vision_config"]
    if "depth" in vc:  # Qwen2.5-VL: periods of window-attention layers closed by a full-attention one
        period = vc["fullatt_block_indexes"][0] + 1
        vc["depth"] = vision * period
        vc["fullatt_block_indexes"] = [period * (i + 1) - 1 for i in range(vision)]
    else:
        vc["num_hidden_layers"] = vision
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".json" and f.name != "config.json":
            shutil.copy(f, dst / f.name)
    (dst / "config.json").write_text(json.dumps(c))
    return dst


# ----------------------------------------------------------------------------- scheduling (make test)
# `make test` runs on two pytest-xdist workers with --dist worksteal: each worker starts on one
# contiguous half of the collection order, and a worker that runs dry steals from the END of the
# other's queue. So the order decides the finish: heaviest files first (longest-processing-time
# first), light ones last to even out the end. Files stay whole and in their own order, so a module
# fixture is built once per worker at most. The weights are seconds per file from a full run
# (tests/durations.json; refresh it with `make test-durations`); a file it does not list weighs 0
# and runs last. The order changes no result: tests do not depend on each other.
DURATIONS = Path(__file__).with_name("durations.json")


def pytest_addoption(parser):
    parser.addoption("--write-durations", metavar="PATH", default=None,
                     help="write the seconds each test file took (setup + call + teardown) to PATH as JSON")


def pytest_collection_modifyitems(config, items):
    import json

    weights = json.loads(DURATIONS.read_text()) if DURATIONS.exists() else {}
    first = {}  # file -> position of its first test (files keep their collected order among equals)
    for i, item in enumerate(items):
        first.setdefault(item.nodeid.split("::")[0], i)
    items.sort(key=lambda it: (-weights.get(it.nodeid.split("::")[0], 0.0), first[it.nodeid.split("::")[0]]))


_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    # On the xdist controller too: the workers' reports arrive here.
    f = report.nodeid.split("::")[0]
    _seconds[f] = _seconds.get(f, 0.0) + report.duration


def pytest_sessionfinish(session):
    import json

    path = session.config.getoption("--write-durations")
    if path and not hasattr(session.config, "workerinput"):  # the controller (or a run without xdist) writes
        Path(path).write_text(json.dumps({f: round(s, 1) for f, s in sorted(_seconds.items(), key=lambda kv: -kv[1])}, indent=0) + "\n")
