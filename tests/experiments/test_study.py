"""experiments/study.py and report.py: the study's runs differ only where they should, the runner
knows what is done, and the report reads results.json files into the right cells."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hybrid_jax import config_lib
from hybrid_jax.data import plan

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "experiments"))

import report  # pylint: disable=g-import-not-at-top,wrong-import-position
import study  # pylint: disable=g-import-not-at-top,wrong-import-position
import study_config  # pylint: disable=g-import-not-at-top,wrong-import-position


def _flat(run: study.Run) -> dict:
  return config_lib.flatten(study_config.get_config(run.config_arg).to_dict())


def test_runs_differ_only_in_strategy_alpha_seed_and_direction():
  trained = [r for r in study.RUNS if not r.zero_shot]
  assert len({r.name for r in study.RUNS}) == len(study.RUNS) == 15
  reference = {"A": _flat(next(r for r in trained if r.name == "A-hybrid")),
               "B": _flat(next(r for r in trained if r.name == "B-hybrid"))}
  allowed = {"data.batch_type", "data.alpha", "seed", "data.seed"}
  for run in trained:
    flat = _flat(run)
    changed = {k for k in flat if flat[k] != reference[run.direction][k]}
    assert changed <= allowed, (run.name, changed)
    assert flat["data.batch_type"] == run.strategy and flat["seed"] == run.seed
  a, b = reference["A"], reference["B"]
  assert {k for k in a if a[k] != b[k]} == {"data.path"}
  assert (a["data.heldout_fraction"], a["train.num_steps"], a["model.init_from"] != "") == (
      0.2, 300, True)
  assert a["data.query_prefix"] == "query: " and a["data.validation_batch_type"] == "hybrid"
  assert a["train.mask_false_negatives"] is True


@pytest.mark.real_data
@pytest.mark.parametrize("baseline,alpha", [("mono", 1.0), ("xy", 0.0)])
def test_hybrid_at_alpha_0_and_1_draws_exactly_the_baseline_batches(baseline, alpha):
  """Why the alpha sweep reuses the X-Y and X-X-mono runs as its endpoints."""
  _, base = plan.training_sampler(study_config.get_config(f"strategy={baseline}").data)
  _, hybrid = plan.training_sampler(
      study_config.get_config(f"strategy=hybrid,alpha={alpha}").data)
  for step in range(0, 300, 7):
    p, q = base.plan(step, 32), hybrid.plan(step, 32)
    assert p.batch_type == q.batch_type == baseline
    for field in ("example", "query_lang", "passage_lang"):
      np.testing.assert_array_equal(getattr(p, field), getattr(q, field))


def test_study_knows_what_is_done_and_prints_commands(tmp_path):
  results, workroot = tmp_path / "results", tmp_path / "runs"
  s = study.Study(str(workroot), str(results))
  run = next(r for r in study.RUNS if r.name == "A-xy")
  assert not s.done(run) and s.trained_steps(run) == 0
  train = s.train_command(run)
  assert train[1:3] == ["-m", "hybrid_jax.train"] and train[3] == (
      "--config=experiments/study_config.py:direction=A,strategy=xy,alpha=0.5,seed=0,protocol=1")
  (test_eval, shifted) = run.evaluations()
  assert (test_eval.name, shifted.name) == ("mlqa-r-test", "xquad-r")
  command = s.evaluate_command(run, test_eval)
  assert "--part=test" in command and "--heldout_fraction=0.2" in command
  assert f"--workdir={workroot / 'A-xy'}" in command and "--step=best" in command
  # The zero-shot model scores the same four test sets, with the e5 prefixes and A's unseen group.
  zero = study.RUNS[0]
  assert [e.name for e in zero.evaluations()] == ["mlqa-r-test", "xquad-r", "xquad-r-test",
                                                  "mlqa-r"]
  zs = s.evaluate_command(zero, zero.evaluations()[1])
  assert "--query_prefix=query: " in zs
  assert "--groups=low_resource=el+hi+th+tr+vi;unseen=el+ru+th+tr" in zs
  # An evaluation is done once its results.json is collected; collect copies only small files.
  source = workroot / "A-xy" / "eval" / "mlqa-r-test"
  (source / "embeddings").mkdir(parents=True)
  (source / "results.json").write_text("{}")
  (source / "embeddings" / "queries.npy").write_text("big")
  (workroot / "A-xy" / "config.json").write_text("{}")
  s.collect(run, test_eval)
  assert s.evaluation_done(run, test_eval) and not s.evaluation_done(run, shifted)
  assert sorted(os.listdir(results / "A-xy")) == ["config.json", "mlqa-r-test"]
  assert os.listdir(results / "A-xy" / "mlqa-r-test") == ["results.json"]
  # --list runs without touching a model.
  out = subprocess.run([sys.executable, "experiments/study.py", f"--workroot={workroot}",
                        "--list", "--protocol=1", "--only=B-"], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout
  assert out.count("\n") == 3 * 3 + 1 and "B-hybrid" in out and "ETA for what is left" in out
  with pytest.raises(SystemExit, match="matches no run"):
    study.select("C-")


def _fake_results(dataset: str, multi: float, languages=("en", "de")) -> dict:
  summary = {f: {"map": multi + 0.1 * k, "recall@1": 0.5, "recall@10": 0.9}
             for k, f in enumerate(("multilingual", "cross_lingual", "monolingual"))}
  summary["multilingual"].update({"rank_distance": 100.0, "low_resource/map": multi - 0.05,
                                  "low_resource/rank_distance": 120.0,
                                  "low_resource/num_settings": 1})
  summary["cross_lingual"]["low_resource/map"] = multi
  return {"dataset": dataset, "languages": list(languages), "summary": summary, "settings": [],
          "multilingual_by_lang": [{"query_lang": l, "map": multi, "rank_distance": 90.0}
                                   for l in languages]}


def test_report_puts_each_results_json_in_its_cells(tmp_path):
  results = tmp_path / "results"
  values = {("zeroshot", "mlqa-r-test"): 0.30, ("zeroshot", "xquad-r"): 0.25,
            ("A-mono", "mlqa-r-test"): 0.40, ("A-mono", "xquad-r"): 0.31,
            ("A-hybrid", "mlqa-r-test"): 0.50, ("A-hybrid", "xquad-r"): 0.37,
            ("A-hybrid-seed1", "xquad-r"): 0.39, ("A-hybrid-seed2", "xquad-r"): 0.41,
            ("A-xy", "xquad-r"): 0.33, ("A-hybrid-alpha0.25", "xquad-r"): 0.35}
  for (run, evaluation), multi in values.items():
    (results / run / evaluation).mkdir(parents=True)
    (results / run / evaluation / "results.json").write_text(
        json.dumps(_fake_results(evaluation, multi)))
  out = report.build(str(results), str(tmp_path / "RESULTS.md"))
  text = open(out, encoding="utf-8").read()
  assert "Status: 10 of 32 evaluations done." in text
  # Headline: in-domain 0.500, shifted 0.370, drop 0.130, gains over zero-shot 0.200 / 0.120.
  assert "| A | hybrid (alpha 0.5) | 0.500 | 0.370 | 0.130 | 0.200 | 0.120 |" in text
  assert "| A | X-X-mono | 0.400 | 0.310 | 0.090 | 0.100 | 0.060 |" in text
  assert "| A | X-Y | - | 0.330 | - | - | 0.080 |" in text
  # Seeds 0, 1, 2 of hybrid: 0.37, 0.39, 0.41 -> 0.390 ± 0.020.
  assert "0.390 ± 0.020 (n=3)" in text
  # Alpha row of the multilingual pool on XQuAD-R: X-Y 0.33, 0.25 -> 0.35, 0.5 -> 0.37, mono 0.31.
  assert "| xquad-r | multilingual | 0.330 | 0.350 | 0.370 | - | 0.310 |" in text
  assert os.path.isfile(results / "plots" / "alpha_curve.png")
  assert os.path.isfile(results / "plots" / "seeds.png") and "![seeds]" in text
  # Rank distance over seeds: 100.0 in all three fake runs -> sd 0.
  assert "| 100.0 ± 0.0 (n=3) |" in text
  assert "low_resource mAP cross" in text and "| zero-shot e5-small | 0.250 | 0.200 | 120.0 |" in text
  # No per_query.npz here: no significance rows, and no crash.
  assert "| hybrid vs |" not in text


def test_report_significance_from_per_query_files(tmp_path):
  """With per_query.npz beside results.json, the report runs hybrid_jax.eval.significance and
  caches its summary rows."""
  committed = os.path.join(REPO, "experiments", "results", "zeroshot", "mlqa-r-test")
  assert os.path.isfile(os.path.join(committed, "per_query.npz")), "committed with the study"
  results = tmp_path / "results"
  for run in ("A-mono", "A-hybrid"):
    shutil.copytree(committed, results / run / "mlqa-r-test")
  rows = report.significance_rows(str(results), "A-mono", "A-hybrid", "mlqa-r-test")
  assert [r["name"] for r in rows] == ["monolingual", "cross_lingual", "multilingual"]
  assert all(r["diff"] == 0.0 and r["p"] == 1.0 for r in rows)  # a run against itself
  assert os.path.isfile(results / "significance" / "mlqa-r-test--A-hybrid--vs--A-mono--map.json")


# --- protocol v2 ----------------------------------------------------------------------------------
def test_v2_runs_differ_only_where_they_should_and_use_the_leak_free_settings(tmp_path):
  before = study.runs_v2(None)
  after = study.runs_v2(450)
  assert len(before) == 3 + 15 + 6 + 1 and len(after) == len(before) + 15
  assert len({r.name for r in after}) == len(after)
  assert [r.name for r in after[:3]] == ["B-pilot-mono", "B-pilot-xy", "B-pilot-hybrid"]
  reference = _flat(next(r for r in after if r.name == "A-hybrid-seed0"))
  allowed = {"data.batch_type", "data.alpha", "seed", "data.seed", "data.path",
             "train.num_steps", "train.warmup_steps"}
  for run in (r for r in after if not r.zero_shot):
    flat = _flat(run)
    assert {k for k in flat if flat[k] != reference[k]} <= allowed, run.name
    assert (flat["data.batch_type"], flat["seed"], flat["train.num_steps"]) == (
        run.strategy, run.seed, {"pilot": 600}.get(run.family, 450 if run.direction == "B" else
                                                   300))
    assert flat["data.validation_unit"] == "article" and flat["data.packing"] is True
    assert flat["train.false_negative_mask_definition"] == "per_question"
  # Each trained run: both held-out parts and the other collection's grid, at best and last.
  names = [e.name for e in next(r for r in after if r.name == "B-xy-seed3").evaluations()]
  assert names == ["best/mlqa-r", "best/mlqa-r-test", "best/xquad-r-test", "last/mlqa-r",
                   "last/mlqa-r-test", "last/xquad-r-test", "best/mlqa-r-centered",
                   "best/mlqa-r-test-centered", "best/xquad-r-test-centered"]
  assert not next(r for r in after if r.family == "pilot").evaluations()
  zero = after[6]  # after A's seed-0 runs: the headline's baseline rows come early
  assert zero.name == "zeroshot" and [r.name for r in after[3:6]] == [
      "A-mono-seed0", "A-xy-seed0", "A-hybrid-seed0"]
  assert sorted(e.name for e in zero.evaluations() if not e.centered) == sorted(
      e.name for e in study.RUNS[0].evaluations())  # v1's zero-shot row, to check it is unchanged
  # The centring baseline re-scores the plain evaluation's exported embeddings.
  # An empty results directory: which jobs are done must not depend on the committed results.
  s = study.StudyV2("/root/runs", str(tmp_path / "results"))
  run = next(r for r in after if r.name == "A-xy-seed0")
  plain, center = (next(e for e in run.evaluations() if e.name == n)
                   for n in ("best/xquad-r", "best/xquad-r-centered"))
  exported = "--export_embeddings=/root/runs/protocol2/A-xy-seed0/eval/best/xquad-r/exported"
  assert exported in s.evaluate_command(run, plain)
  command = s.evaluate_command(run, center)
  assert command[3:5] == [exported.replace("--export_embeddings", "--embeddings"),
                          "--center_languages"]
  assert "--groups=low_resource=el+hi+th+tr+vi;unseen=el+ru+th+tr" in command
  evaluation = {e.name: e for e in run.evaluations()}
  root = "/root/runs/protocol2/A-xy-seed0/eval"
  # The held-out part of the grid's collection is scored from the grid's embeddings, with the
  # groups a --workdir source gives; the other part (MLQA-R's, in-domain for A) is encoded.
  for step in ("best", "last"):
    command = s.evaluate_command(run, evaluation[f"{step}/xquad-r-test"])
    assert command[3] == f"--embeddings={root}/{step}/xquad-r/exported", command
    assert "--part=test" in command and "--heldout_unit=article" in command
    assert "--groups=low_resource=el+hi+th+tr+vi;unseen=el+ru+th+tr" in command
    assert f"--export_embeddings={root}/{step}/xquad-r/exported" in s.evaluate_command(
        run, evaluation[f"{step}/xquad-r"])
  assert s.evaluate_command(run, evaluation["best/mlqa-r-test"])[3].startswith("--workdir=")
  assert not any(a.startswith("--export") for a in s.evaluate_command(
      run, evaluation["last/mlqa-r-test"]))
  assert s.evaluate_command(run, evaluation["best/xquad-r-test-centered"])[3] == (
      f"--embeddings={root}/best/xquad-r/exported")


def test_v2_heldout_part_is_encoded_when_its_grid_was_scored_without_embeddings(tmp_path):
  s = study.StudyV2(str(tmp_path / "runs"), str(tmp_path / "results"))
  run = next(r for r in s.runs() if r.name == "A-hybrid-seed2")
  part = next(e for e in run.evaluations() if e.name == "last/xquad-r-test")
  assert s.evaluate_command(run, part)[3].startswith("--embeddings=")  # grid not scored yet
  grid = tmp_path / "results" / run.name / "last" / "xquad-r"
  grid.mkdir(parents=True)
  (grid / "results.json").write_text("{}")  # scored, but its exported embeddings are gone
  assert s.evaluate_command(run, part)[3:5] == [f"--workdir={tmp_path}/runs/protocol2/{run.name}",
                                                "--step=last"]


def test_v2_centred_score_re_exports_embeddings_lost_with_the_work_root(tmp_path, monkeypatch):
  """On a new machine the plain twin's results are committed but its exported embeddings are
  gone: the runner encodes again to export them (without collecting: the committed scores stay)
  and then scores the centred evaluation from them."""
  s = study.StudyV2(str(tmp_path / "runs"), str(tmp_path / "results"))
  run = next(r for r in s.runs() if r.name == "A-hybrid-seed2")
  evaluation = {e.name: e for e in run.evaluations()}
  for name in ("best/xquad-r", "best/xquad-r-test"):  # scored elsewhere, committed
    (tmp_path / "results" / run.name / name).mkdir(parents=True)
    (tmp_path / "results" / run.name / name / "results.json").write_text("{}")
  calls = []

  def record(self, run, kind, evaluation, command, collect=True):
    calls.append((evaluation.name, collect, command[3]))
    if "--export_embeddings" in " ".join(command):  # what the real evaluation would leave
      os.makedirs(command[-1].split("=", 1)[1])
  monkeypatch.setattr(study.Study, "run_job", record)
  root = f"{tmp_path}/runs/protocol2/{run.name}"

  def score(name):
    calls.clear()
    s.run_job(run, "evaluate", evaluation[name], s.evaluate_command(run, evaluation[name]))
    return calls

  # The grid's embeddings were gone, so the part itself is the source and is encoded again.
  assert score("best/xquad-r-test-centered") == [
      ("best/xquad-r-test", False, f"--workdir={root}"),
      ("best/xquad-r-test-centered", True, f"--embeddings={root}/eval/best/xquad-r-test/exported")]
  assert score("best/xquad-r-centered") == [
      ("best/xquad-r", False, f"--workdir={root}"),
      ("best/xquad-r-centered", True, f"--embeddings={root}/eval/best/xquad-r/exported")]
  score("best/xquad-r-centered")
  assert [c[0] for c in calls] == ["best/xquad-r-centered"]  # embeddings there: no re-encoding


def test_b_budget_is_the_argmin_of_the_pilots_mean_validation_loss():
  curves = {"mono": {0: 3.0, 50: 2.0, 100: 1.5, 150: 1.6},
            "xy": {0: 3.0, 50: 2.1, 100: 1.7, 150: 1.5},
            "hybrid": {0: 3.0, 50: 2.0, 100: 1.6, 150: 1.6}}
  budget = study.decide_budget(curves)
  # Means: 50 -> 2.033, 100 -> 1.6, 150 -> 1.567; step 0 is never a budget.
  assert budget["steps"] == 150 and budget["mean_validation_loss"]["100"] == 1.6
  curves["xy"][150] = 1.7  # now 150 ties 100 at 1.6: the earlier step wins
  assert study.decide_budget(curves)["steps"] == 100


def test_v2_runner_fixes_the_budget_copies_last_when_best_and_names_the_root(tmp_path,
                                                                          monkeypatch):
  root = tmp_path / "runs"
  s = study.StudyV2(str(root), str(tmp_path / "results"))
  assert s.budget() is None and not any(r.direction == "B" and r.family == "main"
                                         for r in s.runs())
  for strategy, curve in (("mono", (2.0, 1.4, 1.3)), ("xy", (2.0, 1.6, 1.5)),
                          ("hybrid", (2.0, 1.5, 1.6))):
    workdir = tmp_path / "results" / f"B-pilot-{strategy}"  # where a finished pilot's curve goes
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(
        json.dumps({"step": t, "validation/loss": v}) + "\n" for t, v in zip((50, 100, 150), curve)))
  pilot = s.runs()[0]
  assert not s.done(pilot)  # its curve stops at step 150 of 600
  assert s.fix_budget()["steps"] == 150  # means 2.0, 1.5, 1.4667
  assert json.loads((tmp_path / "results" / study.BUDGET_FILE).read_text())["steps"] == 150
  b_runs = [r for r in s.runs() if r.direction == "B" and r.family == "main"]
  assert len(b_runs) == 15 and {r.steps for r in b_runs} == {150}
  assert "steps=150" in s.train_command(b_runs[0])[3]
  # The last checkpoint is the best one: its scores are copied, not recomputed.
  run = b_runs[0]
  monkeypatch.setattr(s, "checkpoint_steps", lambda r: {"best": 150, "last": 150})
  jobs = list(s.jobs(run))
  assert [k for k, _, _ in jobs] == ["train"] + ["evaluate"] * 3 + ["copy"] * 3 + ["evaluate"] * 3
  # Collected results name the work root as $STUDY_ROOT and python as python.
  best = jobs[1][1]
  out = root / "protocol2" / run.name / "eval" / "best" / best.name.split("/")[1]
  out.mkdir(parents=True)
  (out / "results.json").write_text("{}")
  (out / "results_meta.json").write_text(json.dumps(
      {"command": " ".join(s.evaluate_command(run, best))}))
  (out / "results.md").write_text(f"Source: workdir {root / 'protocol2' / run.name} step 150\n")
  s.collect(run, best)
  assert (tmp_path / "results" / run.name / best.name / "results.md").read_text() == (
      f"Source: workdir $STUDY_ROOT/{run.name} step 150\n")
  meta = json.loads((tmp_path / "results" / run.name / best.name / "results_meta.json").read_text())
  assert meta["command"].startswith("python -m hybrid_jax.evaluate --workdir=$STUDY_ROOT/" +
                                    run.name + " --step=best")
  assert str(tmp_path) not in json.dumps(meta)
  s.run_job(run, "copy", jobs[4][1], [])
  assert s.evaluation_done(run, jobs[4][1])
  assert json.loads((tmp_path / "results" / run.name / "checkpoints.json").read_text()) == {
      "best": 150, "last": 150}


def test_v2_finished_run_frees_its_checkpoints_and_embeddings_only(tmp_path):
  s = study.StudyV2(str(tmp_path / "runs"), str(tmp_path / "results"))
  run = next(r for r in s.runs() if r.name == "A-xy-seed1")
  workdir = tmp_path / "runs" / "protocol2" / run.name
  for d in ("checkpoints/300", "best/250", "eval/best/xquad-r/embeddings"):
    (workdir / d).mkdir(parents=True)
  (workdir / "config.json").write_text("{}")
  s.finished(run)  # not done: nothing goes
  assert (workdir / "checkpoints" / "300").is_dir()
  for evaluation in run.evaluations():
    (tmp_path / "results" / run.name / evaluation.name).mkdir(parents=True)
    (tmp_path / "results" / run.name / evaluation.name / "results.json").write_text("{}")
  s.finished(run)
  assert sorted(p.name for p in workdir.iterdir()) == ["config.json", "eval"]
  assert not (workdir / "eval" / "best" / "xquad-r" / "embeddings").exists()
  # Its checkpoints are gone, yet its training counts as done (--list said "to do").
  assert s.trained_steps(run) == 0 and s.training_done(run)
  pilot = next(r for r in s.runs() if r.name == "B-pilot-xy")
  assert not s.training_done(pilot)
  (tmp_path / "results" / pilot.name).mkdir(parents=True)
  (tmp_path / "results" / pilot.name / "metrics.jsonl").write_text("{}\n")  # copied when trained
  assert s.training_done(pilot)


def test_v2_list_plans_every_job_with_an_eta(tmp_path):
  out = subprocess.run([sys.executable, "experiments/study.py", f"--workroot={tmp_path}", "--list"],
                       cwd=REPO, capture_output=True, text=True, check=True).stdout
  assert "best/xquad-r-centered" in out and "B-pilot-hybrid" in out
  assert "ETA for what is left" in out
  # It reads the committed results_v2/: B's seeds are listed once the pilots fixed the budget.
  fixed = os.path.isfile(os.path.join(study.RESULTS_DIR_V2, study.BUDGET_FILE))
  assert ("listed once the B pilots" in out) != fixed and ("B-xy-seed0" in out) == fixed


def test_runners_of_the_same_command_share_the_runs_out(tmp_path, monkeypatch, capsys):
  """A run another live runner has claimed is skipped (not run twice, no lock error), and every
  claim is released once its run's jobs end, whether they finish or fail."""
  from hybrid_jax import workdir_lock  # pylint: disable=g-import-not-at-top
  s = study.Study(str(tmp_path / "runs"), str(tmp_path / "results"))
  runs = [r for r in study.RUNS if r.name in ("A-mono", "A-xy", "A-hybrid")]
  finished, started = set(), []
  monkeypatch.setattr(s, "done", lambda run: run.name in finished)
  monkeypatch.setattr(s, "jobs", lambda run: iter([("evaluate", None, ["echo", run.name])]))
  monkeypatch.setattr(s, "evaluation_done", lambda run, evaluation: False)
  monkeypatch.setattr(s, "remaining_seconds", lambda runs: 0.0)

  def run_job(run, kind, evaluation, command):
    started.append(run.name)
    if run.name == "A-hybrid":
      raise SystemExit("A-hybrid failed")
    finished.add(run.name)
  monkeypatch.setattr(s, "run_job", run_job)
  monkeypatch.setattr(s, "finished", lambda run: None)

  other_runner = workdir_lock.WorkdirLock(s.claim_dir(next(r for r in runs if r.name == "A-xy")))
  other_runner.acquire()  # its own open file: the flock conflicts as another process's would
  with pytest.raises(SystemExit, match="A-hybrid failed"):
    s.run(runs)
  assert started == ["A-mono", "A-hybrid"]
  assert "A-xy: another runner has it" in capsys.readouterr().out
  other_runner.release()
  assert not os.path.exists(tmp_path / "runs" / study.CLAIMS_DIR / "A-mono")  # released
  finished.add("A-hybrid")
  s.run(runs)  # A-xy is free now: this runner takes it; the finished runs are not claimed again
  assert started == ["A-mono", "A-hybrid", "A-xy"]
  assert os.listdir(tmp_path / "runs" / study.CLAIMS_DIR) == []
