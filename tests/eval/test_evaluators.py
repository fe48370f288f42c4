"""The registry of evaluator types: one list, specs built into the right classes, user errors."""

from __future__ import annotations

import pytest

from hybrid_jax import errors
from hybrid_jax.eval import evaluators
from hybrid_jax.eval import runner
from hybrid_jax.eval import synthetic_eval


def test_one_registry_of_types():
  assert evaluators.EVALUATOR_TYPES == ("lareqa", "beir", "synthetic")
  assert {t: cls.type_name for t, cls in evaluators.EVALUATOR_CLASSES.items()} == {
      t: t for t in evaluators.EVALUATOR_TYPES}
  assert evaluators.EVALUATOR_CLASSES["synthetic"] is synthetic_eval.SyntheticEvaluator
  with pytest.raises(TypeError):
    evaluators.EVALUATOR_CLASSES["mine"] = evaluators.GridEvaluator  # read-only
  # The evaluate command's --dataset: the LAReQA sets, then every other registered type.
  assert runner.DATASETS == ("xquad-r", "mlqa-r", "beir", "synthetic")


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
                           r"'beir', 'synthetic'\)"):
    evaluators.build_evaluators({"mine": {"type": "trec"}})
  with pytest.raises(evaluators.EvaluatorConfigError, match=r"unknown LAReQA dataset 'squad'"):
    evaluators.build_evaluators({"x": {"type": "lareqa", "dataset": "squad"}})
  with pytest.raises(evaluators.EvaluatorConfigError, match=r"BeirEvaluator needs data_dir"):
    evaluators.BeirEvaluator("")
  assert issubclass(evaluators.UnknownEvaluatorTypeError, errors.UserError)
  assert issubclass(evaluators.EvaluatorConfigError, errors.UserError)
