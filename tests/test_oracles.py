"""The conftest rule that a missing test oracle fails `make test` instead of skipping."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

CASES = '''
import pytest

def test_missing_oracle():
    pytest.importorskip("diffusers.no_such_module_for_this_test")

def test_optional_peer():
    pytest.importorskip("no_such_optional_peer")
'''


def _run(tmp_path, require):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_cases.py").write_text(CASES)
    env = dict(os.environ, DIFFKERN_REQUIRE_ORACLES="1" if require else "0")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    return done.returncode, done.stdout


def test_missing_oracle_fails_under_make_test(tmp_path):
    code, out = _run(tmp_path, require=True)
    assert code == 1, out
    assert "1 failed, 1 skipped" in out, out
    assert "required test oracle missing" in out


def test_missing_oracle_skips_outside_make(tmp_path):
    code, out = _run(tmp_path, require=False)
    assert code == 0, out
    assert "2 skipped" in out, out
