r"""Prints the batch plans of a config: exactly which pairs the model will be trained on.

    python -m hybrid_jax.data.plan --config=configs/xlmr_hybrid.py:runlocal --start=0 --steps=3
    python -m hybrid_jax.data.plan --config=configs/xlmr_hybrid.py --config.data.alpha=0.3 \
        --start=1000 --steps=5 --process_count=4 --process_index=1

One JSON line per step: {"step", "type", "query_langs", "passage_langs", "ids"} (lists of rows; the
global batch of config.train.batch_size rows, or one host's slice with --process_count). Only the
corpus and the sampler are built (no tokenizer), so this is fast even for real data.
"""

from __future__ import annotations

import json
import sys

from absl import app
from absl import flags
import numpy as np

from hybrid_jax import config_lib
from hybrid_jax import errors
from hybrid_jax.data import records
from hybrid_jax.data import sampler as sampler_lib
from hybrid_jax.data import sources

_CONFIG = config_lib.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).",
                                          lock_config=True)
_START = flags.DEFINE_integer("start", 0, "First step to print.")
_STEPS = flags.DEFINE_integer("steps", 10, "Number of steps to print.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 0, "Global batch size (0 = config.train.batch_size).")
_PROCESS_INDEX = flags.DEFINE_integer("process_index", 0, "Print this host's slice ...")
_PROCESS_COUNT = flags.DEFINE_integer("process_count", 1, "... out of this many hosts.")


def training_sampler(data_config) -> tuple[records.ParallelCorpus, sampler_lib.BatchSampler]:
  """The corpus and the training sampler of a `config.data` (same split as TrainingData)."""
  corpus = sources.load_corpus(data_config)
  validation = sources.validation_mask(corpus, data_config)
  sampler = sampler_lib.BatchSampler.from_config(data_config, corpus.presence, corpus.languages,
                                                 rows=np.flatnonzero(~validation))
  return corpus, sampler


def plan_records(corpus: records.ParallelCorpus, sampler: sampler_lib.BatchSampler, start: int,
                 steps: int, batch_size: int, process_index: int = 0, process_count: int = 1):
  """Yields the JSON-ready dict of each step in [start, start + steps)."""
  sampler.check_batch_size(batch_size)
  for step in range(start, start + steps):
    plan = sampler.plan(step, batch_size).host_slice(process_index, process_count)
    yield {"step": step, "type": plan.batch_type,
           "query_langs": [corpus.languages[k] for k in plan.query_lang],
           "passage_langs": [corpus.languages[k] for k in plan.passage_lang],
           "ids": [corpus.ids[i] for i in plan.example]}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config=CONFIG_FILE[:ARG] is required, e.g. configs/xlmr_hybrid.py:runlocal")
  if not 0 <= _PROCESS_INDEX.value < _PROCESS_COUNT.value:  # the sampler treats this as a bug
    raise app.UsageError(f"--process_index={_PROCESS_INDEX.value} must be in "
                         f"[0, --process_count={_PROCESS_COUNT.value})")
  batch_size = _BATCH_SIZE.value or config.train.batch_size
  try:
    corpus, sampler = training_sampler(config.data)
    for record in plan_records(corpus, sampler, _START.value, _STEPS.value, batch_size,
                               _PROCESS_INDEX.value, _PROCESS_COUNT.value):
      sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
  except errors.UserError as e:  # config, data and LAReQA-format errors: one line, no traceback
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
