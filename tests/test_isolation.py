"""The `isolated` marker: a test that crashes its process fails alone; the run and the other tests go on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD_TESTS = '''
import os
import signal

import pytest


@pytest.mark.isolated
def test_crashes():
    os.kill(os.getpid(), signal.SIGSEGV)  # what a native kernel's segfault does to the process


@pytest.mark.isolated
def test_passes_alone():
    assert os.environ.get("WGP_ISOLATED_CHILD") == "1"  # really ran in the child


@pytest.mark.isolated
def test_skips_alone():
    pytest.skip("no GPU here")


def test_in_process():
    assert os.environ.get("WGP_ISOLATED_CHILD") is None
'''


def test_a_crashing_test_fails_alone_and_the_run_goes_on(tmp_path: Path) -> None:
    (tmp_path / "test_child.py").write_text(CHILD_TESTS)
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_pyfunc_call  # noqa: F401\n")
    env = {k: v for k, v in os.environ.items() if k != "WGP_ISOLATED_CHILD"}
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1, out  # failures reported, the process itself survived
    assert "1 failed, 2 passed, 1 skipped" in out, out
    assert "FAILED test_child.py::test_crashes" in out and "SIGSEGV" in out, out
    assert "no GPU here" in out, out
