"""The suite's thread rule (tests/conftest.py): a test that leaves a thread running, or whose thread
dies with an exception, fails -- checked by running this conftest on a small suite of its own."""
from __future__ import annotations

from pathlib import Path

SUITE = '''
import concurrent.futures, threading, time
import pytest

def test_leaves_a_thread():
    threading.Thread(target=time.sleep, args=(30,), name="sleeper", daemon=True).start()

def test_thread_that_ends_soon_is_fine():
    threading.Thread(target=time.sleep, args=(0.2,), daemon=True).start()

def test_joined_executor_is_fine():
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        assert ex.submit(sum, [1, 2]).result() == 3

def test_exception_in_a_thread():
    t = threading.Thread(target=lambda: 1 / 0)
    t.start()
    t.join()

@pytest.fixture(scope="module")
def server():
    stop = threading.Event()
    t = threading.Thread(target=stop.wait, name="server", daemon=True)
    t.start()
    yield t
    stop.set()

def test_module_fixture_thread_lives_across_tests(server):
    assert server.is_alive()

def test_module_fixture_thread_again(server):
    assert server.is_alive()

@pytest.fixture(scope="module")
def forgetful():
    t = threading.Thread(target=time.sleep, args=(30,), name="forgotten", daemon=True)
    t.start()
    yield t

def test_uses_forgetful(forgetful):
    pass
'''


def test_leftover_threads_fail(pytester):
    conftest = (Path(__file__).parent / "conftest.py").read_text(encoding="utf-8")
    pytester.makeconftest(conftest.replace("THREAD_GRACE_S = 10.0", "THREAD_GRACE_S = 0.5"))
    pytester.makepyfile(test_threads=SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly")
    result.assert_outcomes(passed=6, failed=1, errors=2)
    out = result.stdout.str()
    assert "test_leaves_a_thread: the test left threads running: 'sleeper'" in out
    assert "fixture 'forgetful' left threads running after its teardown: 'forgotten'" in out
    assert "PytestUnhandledThreadExceptionWarning: Exception in thread" in out
