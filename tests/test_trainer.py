"""End to end on 8 simulated devices: learning, batch-type direction, exact resume, SIGTERM, errors.

All in-process runs share one model/loss/optimizer/mesh, so they share one compiled train step
(train_step.step_functions); only the SIGKILLed run is a subprocess (a real process kill).
"""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
import safetensors.numpy

from hybrid_jax import checkpointing
from hybrid_jax import export
from hybrid_jax import sharding
from hybrid_jax import train_metrics
from hybrid_jax import train_step  # noqa: F401  (named in the docstring)
from hybrid_jax import trainer
from train_helpers import (FEW_OPTIMIZATIONS_VARIABLE, REPO, STEPS, cli_flags,
                           fully_optimized_xla, runlocal_config, xla_flags)

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """mono, xy and hybrid runs of STEPS steps (the hybrid one is the uninterrupted reference).

  Fully optimized: 450 steps cost more to run than to compile; the tests below that train the
  same config in this process reuse the compiled step (and so does the SIGKILLed subprocess's
  resume: that subprocess is fully optimized too, so both halves of its run round alike)."""
  out = {}
  with fully_optimized_xla():
    for batch_type in ("mono", "xy", "hybrid"):
      workdir = str(tmp_path_factory.mktemp(f"run_{batch_type}"))
      out[batch_type] = (workdir, trainer.train_and_evaluate(runlocal_config(batch_type), workdir))
  return out


def test_validation_loss_falls_and_files_are_written(runs):
  workdir, result = runs["hybrid"]
  metrics = result["metrics"]
  start, end = metrics["validation/loss_at_start"], metrics["validation/loss"]
  assert end < 0.5 * start, (start, end)
  assert not result["preempted"] and result["step"] == STEPS
  lines = [json.loads(l) for l in open(os.path.join(workdir, train_metrics.METRICS_FILE))]
  train_lines = [l for l in lines if "loss" in l]
  assert [l["step"] for l in train_lines] == [50, 100, 150]
  for key in ("loss/mono", "loss/xy", "learning_rate", "grad_norm", "param_norm",
              "examples_per_second", "tflops_per_device", "accuracy"):
    assert key in train_lines[-1], key
  assert train_lines[-1]["loss"] < train_lines[0]["loss"]
  assert "mfu" not in train_lines[-1]  # no peak FLOP/s for CPU devices
  validation = [l for l in lines if "validation/loss" in l]
  assert [l["step"] for l in validation] == [0, 50, 100, 150]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))
  for name in ("config.json", "encoder_config.json", "tokenizer/tokenizer.json"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  assert os.path.isfile(os.path.join(workdir, "eval", "synthetic-step150", "results.json"))
  # best = the step with the lowest validation loss; last = the final step.
  best_step = min(validation[1:], key=lambda l: l["validation/loss"])["step"]
  assert checkpointing.load_params(workdir, "best").step == best_step
  last = checkpointing.load_params(workdir, "last")
  assert last.step == STEPS
  assert last.params["encoder"]["layer_0"]["output"]["dense"]["kernel"].dtype == np.float32
  with pytest.raises(checkpointing.CheckpointConfigError, match="no checkpoint at step 7"):
    checkpointing.load_params(workdir, "7")


def test_batch_types_differ_in_the_direction_the_paper_reports(runs):
  summary = {bt: runs[bt][1]["evals"]["synthetic"]["summary"] for bt in runs}
  cross = {bt: s["cross_lingual"]["map"] for bt, s in summary.items()}
  mono = {bt: s["monolingual"]["map"] for bt, s in summary.items()}
  # X-X-mono never sees a cross-lingual pair: with disjoint scripts it stays near chance.
  assert cross["xy"] > cross["mono"] + 0.2, cross
  assert cross["hybrid"] > cross["mono"] + 0.2, cross
  # Hybrid keeps monolingual retrieval where X-Y alone gives some of it up.
  assert mono["hybrid"] >= mono["xy"] - 0.02, mono
  assert mono["mono"] > 0.9, mono


def _export_kernels(workdir, out_dir):
  export.export(workdir, out_dir, "last")
  return safetensors.numpy.load_file(os.path.join(out_dir, "model.safetensors"))


def _wait_for_checkpoint(workdir, step, timeout=300, process=None):
  deadline = time.time() + timeout
  while time.time() < deadline:
    latest = checkpointing.latest_step(workdir)
    if latest is not None and latest >= step:
      return latest
    if process is not None and process.poll() is not None:
      raise AssertionError(f"training process exited early: {process.stderr.read()[-3000:]}")
    time.sleep(0.2)
  raise AssertionError(f"no checkpoint >= {step} in {workdir} after {timeout}s")


def test_sigkill_then_sigterm_then_resume_is_exact(runs, tmp_path):
  reference_dir, _ = runs["hybrid"]
  workdir = str(tmp_path / "interrupted")
  # 1. A separate process, killed with SIGKILL once the step-50 checkpoint is complete.
  optimized = {**os.environ, FEW_OPTIMIZATIONS_VARIABLE: "0"}
  process = subprocess.Popen(cli_flags(workdir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=REPO, env=optimized)
  try:
    _wait_for_checkpoint(workdir, 50, process=process)
  finally:
    process.kill()
    process.wait()
  killed_at = checkpointing.latest_step(workdir)
  assert killed_at is not None and killed_at < STEPS

  # 2. Resume in this process; SIGTERM arrives once a newer checkpoint exists.
  def send_sigterm():
    _wait_for_checkpoint(workdir, killed_at + 1)
    os.kill(os.getpid(), signal.SIGTERM)

  sender = threading.Thread(target=send_sigterm, daemon=True)
  sender.start()
  stopped = trainer.train_and_evaluate(runlocal_config("hybrid"), workdir)
  sender.join(timeout=60)
  assert stopped["preempted"], "SIGTERM did not stop the run"
  assert killed_at < stopped["step"] < STEPS
  assert checkpointing.latest_step(workdir) == stopped["step"]  # saved where it stopped

  # 3. Resume to the end: the parameters equal the uninterrupted run's.
  finished = trainer.train_and_evaluate(runlocal_config("hybrid"), workdir)
  assert finished["step"] == STEPS and not finished["preempted"]
  reference = _export_kernels(reference_dir, str(tmp_path / "export_reference"))
  resumed = _export_kernels(workdir, str(tmp_path / "export_resumed"))
  assert reference.keys() == resumed.keys()
  worst = max(float(np.abs(reference[k] - resumed[k]).max()) for k in reference)
  print(f"resumed vs uninterrupted: max |diff| {worst:.3g} over {len(reference)} tensors")
  assert worst <= 1e-6, worst
  # The training itself moved the weights (so the comparison is not vacuous).
  start = checkpointing.load_params(reference_dir, "50").params
  assert float(np.abs(start["encoder"]["layer_0"]["output"]["dense"]["kernel"]
                      - reference["encoder.layer.0.output.dense.weight"].T).max()) > 1e-3
  # The metrics file of the interrupted run ends with the same steps as the reference's.
  steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, train_metrics.METRICS_FILE))
           if "loss" in json.loads(l)]
  assert steps[-1] == STEPS and steps == sorted(steps)


_HOST_PROGRAM = """
import json, os, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process_id, port, workdir, tests_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
overrides = json.loads(sys.argv[5])
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                           process_id=process_id)
sys.path.insert(0, tests_dir)
import train_helpers
from hybrid_jax import trainer
result = trainer.train_and_evaluate(
    train_helpers.runlocal_config("hybrid", **overrides), workdir)
summary = result["evals"].get("synthetic", {}).get("summary")
print(json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
                  "step": result["step"], "preempted": result["preempted"], "map": summary}))
"""


# Shorter than STEPS (each step is a gloo all-reduce between two processes on two cores), with a
# checkpoint every 10 steps so that the SIGTERM comes early (the hosts stop 3-8 steps after it,
# measured) and the resume does the rest.
TWO_HOST_STEPS = 30
TWO_HOST_RUN = {"train.num_steps": TWO_HOST_STEPS, "train.checkpoint_every_steps": 10,
                "train.log_every_steps": 10, "train.eval_every_steps": TWO_HOST_STEPS}


def _start_hosts(workdir):
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = str(probe.getsockname()[1])
  env = {**os.environ, "XLA_FLAGS": xla_flags(4)}
  overrides = json.dumps({**TWO_HOST_RUN, "train.shared_filesystem": True})
  return [subprocess.Popen([sys.executable, "-c", _HOST_PROGRAM, str(i), port, workdir,
                            os.path.join(REPO, "tests"), overrides], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
          for i in range(2)]


def _finish_hosts(hosts):
  outputs = []
  for host in hosts:
    try:
      out, err = host.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for h in hosts:
        h.kill()
      raise
    assert host.returncode == 0, err[-4000:]
    outputs.append(json.loads(out.strip().splitlines()[-1]))
  assert [o["process"] for o in outputs] == [0, 1] and all(o["devices"] == 8 for o in outputs)
  return outputs


def test_two_hosts_preempted_and_resumed_train_like_one(tmp_path):
  """2 processes x 4 CPU devices (gloo collectives, one shared workdir) = 1 process x 8 devices,
  through a SIGTERM to both hosts (a TPU maintenance event) and a resume.

  This is the TPU-pod path: each host feeds its slice of the plan, Orbax saves from all hosts,
  JAX's preemption sync makes every host stop at the same step, evaluation runs on every host."""
  workdir = str(tmp_path / "two_hosts")
  hosts = _start_hosts(workdir)
  try:
    _wait_for_checkpoint(workdir, 10, process=hosts[0])
  finally:
    for host in hosts:
      host.send_signal(signal.SIGTERM)
  stopped = _finish_hosts(hosts)
  assert all(o["preempted"] for o in stopped), stopped
  stop_step = stopped[0]["step"]
  assert stopped[1]["step"] == stop_step and 10 <= stop_step < TWO_HOST_STEPS
  assert checkpointing.latest_step(workdir) == stop_step  # saved where both stopped

  hosts = _start_hosts(workdir)  # the same command again: resume
  # The uninterrupted reference: this process, 8 devices, while the hosts start up.
  reference_dir = str(tmp_path / "reference")
  reference = trainer.train_and_evaluate(runlocal_config("hybrid", **TWO_HOST_RUN), reference_dir)
  finished = _finish_hosts(hosts)
  assert all(o["step"] == TWO_HOST_STEPS and not o["preempted"] for o in finished)
  expected = reference["evals"]["synthetic"]["summary"]
  for o in finished:
    for setting in ("monolingual", "cross_lingual", "multilingual"):
      assert abs(o["map"][setting]["map"] - expected[setting]["map"]) <= 1e-4, (setting, o)
  reference_weights = _export_kernels(reference_dir, str(tmp_path / "export_reference"))
  two_host_weights = _export_kernels(workdir, str(tmp_path / "export_two_hosts"))
  worst = max(float(np.abs(reference_weights[k] - two_host_weights[k]).max())
              for k in reference_weights)
  print(f"2 hosts x 4 devices, SIGTERM at step {stop_step} + resume, vs 1 host x 8 devices "
        f"uninterrupted, after {TWO_HOST_STEPS} steps: max |diff| {worst:.3g}")
  assert worst <= 1e-5, worst


def test_export_loads_in_pytorch_with_the_same_embeddings(runs, tmp_path):
  import torch  # pylint: disable=g-import-not-at-top  (a [test] dependency)
  import transformers  # pylint: disable=g-import-not-at-top
  from hybrid_jax.models import inference  # pylint: disable=g-import-not-at-top

  workdir, _ = runs["xy"]
  out = str(tmp_path / "hf")
  export.export(workdir, out, "best")
  model = transformers.AutoModel.from_pretrained(out).eval()
  loaded = checkpointing.load_params(workdir, "best")
  texts = ["Passage: " + t for t in ("abc", "def ghi")]
  ours = inference.TextEmbedder.from_params(loaded, batch_size=8, max_length=16).embed(texts)
  batch = loaded.tokenizer.encode(texts, max_length=16)
  with torch.no_grad():
    hidden = model(input_ids=torch.tensor(batch.input_ids),
                   attention_mask=torch.tensor(batch.attention_mask)).last_hidden_state.numpy()
  mask = batch.attention_mask[..., None]
  pooled = (hidden * mask).sum(1) / mask.sum(1)
  theirs = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
  assert float(np.abs(ours - theirs).max()) <= 1e-4


@pytest.mark.parametrize("changes,error,message", [
    ({"train.batch_size": 12}, sharding.ShardingConfigError, "not divisible by the 8 devices"),
    ({"data.batch_type": "hybird"}, trainer.TrainConfigError, "not a batch type"),
    ({"model.init_from": "/no/such/model"}, checkpointing.CheckpointConfigError,
     "does not exist"),
    ({"train.gradcache_chunk_size": 5, "data.packing": False}, trainer.TrainConfigError,
     "does not divide"),
    ({"train.gradcache_chunk_size": 16, "data.packing_rows": 40}, trainer.TrainConfigError,
     "does not divide data.packing_rows=40"),
    ({"train.warmup_steps": 10_000}, trainer.TrainConfigError, "warmup_steps"),
    ({"model.dtype": "float8"}, trainer.TrainConfigError, "model.dtype"),
    ({"train.in_batch_negatives": False}, ValueError, "no negatives"),
])
def test_bad_configs_fail_before_anything_runs(tmp_path, changes, error, message):
  workdir = str(tmp_path / "run")
  config = runlocal_config("hybrid")
  for dotted, value in changes.items():
    section, field = dotted.split(".")
    config[section][field] = value
  with pytest.raises(error, match=message):
    trainer.train_and_evaluate(config, workdir)
  assert not os.path.exists(workdir)  # raised before any file, data or compile


def test_local_workdir_with_several_processes_is_rejected():
  with pytest.raises(checkpointing.CheckpointConfigError, match="gs://"):
    trainer.validate_config(runlocal_config("hybrid"), "/tmp/run", process_count=2)
  trainer.validate_config(runlocal_config("hybrid"), "gs://bucket/run", process_count=2)  # fine
  config = runlocal_config("hybrid")
  config.train.shared_filesystem = True
  trainer.validate_config(config, "/nfs/run", process_count=2)


def test_me5_config_without_converted_model_says_how_to_get_it(tmp_path, monkeypatch):
  monkeypatch.setenv("HYBRID_JAX_MODELS", str(tmp_path / "models"))
  spec = importlib.util.spec_from_file_location("me5", os.path.join(REPO, "configs",
                                                                    "me5_hybrid.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("batch_size=96")  # the paper's 100 does not split over 8 devices
  assert config.model.init_from == str(tmp_path / "models" / "multilingual-e5-small")
  with pytest.raises(checkpointing.CheckpointConfigError, match="hybrid_jax.models.e5_convert"):
    trainer.validate_config(config, str(tmp_path / "run"))


def test_init_from_a_hugging_face_directory(runs, tmp_path):
  """A run initialised from the reference run's export starts at the reference's final validation
  loss (same weights, same validation batches); SIGTERM right after step 0 keeps it short."""
  reference_dir, reference = runs["hybrid"]
  hf_dir = str(tmp_path / "hf")
  export.export(reference_dir, hf_dir, "last")
  workdir = str(tmp_path / "finetune")
  metrics_path = os.path.join(workdir, train_metrics.METRICS_FILE)

  def send_sigterm_after_step0_validation():
    deadline = time.time() + 300
    while time.time() < deadline:
      if os.path.exists(metrics_path) and "validation/loss" in open(metrics_path).read():
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.05)

  sender = threading.Thread(target=send_sigterm_after_step0_validation, daemon=True)
  sender.start()
  result = trainer.train_and_evaluate(runlocal_config("hybrid", **{"model.init_from": hf_dir}), workdir)
  sender.join(timeout=60)
  # The signal lands within the first steps (the thread races the loop); the run stops there.
  assert result["preempted"] and 1 <= result["step"] < 10
  assert checkpointing.latest_step(workdir) == result["step"]
  start = result["metrics"]["validation/loss_at_start"]
  assert abs(start - reference["metrics"]["validation/loss"]) <= 1e-5, (
      start, reference["metrics"]["validation/loss"])


def test_evaluate_cli_scores_a_runlocal_workdir_like_the_trainer(runs, tmp_path):
  from hybrid_jax.eval import runner  # pylint: disable=g-import-not-at-top
  workdir, result = runs["xy"]
  # The synthetic spec and the prefixes come from the run's own config.json.
  results = runner.run(runner.RunOptions(dataset="synthetic", workdir=workdir, step="last",
                                         output_dir=str(tmp_path / "eval"), show_progress=False))
  trained = result["evals"]["synthetic"]["summary"]
  for setting in ("monolingual", "cross_lingual", "multilingual"):
    assert abs(results["summary"][setting]["map"] - trained[setting]["map"]) <= 1e-5, setting
  assert os.path.isfile(tmp_path / "eval" / "results.json")


def test_nan_loss_stops_with_the_steps_and_the_plan_command(tmp_path):
  # An infinite learning rate turns the parameters into NaN/inf after the first update.
  config = runlocal_config("hybrid", **{"train.learning_rate": float("inf"), "train.num_steps": 20,
                                "train.warmup_steps": 2, "train.log_every_steps": 10,
                                "train.eval_every_steps": 0, "train.checkpoint_every_steps": 10})
  config.evals = {}
  with pytest.raises(trainer.TrainingDivergedError,
                     match=r"NaN or inf between steps 1 and 10 .*hybrid_jax\.data\.plan "
                           r"--start=0 --steps=10"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.real_data
def test_real_data_run_trains_on_mlqa_r_and_evaluates_on_xquad_r(tmp_path):
  """The full configs' path on the real LAReQA files: the e5 tokenizer, MLQA-R batches, the
  XQuAD-R grid at the end; only the encoder is shrunk (and 3 of the languages kept)."""
  import shutil  # pylint: disable=g-import-not-at-top
  from hybrid_jax.data import lareqa  # pylint: disable=g-import-not-at-top
  from hybrid_jax.models import e5_convert  # pylint: disable=g-import-not-at-top
  tokenizer_dir = tmp_path / "e5_tokenizer"
  tokenizer_dir.mkdir()
  shutil.copy(e5_convert.source_paths()[1], tokenizer_dir / "tokenizer.json")

  path = os.path.join(REPO, "configs", "xlmr_hybrid.py")
  spec = importlib.util.spec_from_file_location("config_real", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert (config.data.source, config.data.path, sorted(config.evals)) == (
      "lareqa", "mlqa-r", ["xquad_r"])
  config.model.update(tokenizer=str(tokenizer_dir), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, dtype="float32")
  config.data.update(languages=("en", "de", "es"), query_max_length=32, passage_max_length=48,
                     validation_batches=2)
  # FSDP over the 8 devices: e5's 250k-row embedding table dominates the step, and sharding it
  # (as a pod run would) spends 1/8 of the optimizer update per device.
  config.mesh = (("data", 1), ("fsdp", 8))
  config.train.update(batch_size=32, num_steps=40, warmup_steps=4, learning_rate=1e-3,
                      log_every_steps=20, eval_every_steps=40, checkpoint_every_steps=40)
  config.evals.xquad_r.languages = ("en", "de", "el")
  config.evals.xquad_r.every_steps = 0
  with fully_optimized_xla():  # the XQuAD-R grid's scoring runs 4x slower at LLVM level 0
    result = trainer.train_and_evaluate(config, str(tmp_path / "run"))

  metrics = result["metrics"]
  assert result["step"] == 40 and np.isfinite(metrics["loss"])
  assert metrics["validation/loss"] < metrics["validation/loss_at_start"], metrics
  xquad = result["evals"]["xquad_r"]
  # 1190 questions per language; 3 mono settings, 6 cross-lingual ones.
  assert xquad["summary"]["monolingual"]["num_queries"] == 3 * 1190
  assert xquad["summary"]["cross_lingual"]["num_settings"] == 6
  assert 0.0 < xquad["summary"]["monolingual"]["map"] < 1.0
  # "unseen" is derived: el is evaluated but not trained on (en, de, es are).
  mono = xquad["summary"]["monolingual"]
  assert mono["unseen/num_settings"] == 1
  el_to_el = [s for s in xquad["settings"] if (s["query_lang"], s["candidate_lang"]) == ("el", "el")]
  assert mono["unseen/map"] == pytest.approx(el_to_el[0]["map"])
  assert checkpointing.read_training_languages(str(tmp_path / "run")) == ("en", "de", "es")


def test_non_default_prefixes_reach_training_evaluation_and_evaluate_workdir(tmp_path,
                                                                            monkeypatch):
  """The run's config.data prefixes are the only ones used: on the training queries and
  passages, on the periodic evaluator's queries and candidates, and by `evaluate --workdir`."""
  from hybrid_jax.data import tokenization  # pylint: disable=g-import-not-at-top
  from hybrid_jax.eval import periodic  # pylint: disable=g-import-not-at-top
  from hybrid_jax.eval import runner  # pylint: disable=g-import-not-at-top
  prefixes = {"query": "QQ> ", "passage": "PP> "}
  calls = []  # (phase, prefix, texts)
  phase = ["train"]
  token_ids = tokenization.Tokenizer.token_ids

  def recording_token_ids(self, texts, max_length, prefix=""):
    calls.append((phase[0], prefix, list(texts)))
    return token_ids(self, texts, max_length, prefix)

  run_evaluation = periodic.PeriodicEvaluation.run

  def marked_run(self, *args, **kwargs):
    phase[0] = "periodic"
    try:
      return run_evaluation(self, *args, **kwargs)
    finally:
      phase[0] = "train"

  monkeypatch.setattr(tokenization.Tokenizer, "token_ids", recording_token_ids)
  monkeypatch.setattr(periodic.PeriodicEvaluation, "run", marked_run)
  config = runlocal_config("hybrid", **{
      "train.num_steps": 20, "train.warmup_steps": 2, "train.log_every_steps": 10,
      "data.query_prefix": prefixes["query"], "data.passage_prefix": prefixes["passage"]})
  workdir = str(tmp_path / "run")
  result = trainer.train_and_evaluate(config, workdir)
  phase[0] = "evaluate --workdir"
  scored = runner.run(runner.RunOptions(dataset="synthetic", workdir=workdir, step="last",
                                        output_dir=str(tmp_path / "eval"), show_progress=False))

  from hybrid_jax.eval import evaluators  # pylint: disable=g-import-not-at-top
  collection = evaluators.build_evaluator(
      "synthetic", periodic.evaluator_specs(config)["synthetic"]).collection
  for name in ("train", "periodic", "evaluate --workdir"):
    used = {}
    for call_phase, prefix, texts in calls:
      if call_phase == name:
        used.setdefault(prefix, set()).update(texts)
    assert set(used) == set(prefixes.values()), (name, sorted(used))
    assert min(len(texts) for texts in used.values()) >= 100, name
    if name != "train":  # queries with the query prefix, candidates with the passage prefix
      assert used[prefixes["query"]] == set(collection.query_texts), name
      assert used[prefixes["passage"]] == set(collection.candidate_texts), name
  # evaluate --workdir scores exactly what the trainer scored (same prefixes, same params).
  for setting in ("monolingual", "cross_lingual", "multilingual"):
    assert abs(scored["summary"][setting]["map"]
               - result["evals"]["synthetic"]["summary"][setting]["map"]) <= 1e-5, setting
