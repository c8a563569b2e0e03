"""Properties of the code itself."""
import subprocess
import sys

from conftest import ROOT

PACKAGE = ROOT / "trec_accel"


def test_ruff_passes():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "trec_accel", "scripts", "tests"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
