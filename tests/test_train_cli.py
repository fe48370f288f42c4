"""The train and export command lines: user errors exit with status 2 and a one-line reason."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args):
  return subprocess.run([sys.executable, "-m"] + args, capture_output=True, text=True, cwd=REPO,
                        timeout=300)


@pytest.mark.parametrize("override,message", [
    ("--config.train.batch_size=12", "error: config.train.batch_size=12 is not divisible by the 8 "
     "devices"),
    # config.mesh is a tuple so that ml_collections can override it; 3 x 4 needs 12 devices.
    ("--config.mesh=(('data', 3), ('fsdp', 4))", "uses 12 devices but 8 are available"),
], ids=["batch_size", "mesh"])
def test_train_cli_reports_a_bad_config_without_a_traceback(tmp_path, override, message):
  workdir = tmp_path / "run"
  result = _run(["hybrid_jax.train", "--config=configs/xlmr_hybrid.py:runlocal", override,
                 f"--workdir={workdir}"])
  assert result.returncode == 2, result.stderr[-2000:]
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_export_cli_reports_a_workdir_that_is_not_a_run(tmp_path):
  result = _run(["hybrid_jax.export", f"--workdir={tmp_path}", f"--out={tmp_path / 'hf'}"])
  assert result.returncode == 2, result.stderr[-2000:]
  assert "is not a hybrid_jax training workdir" in result.stderr
  assert "Traceback" not in result.stderr
