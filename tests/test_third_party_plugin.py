"""A third party's policy, pip-installed into a fresh virtualenv next to dpcore, works by name."""

from __future__ import annotations

import json
import os
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_example_plugin_installs_and_is_selectable(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # Build the example from source into the fresh venv together with dpcore itself.
    subprocess.run([*pip, str(REPO), str(REPO / "examples" / "dp_power_of_two")], check=True, env=env,
                   timeout=600)
    dpcore = [str(env_dir / "bin" / "dpcore")]
    listed = subprocess.run([*dpcore, "policies", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["power_of_two"]["dist"] == "dp-power-of-two"
    # Only the example is installed in that venv: no first-party policy leaks in.
    assert "round_robin" not in rows
    dry = subprocess.run([*dpcore, "serve", "--dry-run", "--json", "--load-balance-method", "Power_Of_Two",
                          "--policy-option", "power_of_two.seed=3"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["chain"] == ["power_of_two"]
    # auto needs a distribution that declares the non-PD default, and none in this venv does:
    # one line that says how to fix it.
    auto = subprocess.run([*dpcore, "serve", "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert auto.returncode == 2
    assert "pip install 'dpcore[policies]'" in auto.stderr and "Traceback" not in auto.stderr
