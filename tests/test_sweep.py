"""The alpha sweep: flag parsing, the report from (fake and real) runs, resume, errors."""

import csv
import json
import os
import subprocess
import sys

import pytest

from hybrid_jax import sweep
import train_helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_alphas_sorts_and_checks():
  assert sweep.parse_alphas("1, 0,0.25") == [0.0, 0.25, 1.0]
  for text, message in (("", "empty"), ("0,x", "not a number"), ("0,1.5", "outside"),
                        ("-0.1", "outside"), ("0.5,0.5", "repeats"), ("nan", "outside")):
    with pytest.raises(sweep.SweepConfigError, match=message):
      sweep.parse_alphas(text)


def _hybrid_config():
  return train_helpers.runlocal_config("hybrid")


def _fake_result(alpha, preempted=False):
  """What train_and_evaluate returns, with mAPs that are a known function of alpha."""
  summary = {"monolingual": {"map": 0.8 + 0.2 * alpha}, "cross_lingual": {"map": 0.9 - 0.8 * alpha},
             "multilingual": {"map": 0.5 + alpha * (1 - alpha), "rank_distance": 100 * alpha}}
  return {"step": 10, "preempted": preempted, "evals": {"xquad_r": {"summary": summary}},
          "metrics": {"validation/loss": 1.0 - alpha / 2, "validation/loss_at_start": 3.0}}


def test_report_rows_best_alpha_and_files(tmp_path):
  seen = []

  def train_fn(config, workdir):
    seen.append((config.data.alpha, workdir))
    return _fake_result(config.data.alpha)

  config = _hybrid_config()
  rows = sweep.sweep(config, str(tmp_path), [0.0, 0.25, 0.5, 1.0], train_fn=train_fn)
  assert seen == [(a, os.path.join(str(tmp_path), f"alpha_{a:g}")) for a in (0, 0.25, 0.5, 1)]
  assert config.data.alpha == 0.5  # the caller's config is not modified
  assert [r["alpha"] for r in rows] == [0.0, 0.25, 0.5, 1.0]
  assert rows[1]["evals"]["xquad_r"] == pytest.approx(
      {"monolingual_map": 0.85, "cross_lingual_map": 0.7, "multilingual_map": 0.6875,
       "rank_distance": 25.0})
  # Multilingual mAP 0.5 + a(1 - a) peaks at 0.5; validation loss is not a criterion.
  assert sweep.best_alphas(rows) == {"xquad_r/multilingual_map": 0.5}
  for name in sweep.SWEEP_FILES:
    assert os.path.getsize(tmp_path / name) > 0, name
  saved = json.loads((tmp_path / "alpha_sweep.json").read_text())
  assert saved["rows"] == json.loads(json.dumps(rows))
  with open(tmp_path / "alpha_sweep.csv", encoding="utf-8") as f:
    table = list(csv.DictReader(f))
  assert [float(r["xquad_r/cross_lingual_map"]) for r in table] == pytest.approx(
      [0.9, 0.7, 0.5, 0.1])
  markdown = (tmp_path / "alpha_sweep.md").read_text()
  assert "| 0 | X-Y only | 1.0000 |" in markdown and "| 1 | X-X-mono only |" in markdown
  assert "best multilingual mAP on xquad_r: alpha = 0.5" in markdown


def test_preemption_stops_the_sweep_with_a_partial_report(tmp_path):
  def train_fn(config, workdir):
    return _fake_result(config.data.alpha, preempted=config.data.alpha == 0.5)

  rows = sweep.sweep(_hybrid_config(), str(tmp_path), [0.0, 0.5, 1.0], train_fn=train_fn)
  assert [r["alpha"] for r in rows] == [0.0, 0.5]
  assert len(json.loads((tmp_path / "alpha_sweep.json").read_text())["rows"]) == 2


def test_only_hybrid_configs_can_be_swept(tmp_path):
  config = _hybrid_config()
  config.data.batch_type = "mono"
  with pytest.raises(sweep.SweepConfigError, match="alpha only matters for hybrid"):
    sweep.sweep(config, str(tmp_path), [0.0, 1.0], train_fn=lambda c, w: {})


SWEEP_STEPS = 40  # the sweep's wiring, not learning: test_trainer.py trains the batch types longer


def test_real_sweep_then_rerun_reevaluates_without_training(tmp_path):
  """alpha 0 (X-Y only) and 1 (X-X-mono only) with the tiny encoder of tests/test_trainer.py."""
  config = train_helpers.runlocal_config(
      "hybrid", **{"train.num_steps": SWEEP_STEPS, "train.warmup_steps": 4,
                   "train.log_every_steps": 10, "train.eval_every_steps": 20,
                   "train.checkpoint_every_steps": 20})
  rows = sweep.sweep(config, str(tmp_path), [0.0, 1.0])
  for row in rows:  # alpha reached the sampler: every logged interval saw one batch type only
    lines = [json.loads(l) for l in open(os.path.join(row["workdir"], "metrics.jsonl"))]
    seen = {k for l in lines for k in l if k in ("loss/mono", "loss/xy")}
    assert seen == {"loss/xy" if row["alpha"] == 0.0 else "loss/mono"}, (row["alpha"], seen)
    results = json.loads(open(os.path.join(row["workdir"], "eval", f"synthetic-step{SWEEP_STEPS}",
                                           "results.json")).read())
    # the row is the run's own evaluation
    assert row["evals"]["synthetic"]["multilingual_map"] == pytest.approx(
        results["summary"]["multilingual"]["map"])
  by_alpha = {r["alpha"]: r["evals"]["synthetic"] for r in rows}
  assert by_alpha[0.0] != by_alpha[1.0]
  again = sweep.sweep(config, str(tmp_path), [0.0, 1.0])
  for first, second in zip(rows, again):
    assert second["step"] == first["step"] == SWEEP_STEPS
    assert second["validation_loss"] == pytest.approx(first["validation_loss"])
    for key, value in first["evals"]["synthetic"].items():
      assert second["evals"]["synthetic"][key] == pytest.approx(value, abs=1e-6), key


def test_cli_rejects_bad_alphas(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "hybrid_jax.sweep", "--config=configs/xlmr_hybrid.py:runlocal",
       f"--workdir={tmp_path / 'sweep'}", "--alphas=0,2"],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "error: --alphas: 2 is outside [0, 1]" in result.stderr
  assert not (tmp_path / "sweep").exists()
