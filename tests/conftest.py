"""Shared test fixtures. Tests that need the real data in ../shared/data skip with a reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_root() -> Path:
    env = os.environ.get("DHAD_DATA_DIR")
    if env:
        return Path(env).resolve().parent
    return REPO.parent / "shared"


def data_dir() -> Path:
    env = os.environ.get("DHAD_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = data_dir()
    if not d.is_dir():
        pytest.skip(f"real data not found at {d} (set DHAD_DATA_DIR)")
    return d


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    d = REPO.parent / "shared" / "fixtures"
    if not d.is_dir():
        pytest.skip(f"golden fixtures not found at {d}")
    return d


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    except ImportError:
        pass
    yield


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A tiny Jais-style chat model trained in seconds on a few Arabic/English conversations
    (dhad.serve.demo), shared by the serve, chat and web-chat tests."""
    from dhad.serve.demo import build_demo_model
    d = tmp_path_factory.getbasetemp() / "dhad-demo-chat"
    if not (d / "config.json").exists():
        build_demo_model(d)
    return d


@pytest.fixture(scope="module", autouse=True)
def _one_thread(request):
    """Modules marked `one_thread` run torch on one intra-op thread: tiny models are many tiny ops, one
    thread is faster, and it does not stall when another process holds the second core (measured:
    1 thread 3.7 s vs 2 threads 46 s for the same training run under load)."""
    if request.node.get_closest_marker("one_thread") is None:
        yield
        return
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
