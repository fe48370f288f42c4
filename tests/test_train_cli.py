"""The train and export command lines: user errors exit with status 2 and a one-line reason."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args):
  return subprocess.run([sys.executable, "-m"] + args, capture_output=True, text=True, cwd=REPO,
                        timeout=300)


def test_train_cli_reports_a_bad_config_without_a_traceback(tmp_path):
  workdir = tmp_path / "run"
  result = _run(["hybrid_jax.train", "--config=configs/xlmr_hybrid.py:runlocal",
                 "--config.train.batch_size=12", f"--workdir={workdir}"])
  assert result.returncode == 2, result.stderr[-2000:]
  assert "error: config.train.batch_size=12 is not divisible by the 8 devices" in result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_train_cli_takes_the_mesh_from_the_command_line(tmp_path):
  # config.mesh is a tuple so that ml_collections can override it; 3 x 4 needs 12 devices.
  workdir = tmp_path / "run"
  result = _run(["hybrid_jax.train", "--config=configs/xlmr_hybrid.py:runlocal",
                 "--config.mesh=(('data', 3), ('fsdp', 4))", f"--workdir={workdir}"])
  assert result.returncode == 2, result.stderr[-2000:]
  assert "uses 12 devices but 8 are available" in result.stderr
  assert not workdir.exists()


def test_export_cli_reports_a_workdir_that_is_not_a_run(tmp_path):
  result = _run(["hybrid_jax.export", f"--workdir={tmp_path}", f"--out={tmp_path / 'hf'}"])
  assert result.returncode == 2, result.stderr[-2000:]
  assert "is not a hybrid_jax training workdir" in result.stderr
  assert "Traceback" not in result.stderr
