r"""Trains a multilingual dual encoder with hybrid batches.

    python -m hybrid_jax.train --config=configs/xlmr_hybrid.py --workdir=gs://bucket/run1
    python -m hybrid_jax.train --config=configs/xlmr_hybrid.py:runlocal --workdir=/tmp/hybrid_demo
    python -m hybrid_jax.train --config=configs/me5_hybrid.py:runlocal,alpha=0.3 \
        --config.train.learning_rate=5e-4 --workdir=/tmp/run

Re-running the same command resumes from the newest checkpoint in --workdir. Training happens
in hybrid_jax.trainer.train_and_evaluate; this file parses flags and prints the final tables.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags

from hybrid_jax import config_lib
from hybrid_jax import errors
from hybrid_jax import native_log

# Also the flags of hybrid_jax.sweep, which imports this module for them.
CONFIG = config_lib.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with an argument: FILE.py:runlocal,alpha=0.3",
    lock_config=True)
WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and evaluation "
                              "results (gs://... with several hosts).")
DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host TPU/GPU; the "
    "launch scripts set this).")
DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Check the config and print the batch sizes and the per-device memory plan "
    "for the visible devices (hybrid_jax/memory_plan.py), then exit: nothing is compiled, "
    "written or trained.")
flags.mark_flags_as_required(["config", "workdir"])


def start_process(argv) -> None:
  """What every training command does first: no stray arguments, quiet Orbax, multi-host init."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  native_log.quiet_library_info_logs()
  if DISTRIBUTED.value:
    import jax  # pylint: disable=g-import-not-at-top
    jax.distributed.initialize()


def print_evaluation_tables(result: dict) -> None:
  """The summary table of every evaluator's final results, on stdout (process 0)."""
  import jax  # pylint: disable=g-import-not-at-top
  from hybrid_jax.eval import report  # pylint: disable=g-import-not-at-top
  if result["preempted"] or jax.process_index() != 0:
    return
  for name, results in result["evals"].items():
    print(f"\n== {name}: retrieval evaluation at step {result['step']} ==")
    print(report.summary_table(results))
  sys.stdout.flush()


def dry_run(config, workdir: str) -> str:
  """The config checks of a real start, then the memory plan for this machine's devices."""
  from hybrid_jax import memory_plan  # pylint: disable=g-import-not-at-top
  from hybrid_jax import trainer  # pylint: disable=g-import-not-at-top
  trainer.validate_config(config, workdir)
  return memory_plan.plan(config, memory_plan.local_target()).report()


def main(argv):
  start_process(argv)
  if DRY_RUN.value:
    print(errors.exit_on_user_error(lambda: dry_run(CONFIG.value, WORKDIR.value)))
    return
  from hybrid_jax import trainer  # pylint: disable=g-import-not-at-top
  result = errors.exit_on_user_error(
      lambda: trainer.train_and_evaluate(CONFIG.value, WORKDIR.value))
  print_evaluation_tables(result)


if __name__ == "__main__":
  app.run(main)
