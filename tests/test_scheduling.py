"""The test suite's own scheduling under pytest-xdist: the groups `tests/conftest.py` declares reach the scheduler.
(xdist's `xdist_group` marks stopped doing so on pytest 9 without an error, pytest-dev/pytest-xdist#1386: every
test ran alone, module fixtures were built once per worker and the S3 tests spread over workers.)"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # two xdist worker processes

TESTS = Path(__file__).resolve().parent

GROUPED = '''
import os
import pytest

@pytest.fixture(scope="module")
def built():
    return os.getpid()

''' + "".join(f"def test_grouped_{i}(built):\n    pass\n\n" for i in range(6))

ALONE = "".join(f"def test_alone_{i}():\n    pass\n\n" for i in range(8))

SLOW = '''
import pytest

@pytest.mark.slow
def test_slow_one():
    pass
'''


def test_a_module_with_a_module_fixture_runs_in_one_worker_and_slow_tests_start_first(tmp_path):
    (tmp_path / "conftest.py").write_text(  # the suite's scheduling hooks, none of its fixtures
        "import importlib.util, sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        f"spec = importlib.util.spec_from_file_location('suite_conftest', {str(TESTS / 'conftest.py')!r})\n"
        "suite = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(suite)\n"
        "pytest_configure, pytest_unconfigure = suite.pytest_configure, suite.pytest_unconfigure\n"
        "pytest_collection_modifyitems = suite.pytest_collection_modifyitems\n"
        "pytest_xdist_make_scheduler = suite.pytest_xdist_make_scheduler\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    (tmp_path / "test_free.py").write_text(ALONE)
    (tmp_path / "test_last.py").write_text(SLOW)  # collected last
    run = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-v", "-p",
                          "no:cacheprovider", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    placed = re.findall(r"\[(gw\d)\] \[\s*\d+%\] PASSED (\S+)", run.stdout)
    assert len(placed) == 15, run.stdout[-3000:]
    grouped_workers = {worker for worker, test in placed if "test_grouped_" in test}
    assert len(grouped_workers) == 1, placed  # the module fixture built once
    assert {worker for worker, test in placed if "test_alone_" in test} == {"gw0", "gw1"}  # the rest spread out
    (slow_worker,) = {worker for worker, test in placed if test == "test_last.py::test_slow_one"}
    first = next(test for worker, test in placed if worker == slow_worker)
    assert first == "test_last.py::test_slow_one", placed  # collected last, the first its worker ran
