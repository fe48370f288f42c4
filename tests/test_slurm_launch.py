"""launch/slurm.sh against fake `sbatch`, `srun`, `scontrol` and `scancel` on PATH (no cluster).

What matters on a SLURM GPU cluster: the job asks for N nodes x G GPUs with one task per node and
--requeue; the batch script's srun starts `python -m hybrid_jax.train --distributed` with the flags
intact; the SLURM variables jax.distributed.initialize() reads reach every trainer process, which
then forms one JAX cluster (tested for real: 2 processes over localhost) seeing all G GPUs of its
node; the time-limit signal makes the trainer checkpoint (SIGTERM) before `scontrol requeue`, and
a preemption SIGTERM is passed on without requeueing twice.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "slurm.sh")
JOB_ID_PORT_BASE = 65536 - 4096  # jax's SlurmCluster: port = job id % 4096 + this

# Records every call of the fake cluster tools, one JSON line each.
_FAKE_TOOL = """#!{python}
import json, sys, time
argv = sys.argv[1:]
record = {{"tool": {tool!r}, "argv": argv, "time": time.time()}}
if {tool!r} == "sbatch":
  record["script"] = open(argv[-1]).read()
  print("Submitted batch job 4242")
with open({log!r}, "a") as f:
  f.write(json.dumps(record) + "\\n")
"""

# srun: one task per node, all on this machine, with the variables SLURM gives each task; writes
# each task's output to --output (%x job name, %j job id, %t rank) and forwards SIGTERM, as srun.
_FAKE_SRUN = """#!{python}
import json, os, signal, subprocess, sys
argv = sys.argv[1:]
with open({log!r}, "a") as f:
  f.write(json.dumps({{"tool": "srun", "argv": argv}}) + "\\n")
options, i = {{}}, 0
while argv[i].startswith("--"):
  key, _, value = argv[i][2:].partition("=")
  options[key] = value
  i += 1
tasks = int(options["ntasks"])
children = []
for rank in range(tasks):
  env = dict(os.environ, SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(tasks),
             SLURM_PROCID=str(rank), SLURM_LOCALID="0", SLURM_NODEID=str(rank),
             SLURM_STEP_NUM_NODES=options["nodes"])
  out = (options["output"].replace("%x", os.environ["SLURM_JOB_NAME"])
         .replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", str(rank)))
  children.append(subprocess.Popen(argv[i:], env=env, stdout=open(out, "a"),
                                   stderr=subprocess.STDOUT))
signal.signal(signal.SIGTERM, lambda *_: [c.send_signal(signal.SIGTERM) for c in children])
sys.exit(max(c.wait() for c in children))
"""

# The "python" of the job: records what reached it, then either runs the trainer's start-up for
# real (hybrid_jax.train's flags and start_process: jax.distributed.initialize() from the SLURM
# variables) or waits for SIGTERM (PROBE_MODE=wait).
_PROBE = """
import json, os, signal, sys, time
args = sys.argv[1:]
rank = os.environ["SLURM_PROCID"]
record = {"args": args, "cwd": os.getcwd(),
          "env": {k: os.environ.get(k) for k in (
              "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID", "JAX_LOCAL_DEVICE_IDS", "HYBRID_JAX_DATA")}}

def write(suffix):
  with open(os.path.join(os.environ["PROBE_OUT"], f"rank{rank}.{suffix}"), "w") as f:
    json.dump(record, f)

if os.environ.get("PROBE_MODE") == "wait":
  def on_term(signum, frame):
    record["signal"] = "SIGTERM"
    write("stopped")
    sys.exit(0)
  signal.signal(signal.SIGTERM, on_term)
  write("started")
  time.sleep(120)
  sys.exit(1)

assert args[:2] == ["-m", "hybrid_jax.train"], args
sys.path.insert(0, os.getcwd())
from absl import flags
from hybrid_jax import train
flags.FLAGS(["hybrid_jax.train"] + args[2:])
train.start_process(["hybrid_jax.train"])
import jax
record.update(process_index=jax.process_index(), process_count=jax.process_count(),
              device_count=jax.device_count(), local_device_count=jax.local_device_count(),
              cuda_visible_devices=jax.config.values["jax_cuda_visible_devices"],
              shared_filesystem=train.CONFIG.value.train.shared_filesystem)
write("json")
"""


def _free_job_id() -> int:
  """A job id whose SlurmCluster coordinator port is free on this machine."""
  for port in range(JOB_ID_PORT_BASE + 1000, 65536):
    with socket.socket() as probe:
      try:
        probe.bind(("", port))
      except OSError:
        continue
    return 4096 * 7 + port - JOB_ID_PORT_BASE
  raise AssertionError("no free port in jax's SLURM port range")


@pytest.fixture()
def cluster(tmp_path):
  """Fake tools on PATH; `launch(*args, **env)` runs slurm.sh, `calls()` reads what they got."""
  bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
  bin_dir.mkdir()
  for tool in ("sbatch", "scontrol", "scancel"):
    (bin_dir / tool).write_text(_FAKE_TOOL.format(python=sys.executable, tool=tool, log=str(log)))
  (bin_dir / "srun").write_text(_FAKE_SRUN.format(python=sys.executable, log=str(log)))
  probe = tmp_path / "probe.py"
  probe.write_text(_PROBE)
  (bin_dir / "python").write_text(f"#!/bin/sh\nexec {sys.executable} {probe} \"$@\"\n")
  for tool in bin_dir.iterdir():
    tool.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG_DIR=str(tmp_path / "logs"),
             PYTHON=str(bin_dir / "python"), PROBE_OUT=str(tmp_path))

  def launch(*args, **extra):
    return subprocess.run(["bash", SCRIPT, *args],
                          env=dict(env, **{k: str(v) for k, v in extra.items()}),
                          capture_output=True, text=True, check=False, timeout=60)

  def calls(tool=None):
    lines = [json.loads(l) for l in log.read_text().splitlines()] if log.exists() else []
    return [c for c in lines if tool is None or c["tool"] == tool]

  def run_batch_script(script, job_id, **extra):
    """Starts the batch script as SLURM's batch step would (not waiting for it)."""
    return subprocess.Popen(["bash", script], env=dict(
        env, SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="hybrid-jax", **extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

  return launch, calls, run_batch_script, tmp_path


def _srun_line(script_text: str) -> list[str]:
  line = next(l for l in script_text.splitlines() if l.startswith("srun "))
  return shlex.split(line.rstrip("&").replace("${restart}", "0"))


TRAIN_ARGS = ("configs/xlmr_hybrid.py:runlocal,alpha=0.3", "/nfs/runs/run 1",
              "--config.train.learning_rate=1e-5")


def test_dry_run_prints_the_exact_sbatch_and_srun_lines_and_submits_nothing(cluster):
  launch, calls, _, tmp_path = cluster
  result = launch("--dry-run", "train", *TRAIN_ARGS, NODES=2, GPUS_PER_NODE=4, PARTITION="gpu",
                  TIME="02:00:00", CHECKPOINT_SECONDS=240)
  assert result.returncode == 0, result.stderr
  assert not calls() and not (tmp_path / "logs").exists()  # nothing submitted or written
  sbatch_line, script_name = result.stdout.splitlines()[:2]
  logs = tmp_path / "logs"
  assert shlex.split(sbatch_line) == [
      "sbatch", "--job-name=hybrid-jax", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4",
      "--cpus-per-task=16", "--time=02:00:00", "--requeue", "--signal=B:USR1@240",
      "--open-mode=append", f"--output={logs}/%x-%j.out", "--partition=gpu",
      f"{logs}/hybrid-jax-train.sbatch"]
  assert script_name == f"# {logs}/hybrid-jax-train.sbatch:"
  srun = _srun_line(result.stdout)
  assert srun[:8] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                      "--gpus-per-node=4", "--cpus-per-task=16", "--kill-on-bad-exit=1",
                      f"--output={logs}/%x-%j-restart0-rank%t.log"]
  # The trainer command, flags intact; two nodes share the workdir's filesystem.
  assert srun[8:] == [str(tmp_path / "bin" / "python"), "-m", "hybrid_jax.train", "--distributed",
                      f"--config={TRAIN_ARGS[0]}", f"--workdir={TRAIN_ARGS[1]}",
                      "--config.train.shared_filesystem=True", TRAIN_ARGS[2]]
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in result.stdout
  assert 'scontrol requeue "${SLURM_JOB_ID}"' in result.stdout
  # One node, or a gs:// workdir, needs no shared-filesystem override.
  for env, workdir in (({"NODES": 1}, "/local/run"), ({"NODES": 2}, "gs://b/run")):
    out = launch("--dry-run", "train", TRAIN_ARGS[0], workdir, **env).stdout
    assert "shared_filesystem" not in " ".join(_srun_line(out))


def test_submitted_job_reaches_every_trainer_with_the_slurm_environment_jax_reads(cluster):
  launch, calls, run_batch_script, tmp_path = cluster
  result = launch("train", "configs/xlmr_hybrid.py:runlocal", str(tmp_path / "run"),
                  "--config.train.num_steps=7", NODES=2, GPUS_PER_NODE=4,
                  HYBRID_JAX_DATA="/data/shared")
  assert result.returncode == 0, result.stderr
  assert "Submitted batch job 4242" in result.stdout
  (submitted,) = calls("sbatch")
  dry = launch("--dry-run", "train", "configs/xlmr_hybrid.py:runlocal", str(tmp_path / "run"),
               "--config.train.num_steps=7", NODES=2, GPUS_PER_NODE=4,
               HYBRID_JAX_DATA="/data/shared")
  assert ["sbatch"] + submitted["argv"] == shlex.split(dry.stdout.splitlines()[0])
  script = submitted["argv"][-1]

  job_id = _free_job_id()
  batch = run_batch_script(script, job_id)
  out, err = batch.communicate(timeout=240)
  logs = sorted((tmp_path / "logs").glob("*.log"))
  assert batch.returncode == 0, (err[-2000:], [log.read_text()[-2000:] for log in logs])
  ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
  for rank, got in enumerate(ranks):
    assert got["env"] == {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost",
                          "SLURM_NTASKS": "2", "SLURM_PROCID": str(rank), "SLURM_LOCALID": "0",
                          "JAX_LOCAL_DEVICE_IDS": "0,1,2,3", "HYBRID_JAX_DATA": "/data/shared"}
    assert got["args"][:3] == ["-m", "hybrid_jax.train", "--distributed"]
    assert got["cwd"] == REPO
    # jax.distributed.initialize() built one cluster of both processes from those variables.
    assert (got["process_index"], got["process_count"]) == (rank, 2)
    assert got["device_count"] == 2 * got["local_device_count"]
    # ... and every process keeps all GPUs of its node (JAX's SLURM default would be [LOCALID]).
    assert got["cuda_visible_devices"] == "0,1,2,3"
    assert got["shared_filesystem"] is True
    log = tmp_path / "logs" / f"hybrid-jax-{job_id}-restart0-rank{rank}.log"
    assert log.exists()  # one log per rank (and restart)
  assert not calls("scontrol")  # finished normally: no requeue


@pytest.mark.parametrize("signal_to_batch,requeued", [(signal.SIGUSR1, True),
                                                      (signal.SIGTERM, False)],
                         ids=["time-limit", "preemption"])
def test_time_limit_checkpoints_then_requeues_and_preemption_passes_sigterm_on(
    cluster, signal_to_batch, requeued):
  launch, calls, run_batch_script, tmp_path = cluster
  assert launch("train", "configs/xlmr_hybrid.py", "/nfs/run", NODES=2).returncode == 0
  script = calls("sbatch")[0]["argv"][-1]
  batch = run_batch_script(script, 1234, PROBE_MODE="wait")
  deadline = time.time() + 60
  while not all((tmp_path / f"rank{r}.started").exists() for r in (0, 1)):
    assert time.time() < deadline and batch.poll() is None, batch.stderr.read()
    time.sleep(0.1)
  batch.send_signal(signal_to_batch)
  out, err = batch.communicate(timeout=60)
  assert batch.returncode == 0, (out, err)
  # Both trainers got SIGTERM (on which they checkpoint) and had exited before any requeue.
  stopped = [tmp_path / f"rank{rank}.stopped" for rank in (0, 1)]
  assert all(json.loads(path.read_text())["signal"] == "SIGTERM" for path in stopped)
  requeues = calls("scontrol")
  assert [c["argv"] for c in requeues] == ([["requeue", "1234"]] if requeued else [])
  assert all(c["time"] >= max(path.stat().st_mtime for path in stopped) for c in requeues)


def test_stop_setup_and_errors(cluster):
  launch, calls, _, _ = cluster
  assert launch("stop", "77").returncode == 0
  assert [c["argv"] for c in calls("scancel")] == [["--signal=TERM", "77"]]
  result = launch("--dry-run", "setup", PYTHON="/venv/bin/python")
  assert shlex.split(result.stdout) == ["/venv/bin/python", "-m", "pip", "install", "-e",
                                        f"{REPO}[cuda]"]
  result = launch("frobnicate")
  assert result.returncode == 2 and "unknown command 'frobnicate'" in result.stderr
  result = launch("train", "configs/xlmr_hybrid.py")
  assert result.returncode != 0 and "usage: launch/slurm.sh train" in result.stderr
  result = launch("train", "c.py", "/w", GPUS_PER_NODE="eight")
  assert result.returncode == 2 and "GPUS_PER_NODE=eight: expected a positive integer" in (
      result.stderr)
  assert not calls("sbatch")
