"""A non-editable install carries the config tree: `python -m smop.train` composes and runs from any folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow


def test_an_installed_copy_trains_from_another_folder(tmp_path):
    source, target = tmp_path / "source", tmp_path / "site"  # a copy: the build leaves nothing in the checkout
    shutil.copytree(ROOT / "smop", source / "smop", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target"]
    subprocess.run([*install, str(target), str(source)], check=True, capture_output=True, timeout=300)
    assert (target / "smop" / "configs" / "train.yaml").is_file()
    assert (target / "smop" / "configs" / "model" / "llama-tiny.yaml").is_file()
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    work = tmp_path / "elsewhere"
    work.mkdir()
    command = [sys.executable, "-m", "smop.train", "trainer.fast_dev_run=true", "hydra.run.dir=out"]
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (work / "out" / "results.json").is_file()
    where = subprocess.run(
        [sys.executable, "-c", "import smop; print(smop.__file__)"], cwd=work, env=env, capture_output=True, text=True
    )
    assert where.stdout.strip().startswith(str(target))  # the installed copy ran, not the checkout
