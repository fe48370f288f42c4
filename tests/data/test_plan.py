"""`python -m hybrid_jax.data.plan`: one JSON line per step, the same in every process, config
overrides, host slices and clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from hybrid_jax import config_lib
from hybrid_jax.data import plan as plan_lib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RUNLOCAL = "configs/xlmr_hybrid.py:runlocal"


def _run(*args, hash_seed="0", check=True):
  env = dict(os.environ, PYTHONHASHSEED=hash_seed)
  result = subprocess.run([sys.executable, "-m", "hybrid_jax.data.plan", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def _lines(result):
  return [json.loads(line) for line in result.stdout.splitlines()]


def _in_process(start, steps, batch_size=32, process_index=0, process_count=1, **data_changes):
  config = config_lib.build_config("xlmr-base", "hybrid", "runlocal")
  config.data.update(data_changes)
  corpus, sampler = plan_lib.training_sampler(config.data)
  return list(plan_lib.plan_records(corpus, sampler, start, steps, batch_size, process_index,
                                    process_count))


def test_two_processes_print_the_same_plans_as_the_library():
  first = _run(f"--config={RUNLOCAL}", "--start=0", "--steps=12", hash_seed="1")
  second = _run(f"--config={RUNLOCAL}", "--start=0", "--steps=12", hash_seed="2")
  assert first.stdout == second.stdout
  lines = _lines(first)
  assert lines == _in_process(0, 12)
  assert [line["step"] for line in lines] == list(range(12))
  for line in lines:
    assert list(line) == ["step", "type", "query_langs", "passage_langs", "ids"]
    assert len(line["ids"]) == len(line["query_langs"]) == len(line["passage_langs"]) == 32
    assert line["type"] in ("mono", "xy")
    if line["type"] == "mono":
      assert len(set(line["query_langs"])) == 1 and line["query_langs"] == line["passage_langs"]
    else:
      assert all(q != p for q, p in zip(line["query_langs"], line["passage_langs"]))
  assert {line["type"] for line in lines} == {"mono", "xy"}
  # Resume: start=7 prints exactly the tail of start=0.
  assert _lines(_run(f"--config={RUNLOCAL}", "--start=7", "--steps=5")) == lines[7:]


def test_config_overrides_work_as_for_training():
  all_mono = _lines(_run(f"--config={RUNLOCAL}", "--config.data.alpha=1.0", "--steps=20"))
  assert {line["type"] for line in all_mono} == {"mono"}
  alpha = _lines(_run(f"--config={RUNLOCAL}", "--config.data.alpha=0.3", "--start=100",
                      "--steps=4", "--config.train.batch_size=8"))
  assert alpha == _in_process(100, 4, batch_size=8, alpha=0.3)
  assert alpha != _in_process(100, 4, batch_size=8)  # the override changed the plans
  all_xy = _lines(_run(f"--config={RUNLOCAL},alpha=0.0", "--steps=20"))  # the typed config arg
  assert {line["type"] for line in all_xy} == {"xy"}


def test_host_slice():
  host = _lines(_run(f"--config={RUNLOCAL}", "--steps=3", "--process_count=4",
                     "--process_index=1"))
  full = _in_process(0, 3)
  for line, whole in zip(host, full):
    assert line["ids"] == whole["ids"][8:16] and line["query_langs"] == whole["query_langs"][8:16]


@pytest.mark.parametrize("override,message", [
    ("--config.data.alpha=1.5", r"error: data.alpha must be in [0, 1]"),
    ("--config.data.languages=('lat','xx')", "error: data.languages names ['xx']"),
    ("--batch_size=2000", "error: global batch size 2000 cannot be filled with distinct ids"),
    ("--start=-1", "error: step must be >= 0, found -1"),
    ("--process_index=4", "--process_index=4 must be in [0, --process_count=1)"),
])
def test_errors_exit_with_a_message_and_no_traceback(override, message):
  result = _run(f"--config={RUNLOCAL}", override, "--steps=1", check=False)
  assert result.returncode != 0 and result.stdout == ""
  assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
