"""launch/tpu.sh against a fake `gcloud` that records its arguments (no cloud access needed).

What matters on a pod slice: commands that must run on every host use --worker=all, flags reach the
remote shell intact, and the settings come from the environment.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "tpu.sh")

_FAKE_GCLOUD = """#!{python}
import json, sys
with open({log!r}, "a") as f:
  f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


@pytest.fixture()
def run_launch(tmp_path):
  log = tmp_path / "gcloud_calls.jsonl"
  fake = tmp_path / "gcloud"
  fake.write_text(_FAKE_GCLOUD.format(python=sys.executable, log=str(log)))
  fake.chmod(0o755)

  def run(*args, **env):
    full_env = dict(os.environ, GCLOUD=str(fake), TPU_NAME="pod", ZONE="europe-west4-a",
                    **{k: str(v) for k, v in env.items()})
    result = subprocess.run(["bash", SCRIPT, *args], env=full_env, capture_output=True,
                            text=True, check=False)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    log.unlink(missing_ok=True)
    return result, calls

  return run


def _remote_command(call: list[str]) -> str:
  return next(a for a in call if a.startswith("--command="))[len("--command="):]


def test_create_uses_environment_settings(run_launch):
  result, calls = run_launch("create", ACCELERATOR_TYPE="v5litepod-16", SPOT=1, PROJECT="proj")
  assert result.returncode == 0, result.stderr
  assert calls == [["compute", "tpus", "tpu-vm", "create", "pod", "--zone=europe-west4-a",
                    "--project=proj", "--accelerator-type=v5litepod-16",
                    "--version=tpu-ubuntu2204-base", "--spot"]]


def test_train_runs_on_all_workers_with_flags_intact(run_launch):
  result, calls = run_launch("train", "configs/xlmr_hybrid.py:alpha=0.3", "gs://b/run 1",
                             "--config.train.learning_rate=1e-5")
  assert result.returncode == 0, result.stderr
  (call,) = calls
  assert call[:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--zone=europe-west4-a"]
  assert "--worker=all" in call
  remote = _remote_command(call)
  # The remote shell must see exactly these arguments, spaces and '=' included.
  train_part = remote.split("python3 -m hybrid_jax.train", 1)[1].split(">", 1)[0]
  assert shlex.split(train_part) == ["--distributed", "--config=configs/xlmr_hybrid.py:alpha=0.3",
                                     "--workdir=gs://b/run 1", "--config.train.learning_rate=1e-5"]
  assert "HYBRID_JAX_DATA=$HOME/hybrid_jax_data" in remote
  assert "nohup" in remote and "train.log" in remote


def test_evaluate_runs_on_worker_zero_only(run_launch):
  result, calls = run_launch("evaluate", "gs://b/run", "--dataset=mlqa-r")
  assert result.returncode == 0, result.stderr
  (call,) = calls
  assert "--worker=0" in call
  assert shlex.split(_remote_command(call).split("hybrid_jax.evaluate", 1)[1]) == [
      "--workdir=gs://b/run", "--dataset=mlqa-r"]


def test_setup_ships_git_head_to_all_workers_and_installs_tpu_extra(run_launch):
  result, calls = run_launch("setup")
  assert result.returncode == 0, result.stderr
  scp, ssh = calls
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert scp[4].endswith(".tar.gz") and scp[5] == "pod:hybrid_jax.tar.gz"
  assert "--worker=all" in ssh and "pip install -q -e '.[tpu]'" in _remote_command(ssh)


def test_stop_sends_sigterm_everywhere(run_launch):
  _, calls = run_launch("stop")
  (call,) = calls
  assert "--worker=all" in call and "pkill -TERM" in _remote_command(call)


def test_unknown_command_and_missing_arguments_fail_clearly(run_launch):
  result, calls = run_launch("frobnicate")
  assert result.returncode == 2 and "unknown command 'frobnicate'" in result.stderr
  assert not calls
  result, calls = run_launch("train", "configs/xlmr_hybrid.py")
  assert result.returncode != 0 and "usage: launch/tpu.sh train" in result.stderr
  assert not calls
  result, _ = run_launch("data", "/no/such/dir")
  assert result.returncode == 2 and "not a directory" in result.stderr
