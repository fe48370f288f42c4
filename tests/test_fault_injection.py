"""SIGKILL at seeded random moments, each followed by the same command: the run ends exactly where
an uninterrupted one does (parameters, metrics.jsonl, evaluation).

Every run is a process on ONE CPU device: a kill needs a real process, and the persistent
compilation cache (shared by the runs) is only used with one device here, where no collective can
be left waiting (8 simulated devices + cached executables hit XLA's CPU rendezvous timeout on this
2-core machine). The uninterrupted reference and the final re-run are the `python -m
hybrid_jax.train` command itself; the ten killed attempts run the same module with the same
arguments in processes forked from a multiprocessing forkserver that has imported jax,
TensorFlow and the trainer once (train_helpers.run_module_as_main): each attempt then skips
~5 s of imports (of ~8 s to its first checkpoint), and its kill lands in the restore, compile,
train and checkpoint-writing work this test is about. Checkpoints and log lines come every 3
steps, so that every resume starts on a logging boundary and the interval means match.
"""

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np

from hybrid_jax import checkpointing
from hybrid_jax import train_metrics
from train_helpers import REPO, run_module_as_main, xla_flags

STEPS = 45
EVERY = 3  # checkpoint_every_steps == log_every_steps
OVERRIDES = {
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 1,
    "train.num_steps": STEPS, "train.warmup_steps": 6, "train.log_every_steps": EVERY,
    "train.eval_every_steps": 15, "train.checkpoint_every_steps": EVERY,
    "train.keep_checkpoints": 2, "data.validation_batches": 2,
}
KILLS = 10
# Fields that measure the machine, not the training; everything else must match exactly.
_TIMING = ("steps_per_second", "examples_per_second", "tflops_per_device", "mfu")


# What the killed attempts' forkserver imports once (not hybrid_jax.train itself: its absl flags
# are defined when the attempt runs it as __main__).
PRELOADED = ["numpy", "jax", "tensorflow", "orbax.checkpoint", "hybrid_jax.trainer"]


def _arguments(workdir):
  return ([f"--config={os.path.join(REPO, 'configs', 'xlmr_hybrid.py')}:runlocal",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()])


def _command(workdir):
  return [sys.executable, "-m", "hybrid_jax.train", *_arguments(workdir)]


def _env(tmp_path):
  env = {**os.environ, "XLA_FLAGS": xla_flags(1)}
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla_cache"))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
  return env


def _start(workdir, env, log_path):
  log = open(log_path, "w")
  return subprocess.Popen(_command(workdir), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                          env=env), log


def _forkserver(env, monkeypatch):
  """A forkserver context whose server (started by the first attempt, with this environment:
  it is the only forkserver the tests use) has PRELOADED imported."""
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.chdir(REPO)
  context = multiprocessing.get_context("forkserver")
  context.set_forkserver_preload(PRELOADED)
  return context


def _start_forked(context, workdir, log_path):
  process = context.Process(target=run_module_as_main,
                            args=("hybrid_jax.train", _arguments(workdir), str(log_path)))
  process.start()
  return process


def _temporary_dirs(workdir):
  """Orbax writes a checkpoint into <step>.orbax-checkpoint-tmp... and renames it when done."""
  found = set()
  for sub in (checkpointing.CHECKPOINT_DIR, checkpointing.BEST_DIR):
    directory = os.path.join(workdir, sub)
    if os.path.isdir(directory):
      found |= {f"{sub}/{n}" for n in os.listdir(directory) if ".orbax-checkpoint-tmp" in n}
  return found


def _async_write_in_progress(workdir, left_before):
  """A temporary directory this process made (not one a killed process left behind)."""
  return bool(_temporary_dirs(workdir) - left_before)


def _kill_at(process, workdir, moment, rng, deadline=240):
  """SIGKILLs `process` at `moment`; returns what was happening then ("finished" if it ended)."""
  started = time.time()
  first = checkpointing.latest_step(workdir) or 0
  left_before = _temporary_dirs(workdir)
  delay = float(rng.uniform(0.0, 0.4))
  seen_new_checkpoint = None
  while time.time() - started < deadline:
    if not process.is_alive():
      return "finished"
    if moment == "startup" and time.time() - started >= delay * 5:  # 0-2 s: restore, compile
      break
    if moment == "async_write" and _async_write_in_progress(workdir, left_before):
      break
    if moment == "between_steps":
      if seen_new_checkpoint is None and (checkpointing.latest_step(workdir) or 0) > first:
        seen_new_checkpoint = time.time()
      if seen_new_checkpoint is not None and time.time() - seen_new_checkpoint >= delay:
        break
    time.sleep(0.002)
  was_writing = _async_write_in_progress(workdir, left_before)
  os.kill(process.pid, signal.SIGKILL)
  process.join()
  return "async_write" if was_writing else moment


def _deterministic_metrics(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, train_metrics.METRICS_FILE))]
  return [{k: v for k, v in line.items() if k not in _TIMING} for line in lines]


def _final_evaluation(workdir):
  with open(os.path.join(workdir, "eval", f"synthetic-step{STEPS}", "results.json")) as f:
    results = json.load(f)
  return {k: results[k] for k in ("summary", "settings", "multilingual_by_lang")}


def _final_params(workdir):
  return checkpointing.load_params(workdir, "last").params


def test_sigkill_at_random_moments_then_rerun_ends_like_an_uninterrupted_run(tmp_path,
                                                                           monkeypatch):
  env = _env(tmp_path)
  reference_dir = str(tmp_path / "reference")
  process, log = _start(reference_dir, env, tmp_path / "reference.log")
  assert process.wait(timeout=600) == 0, open(tmp_path / "reference.log").read()[-3000:]
  log.close()

  workdir = str(tmp_path / "killed")
  rng = np.random.default_rng(23)
  # At least 4 kills land while Orbax is writing asynchronously; the rest at random moments.
  moments = ["async_write"] * 4 + list(rng.choice(["startup", "between_steps", "async_write"], 6))
  rng.shuffle(moments)
  happened = []
  context = _forkserver(env, monkeypatch)
  for i, moment in enumerate(moments):
    process = _start_forked(context, workdir, tmp_path / f"attempt{i}.log")
    what = str(_kill_at(process, workdir, moment, rng))
    assert process.exitcode in (-signal.SIGKILL, 0), (  # a crash, not a kill or the end
        process.exitcode, open(tmp_path / f"attempt{i}.log").read()[-3000:])
    happened.append((what, checkpointing.latest_step(workdir)))
  assert sum(h == "async_write" for h, _ in happened) >= 4, happened
  assert sum(h != "finished" for h, _ in happened) >= KILLS, happened

  process, log = _start(workdir, env, tmp_path / "final.log")  # the same command, once more
  assert process.wait(timeout=600) == 0, open(tmp_path / "final.log").read()[-3000:]
  log.close()
  print(f"kills (what was happening, latest checkpoint after it): {happened}")
  logs = "".join(open(tmp_path / f"attempt{i}.log").read() for i in range(1, len(moments)))
  assert "taking over the lock" in logs + open(tmp_path / "final.log").read()  # kill -9, re-run
  assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if ".corrupt-" in n]
  assert not _temporary_dirs(workdir)  # what the killed writes left is cleaned up on reopening

  reference, resumed = _final_params(reference_dir), _final_params(workdir)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(reference)[0],
                          jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b, err_msg=str(path))
  assert _deterministic_metrics(workdir) == _deterministic_metrics(reference_dir)
  assert _final_evaluation(workdir) == _final_evaluation(reference_dir)
  steps = [l["step"] for l in _deterministic_metrics(workdir) if "loss" in l]
  assert steps == list(range(EVERY, STEPS + 1, EVERY))
  assert re.search(r"done at step 45", open(tmp_path / "final.log").read())


def test_a_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
  path = tmp_path / train_metrics.METRICS_FILE
  path.write_text('{"step": 3, "loss": 1.5}\n{"step": 6, "validation/loss": 2.5}\n{"step": 9, "lo')
  assert train_metrics.logged_validation(str(tmp_path))["validation/loss"] == 2.5
  train_metrics.JsonlWriter(str(tmp_path), resume_step=6)
  assert path.read_text() == '{"step": 3, "loss": 1.5}\n{"step": 6, "validation/loss": 2.5}\n'
