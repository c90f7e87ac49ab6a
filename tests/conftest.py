"""Shared fixtures: tiny checkpoints and demo data are built once per test session, offline."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


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


@pytest.fixture(scope="module")
def one_thread():
    """Training tests run tiny ops: one thread is as fast, and far faster when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
