"""One writer per workdir: a second job stops naming the holder, a dead holder's lock is taken
over with a warning, leases expire, an aborted start leaves no workdir. Two real processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from hybrid_jax import trainer
from hybrid_jax import workdir_lock
from train_helpers import REPO, runlocal_config

_HOLDER = """
import sys, time
from hybrid_jax import workdir_lock
workdir_lock.WorkdirLock(sys.argv[1], mechanism=sys.argv[2]).acquire()
print("held", flush=True)
time.sleep(600)
"""


def _hold_in_another_process(workdir, mechanism="auto"):
  """A second process that takes the lock and keeps it until killed."""
  process = subprocess.Popen([sys.executable, "-c", _HOLDER, str(workdir), mechanism],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
  assert process.stdout.readline().strip() == "held", process.stderr.read()
  return process


def _kill(process):
  process.send_signal(signal.SIGKILL)
  process.wait()


@pytest.mark.parametrize("mechanism", ["flock", "lease"])
def test_second_job_stops_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path, capfd,
                                                                              mechanism):
  workdir = tmp_path / "run"
  holder = _hold_in_another_process(workdir, mechanism)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError,
                       match=rf"in use by another training job: pid {holder.pid} on host "
                             rf"{socket.gethostname()}, started .*another --workdir"):
      workdir_lock.WorkdirLock(str(workdir), mechanism=mechanism).acquire()
    assert workdir_lock.live_holder(str(workdir)).startswith(f"pid {holder.pid} ")
  finally:
    _kill(holder)  # kill -9: the lock file still names it
  assert json.loads((workdir / ".lock").read_text())["pid"] == holder.pid
  assert workdir_lock.live_holder(str(workdir)) is None
  capfd.readouterr()
  with workdir_lock.WorkdirLock(str(workdir), mechanism=mechanism) as lock:
    assert lock.record["pid"] == os.getpid()
    err = capfd.readouterr().err
    assert err.count("WARNING") == 1 and f"from pid {holder.pid} on host" in err, err
  assert os.listdir(workdir) == []  # released: the lock file is gone with the job


def test_a_second_trainer_stops_before_writing_anything(tmp_path):
  workdir = tmp_path / "run"
  holder = _hold_in_another_process(workdir)
  try:
    with pytest.raises(workdir_lock.WorkdirLockedError, match=rf"pid {holder.pid} "):
      trainer.train_and_evaluate(runlocal_config("hybrid"), str(workdir))
  finally:
    _kill(holder)
  assert os.listdir(workdir) == [".lock"]  # no config, checkpoint, metric or evaluation file


def test_leases_of_other_hosts_expire(tmp_path, capfd):
  workdir = tmp_path / "run"
  workdir.mkdir()
  record = {"host": "another-host", "pid": 1, "started": "2026-01-01T00:00:00Z",
            "expires": time.time() + 60}
  (workdir / ".lock").write_text(json.dumps(record))
  with pytest.raises(workdir_lock.WorkdirLockedError, match="pid 1 on host another-host"):
    workdir_lock.WorkdirLock(str(workdir), mechanism="lease").acquire()
  (workdir / ".lock").write_text(json.dumps({**record, "expires": time.time() - 1}))
  lock = workdir_lock.WorkdirLock(str(workdir), mechanism="lease", lease_seconds=0.4).acquire()
  assert "taking over the lease" in capfd.readouterr().err
  first_expiry = lock.record["expires"]
  time.sleep(0.5)  # the heartbeat (every lease/4) renews it
  assert json.loads((workdir / ".lock").read_text())["expires"] > first_expiry
  lock.release()
  assert not (workdir / ".lock").exists() and workdir.exists()  # it was not created by us


def test_released_lock_is_free_without_a_warning_and_keeps_the_run_files(tmp_path, capfd):
  workdir = tmp_path / "run"
  with workdir_lock.WorkdirLock(str(workdir)):
    (workdir / "config.json").write_text("{}")
  assert (workdir / ".lock").read_text() == ""  # emptied: a clean exit
  with workdir_lock.WorkdirLock(str(workdir)):
    pass
  assert "WARNING" not in capfd.readouterr().err
  assert sorted(os.listdir(workdir)) == [".lock", "config.json"]
  (tmp_path / "file").write_text("x")
  with pytest.raises(workdir_lock.WorkdirLockedError, match="is a file, not a directory"):
    workdir_lock.WorkdirLock(str(tmp_path / "file")).acquire()
