"""Shared by the trainer, sweep and mining tests: the small :runlocal config they train, its CLI,
random token batches, and LAReQA-format data with sentences no question asks about."""

import contextlib
import importlib.util
import json
import os
import re
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Most XLA optimizations off for the tests' programs (jax_disable_most_optimizations: LLVM level
# 0, no expensive passes), in the test process (tests/conftest.py sets the variable before jax is
# imported) and in the subprocesses tests start (they inherit it). Measured on a quiet 2-core
# machine: compile-bound tests run faster (tests/test_dropout_sharding.py + test_memory_plan.py
# 87 -> 57 s), run-bound programs slower: a 150-step runlocal training 7.6 -> 14.2 s of CPU and
# the full-grid scoring of XQuAD-R 3.0 -> 14.0 s. Those compile under `fully_optimized_xla()`.
FEW_OPTIMIZATIONS_VARIABLE = "JAX_DISABLE_MOST_OPTIMIZATIONS"


def xla_flags(device_count: int) -> str:
  """XLA_FLAGS for a test process with `device_count` simulated CPU devices."""
  return f"--xla_force_host_platform_device_count={device_count}"


@contextlib.contextmanager
def fully_optimized_xla():
  """Programs first compiled inside the block get XLA's full optimization (jit's cache keeps
  them so afterwards): for the few tests whose cost is running a program, not compiling it."""
  import jax  # pylint: disable=g-import-not-at-top  (conftest imports this module before jax)
  before = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


def run_module_as_main(module: str, arguments: list, log_path: str) -> None:
  """`python -m module *arguments`, stdout and stderr to log_path, in THIS process: the target
  of a multiprocessing forkserver child whose server has imported the heavy modules already."""
  import runpy  # pylint: disable=g-import-not-at-top
  log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  os.dup2(log, 1)
  os.dup2(log, 2)
  sys.argv = [module, *arguments]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


STEPS = 150
# A smaller encoder than the runlocal default, to keep the suite fast; the same for every run, so
# that in-process runs share one compiled train step (train_step.step_functions is cached).
OVERRIDES = {
    "model.hidden_size": 32, "model.intermediate_size": 64, "model.num_hidden_layers": 1,
    "train.num_steps": STEPS, "train.warmup_steps": 15, "train.log_every_steps": 50,
    "train.eval_every_steps": 50, "train.checkpoint_every_steps": 50,
}


def runlocal_config(batch_type="hybrid", **extra):
  """configs/xlmr_<batch_type>.py:runlocal with OVERRIDES and `extra` ("section.field": value)."""
  path = os.path.join(REPO, "configs", f"xlmr_{batch_type}.py")
  spec = importlib.util.spec_from_file_location(f"config_{batch_type}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("runlocal")
  for dotted, value in {**OVERRIDES, **extra}.items():
    section, field = dotted.split(".")
    config[section][field] = value
  return config


def wide_random_params(config) -> dict:
  """Encoder params drawn at 10x BERT's init std (matrices 0.2, vectors 0.1 around 0 / 1 for
  LayerNorm scales): at 0.02 every text's embedding is nearly the same, and a text pooled from the
  wrong segment could hide under a packing test's tolerance."""
  import jax  # pylint: disable=g-import-not-at-top
  from hybrid_jax.models import encoder as encoder_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda: encoder_lib.init_params(config, jax.random.key(0)))

  def one(path, leaf):
    noise = rng.standard_normal(leaf.shape).astype(np.float32)
    if len(leaf.shape) == 2:
      return 0.2 * noise
    return (1.0 if path[-1].key == "scale" else 0.0) + 0.1 * noise
  return jax.tree_util.tree_map_with_path(one, shapes)


def metric_curves(runs: dict, keys, workroot) -> dict:
  """Trains each {name: config} run (trainer.train_and_evaluate, no evals) in workroot/name and
  returns {name: {(step, key): value}} for the metrics.jsonl keys asked for."""
  from hybrid_jax import trainer  # pylint: disable=g-import-not-at-top  (heavy: only when used)
  curves = {}
  for name, config in runs.items():
    config.evals = {}  # the loss curve is the point; the grid has its own tests
    workdir = os.path.join(str(workroot), name)
    trainer.train_and_evaluate(config, workdir)
    curve = curves[name] = {}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      for line in f:
        record = json.loads(line)
        curve.update({(record["step"], k): record[k] for k in keys if k in record})
  return curves


def cli_flags(workdir, batch_type="hybrid"):
  """The `python -m hybrid_jax.train` command line of runlocal_config(batch_type)."""
  return ([sys.executable, "-m", "hybrid_jax.train",
           f"--config={os.path.join(REPO, 'configs', f'xlmr_{batch_type}.py')}:runlocal",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()])


def random_token_batch(seed: int, batch_size: int, lengths: dict, vocab_size: int,
                       min_length: int, num_batch_types: int) -> dict:
  """A padded batch of random token ids for the towers in `lengths` ({"query": 8, ...}), with
  question ids repeating every 4 rows (the same question in two languages, so the same-id mask
  matters) and batch types cycling over `num_batch_types`. Passage ids follow the question ids;
  with a negative tower as long as the passage one, every 8th row (2, 10, ...) gets row r + 3's
  positive as its hard negative (same tokens, same passage id): a false negative of row r + 3
  and of the rows sharing its question, which train.mask_false_negatives drops."""
  rng = np.random.default_rng(seed)
  batch = {}
  for name, length in lengths.items():
    real = rng.integers(min_length, length + 1, size=batch_size)
    mask = (np.arange(length)[None] < real[:, None]).astype(np.int32)
    batch[f"{name}_input_ids"] = (rng.integers(1, vocab_size, size=(batch_size, length)) * mask
                                  ).astype(np.int32)
    batch[f"{name}_attention_mask"] = mask
  question_id = np.arange(batch_size, dtype=np.int32)
  question_id[1::4] = question_id[0::4]
  batch["question_id"] = question_id
  batch["passage_id"] = question_id.copy()
  negative_passage_id = np.arange(batch_size, dtype=np.int32) + batch_size  # passages of their own
  if "negative" in lengths and lengths["negative"] == lengths.get("passage"):
    for row in range(2, batch_size, 8):
      source = (row + 3) % batch_size
      for part in ("input_ids", "attention_mask"):
        batch[f"negative_{part}"][row] = batch[f"passage_{part}"][source]
      negative_passage_id[row] = batch["passage_id"][source]
  batch["negative_passage_id"] = negative_passage_id
  # Each row's positives in every language: its own passage (one language in this batch).
  batch["relevant_passage_ids"] = np.stack(
      [batch["passage_id"], np.full(batch_size, -1, np.int32)], axis=1)
  batch["batch_type"] = (np.arange(batch_size) % num_batch_types).astype(np.int32)
  return batch


def write_lareqa_with_unasked_sentences(directory: str, spec, asked_relations: int = 4) -> str:
  """A LAReQA-format directory of a synthetic spec (every id) whose questions about relations
  >= asked_relations are removed: their sentences stay in the paragraphs as sentences no question
  asks about, the pool that hard-negative mining draws from (gold sentences never are)."""
  from hybrid_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  synthetic.write_lareqa_dir(directory, spec, ids="all")
  for name in os.listdir(directory):
    path = os.path.join(directory, name)
    with open(path, encoding="utf-8") as f:
      root = json.load(f)
    for article in root["data"]:
      for paragraph in article["paragraphs"]:
        paragraph["qas"] = [qa for qa in paragraph["qas"]
                            if int(re.search(r"-r(\d+)$", qa["id"])[1]) < asked_relations]
    with open(path, "w", encoding="utf-8") as f:
      json.dump(root, f, ensure_ascii=False)
  return directory


def write_lareqa_neighbour_case(directory: str) -> str:
  """One English LAReQA file where neighbouring-sentence negatives are other questions' gold
  sentences: q1's negative is q2's gold and vice versa, and q3's (a one-sentence paragraph, so
  the next paragraph's first sentence) is q2's gold too."""
  with open(os.path.join(directory, "en.json"), "w") as f:
    json.dump({"data": [{"paragraphs": [
        {"context": "Cats purr. Dogs bark.", "sentences": ["Cats purr.", "Dogs bark."],
         "sentence_breaks": [[0, 10], [11, 21]],
         "qas": [{"id": "q1", "question": "Dogs?", "answers": [{"answer_start": 11}]},
                 {"id": "q2", "question": "Cats?", "answers": [{"answer_start": 0}]}]},
        {"context": "Birds sing.", "sentences": ["Birds sing."], "sentence_breaks": [[0, 11]],
         "qas": [{"id": "q3", "question": "Birds?", "answers": [{"answer_start": 3}]}]}]}]}, f)
  return directory
