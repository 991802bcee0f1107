"""Shared test fixtures. Tests that need the real data in ../shared/data skip with a reason when it is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytest_plugins = ["pytester"]  # tests/test_thread_rule.py runs this file's rules on a small suite


def data_dir() -> Path:
    """$DHAD_DATA_DIR (dhad.utils.data_dir), else ../shared/data beside the repository."""
    from dhad.utils import data_dir as dhad_data_dir
    return dhad_data_dir() or REPO.parent / "shared" / "data"


def shared_root() -> Path:
    return data_dir().resolve().parent


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


# ---------------------------------------------------------------------------------------------
# Threads: a test that leaves one running fails (so does one whose thread dies with an exception).
#
# Every thread records where it was started: the innermost frame outside the standard library, or,
# when only the standard library is on the stack (a socketserver handler, an asyncio executor),
# its parent thread's origin. Threads started from this repository (dhad/ or tests/), by the main
# thread or by another such thread, must be gone when the test that started them has torn down --
# or, for a thread started (directly or by its threads) while setting up a module- or session-scoped
# fixture, when that fixture has been finalized. Threads a library starts for itself (torch's
# compile pool, tqdm's monitor, a test client's event loop and its executor) belong to the library.

import sys  # noqa: E402
import sysconfig  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

THREAD_GRACE_S = 10.0  # how long a finishing thread may take to end after teardown
_STDLIB = tuple({sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]})
_SITE = tuple({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
_REPO = str(REPO) + os.sep
_orig_start = threading.Thread.start


def _thread_origin() -> str | None:
    f = sys._getframe(2)
    while f is not None:
        fn = f.f_code.co_filename
        if not (fn.startswith("<") or (fn.startswith(_STDLIB) and not fn.startswith(_SITE))):
            return fn
        f = f.f_back
    return getattr(threading.current_thread(), "_dhad_origin", None)


def _recording_start(self):
    parent = threading.current_thread()
    self._dhad_origin = origin = _thread_origin()
    self._dhad_parent = parent
    # ours: started from this repository's code, by the main thread or by a thread of ours (a library's
    # thread calling back into our code -- a test client's event loop running the app -- stays the library's)
    self._dhad_ours = (origin is not None and origin.startswith(_REPO) and not origin.startswith(_SITE)
                       and (parent is threading.main_thread() or getattr(parent, "_dhad_ours", False)))
    return _orig_start(self)


def _descendants(roots: set) -> set:
    """``roots`` and the live threads started (transitively) by them: a server fixture's thread owns the
    executor threads its event loop starts later."""
    out = set(roots)
    for t in threading.enumerate():
        p = t
        while p is not None and p not in roots:
            p = getattr(p, "_dhad_parent", None)
        if p is not None:
            out.add(t)
    return out


def _ours(t: threading.Thread) -> bool:
    return getattr(t, "_dhad_ours", False)


def _alive_ours() -> set:
    return {t for t in threading.enumerate() if t.is_alive() and _ours(t)}


def _still_running(threads) -> list:
    deadline = time.monotonic() + THREAD_GRACE_S
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [t for t in threads if t.is_alive()]


def _describe(threads) -> str:
    return ", ".join(f"{t.name!r} (started in {os.path.relpath(t._dhad_origin, REPO)})" for t in threads)


_fixture_threads: dict = {}  # FixtureDef of a wider-than-function fixture -> threads its setup started
_finished_threads: dict = {}  # threads of fixtures finalized during the current teardown -> fixture name


def pytest_configure(config):
    threading.Thread.start = _recording_start
    # An exception that escapes a thread is a failure, not a warning printed later under another test.
    config.addinivalue_line("filterwarnings", "error::pytest.PytestUnhandledThreadExceptionWarning")


def pytest_unconfigure(config):
    threading.Thread.start = _orig_start


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    before = _alive_ours() if fixturedef.scope != "function" else None
    try:
        return (yield)
    finally:
        if before is not None and (_alive_ours() - before):
            _fixture_threads.setdefault(fixturedef, set()).update(_alive_ours() - before)


def pytest_fixture_post_finalizer(fixturedef, request):
    for t in _fixture_threads.pop(fixturedef, ()):
        _finished_threads[t] = fixturedef.argname


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item):
    item._dhad_threads_before = _alive_ours()
    return (yield)


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_teardown(item, nextitem):
    result = yield
    owned = _descendants(set().union(*_fixture_threads.values())) if _fixture_threads else set()
    finished = {}
    for name in set(_finished_threads.values()):
        finished.update(dict.fromkeys(_descendants({t for t, n in _finished_threads.items() if n == name}), name))
    _finished_threads.clear()
    leaked = _alive_ours() - getattr(item, "_dhad_threads_before", set()) - owned - set(finished)
    problems = []
    left = _still_running(sorted(leaked, key=lambda t: t.name))
    if left:
        problems.append(f"the test left threads running: {_describe(left)}")
    for name in sorted(set(finished.values())):
        left = _still_running(sorted((t for t, n in finished.items() if n == name), key=lambda t: t.name))
        if left:
            problems.append(f"fixture {name!r} left threads running after its teardown: {_describe(left)}")
    if problems:
        raise AssertionError(f"{item.nodeid}: " + "; ".join(problems) +
                             f" ({THREAD_GRACE_S:g} s after teardown) -- stop and join them "
                             "(engine.shutdown(), server.stop(), executor.shutdown())")
    return result


@pytest.fixture(scope="session")
def wait_healthy():
    """``wait(url, proc, timeout, log)``: poll ``url``/health until it answers 200; fail with ``log()``
    (the server's output) if the server process exits or ``timeout`` seconds pass first."""
    import httpx

    def wait(url: str, proc, timeout: float = 90, log=lambda: "") -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log()
            time.sleep(0.1)
    return wait
