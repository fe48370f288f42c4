"""The registry of evaluator types: one list, specs built into the right classes, user errors."""

from __future__ import annotations

import pytest

from hybrid_jax import errors
from hybrid_jax.eval import evaluators
from hybrid_jax.eval import runner
from hybrid_jax.eval import synthetic_eval


def test_one_registry_of_types():
  assert evaluators.EVALUATOR_TYPES == ("lareqa", "beir", "synthetic", "mkqa")
  assert {t: cls.type_name for t, cls in evaluators.EVALUATOR_CLASSES.items()} == {
      t: t for t in evaluators.EVALUATOR_TYPES}
  assert evaluators.EVALUATOR_CLASSES["synthetic"] is synthetic_eval.SyntheticEvaluator
  with pytest.raises(TypeError):
    evaluators.EVALUATOR_CLASSES["mine"] = evaluators.GridEvaluator  # read-only
  # The evaluate command's --dataset: the LAReQA sets, then every other registered type.
  assert runner.DATASETS == ("xquad-r", "mlqa-r", "beir", "synthetic", "mkqa")


def test_specs_build_their_classes_without_reading_data(tmp_path):
  built = evaluators.build_evaluators({
      "x": {"type": "lareqa", "dataset": "mlqa-r", "data_dir": str(tmp_path / "absent"),
            "languages": ["en", "de"], "groups": {"unseen": ["el"]}},
      "b": {"type": "beir", "data_dir": str(tmp_path / "sw"), "split": "dev",
            "query_prefix": "query: "},
      "s": {"type": "synthetic", "synthetic": {"seed": 3}},
  }, query_prefix="Q: ", passage_prefix="P: ", show_progress=False)
  x, b, s = built["x"], built["b"], built["s"]
  assert isinstance(x, evaluators.LareqaEvaluator) and x.dataset == "mlqa-r"
  assert x.languages == ("en", "de") and x.groups == {"unseen": ("el",)}
  assert (x.query_prefix, x.passage_prefix, x.show_progress) == ("Q: ", "P: ", False)
  assert isinstance(b, evaluators.BeirEvaluator) and (b.split, b.name) == ("dev", "b")
  assert b.query_prefix == "query: "  # a spec's own prefix wins
  assert isinstance(s, synthetic_eval.SyntheticEvaluator) and s.spec.seed == 3


def test_user_errors():
  with pytest.raises(evaluators.UnknownEvaluatorTypeError,
                     match=r"config\.evals\.mine\.type = 'trec'; expected one of \('lareqa', "
                           r"'beir', 'synthetic', 'mkqa'\)"):
    evaluators.build_evaluators({"mine": {"type": "trec"}})
  with pytest.raises(evaluators.EvaluatorConfigError, match=r"unknown LAReQA dataset 'squad'"):
    evaluators.build_evaluators({"x": {"type": "lareqa", "dataset": "squad"}})
  with pytest.raises(evaluators.EvaluatorConfigError, match=r"BeirEvaluator needs data_dir"):
    evaluators.BeirEvaluator("")
  assert issubclass(evaluators.UnknownEvaluatorTypeError, errors.UserError)
  assert issubclass(evaluators.EvaluatorConfigError, errors.UserError)


def test_unseen_group_is_derived_from_the_training_languages():
  from hybrid_jax.eval import grid_evaluator  # pylint: disable=g-import-not-at-top
  import eval_helpers  # pylint: disable=g-import-not-at-top
  # Training on MLQA-R, evaluating on XQuAD-R: the paper's unseen languages are el, ru, th, tr.
  xquad = ("ar", "de", "el", "en", "es", "hi", "ru", "th", "tr", "vi", "zh")
  mlqa = ("ar", "de", "en", "es", "hi", "vi", "zh")
  assert grid_evaluator.unseen_languages(xquad, mlqa) == ("el", "ru", "th", "tr")
  assert grid_evaluator.unseen_languages(mlqa, xquad) == ()
  collection = eval_helpers.tiny_collection()  # en, de
  groups = lambda **kw: grid_evaluator.GridEvaluator(collection, **kw).language_groups()
  assert groups() == {}  # training languages unknown (a zero-shot model): no unseen group
  assert groups(training_languages=("en", "fr")) == {"unseen": ("de",)}
  assert groups(training_languages=("en", "de")) == {}  # nothing unseen: no empty group
  # User groups are kept; a user-given "unseen" wins over the derived one.
  assert groups(training_languages=("en",), groups={"low": ("de",)}) == {
      "low": ("de",), "unseen": ("de",)}
  assert groups(training_languages=("en",), groups={"unseen": ("en",)}) == {"unseen": ("en",)}
  built = evaluators.build_evaluator("x", {"type": "lareqa", "dataset": "xquad-r"},
                                     training_languages=mlqa)
  assert built.training_languages == mlqa


def test_evaluate_workdir_takes_the_runs_training_languages(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from hybrid_jax import checkpointing  # pylint: disable=g-import-not-at-top
  (tmp_path / checkpointing.TRAINING_LANGUAGES_FILE).write_text(json.dumps(["en", "de"]))
  with_run = runner.make_evaluator(runner.RunOptions(dataset="xquad-r", workdir=str(tmp_path),
                                                     show_progress=False))
  assert with_run.training_languages == ("en", "de")
  zero_shot = runner.make_evaluator(runner.RunOptions(dataset="xquad-r", show_progress=False))
  assert zero_shot.training_languages is None
