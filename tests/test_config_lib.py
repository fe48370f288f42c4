"""Config argument parsing and the nine experiment configs."""

import glob
import importlib.util
import os

import pytest

from hybrid_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_config_file(path, arg=None):
  spec = importlib.util.spec_from_file_location("config_under_test", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_parse_arg_types_and_flags():
  args = config_lib.parse_arg("runlocal,alpha=0.3,steps=7,langs=en+de", runlocal=False, alpha=0.5,
                              steps=0, langs=(), name="x")
  assert args.runlocal is True
  assert args.alpha == pytest.approx(0.3)
  assert args.steps == 7 and isinstance(args.steps, int)
  assert args.langs == ("en", "de")
  assert args.name == "x"
  assert config_lib.parse_arg("runlocal=false", runlocal=True).runlocal is False


@pytest.mark.parametrize("arg,message", [
    ("alhpa=0.3", "unknown config argument 'alhpa'"),
    ("steps=ten", "expected a int"),
    ("steps", "needs a value"),
    ("runlocal=maybe", "expected true/false"),
])
def test_parse_arg_errors_name_the_problem(arg, message):
  with pytest.raises(config_lib.ConfigArgError, match=message):
    config_lib.parse_arg(arg, runlocal=False, alpha=0.5, steps=0)


def test_all_nine_configs_load_with_their_batch_type():
  paths = sorted(glob.glob(os.path.join(REPO, "configs", "*_*.py")))
  names = {os.path.basename(p)[:-3] for p in paths}
  assert {f"{b}_{t}" for b in ("xlmr", "labse", "me5") for t in ("hybrid", "mono", "xy")} <= names
  for path in paths:
    config = _load_config_file(path)
    batch_type = os.path.basename(path)[:-3].split("_")[1]
    assert config.data.batch_type == batch_type
    assert config.train.learning_rate == pytest.approx(3e-5)


def test_runlocal_shrinks_and_overrides_apply():
  full = _load_config_file(os.path.join(REPO, "configs", "xlmr_hybrid.py"))
  local = _load_config_file(os.path.join(REPO, "configs", "xlmr_hybrid.py"), "runlocal,alpha=0.3")
  assert full.model.hidden_size == 768 and full.model.model_type == "xlm-roberta"
  assert local.model.hidden_size == 64 and local.model.num_hidden_layers == 2
  assert local.data.source == "synthetic"
  assert local.data.alpha == pytest.approx(0.3)
  assert local.train.batch_size < full.train.batch_size


def test_full_configs_never_evaluate_on_their_training_data():
  from hybrid_jax.eval import defaults as eval_defaults  # pylint: disable=g-import-not-at-top
  config = _load_config_file(os.path.join(REPO, "configs", "xlmr_hybrid.py"))
  assert config.data.source == "lareqa" and config.data.path == "mlqa-r"
  assert sorted(config.evals) == ["xquad_r"]  # train on MLQA-R, test on XQuAD-R (domain shift)
  assert eval_defaults.in_domain_evals(config.evals, config.data) == []
  # A user who trains on XQuAD-R instead (the TFDS name or a directory) is warned about it.
  for path in ("xquad_r", "/data/lareqa/xquad-r/"):
    data = dict(config.data, path=path, source="tfds" if "_" in path else "lareqa")
    assert eval_defaults.in_domain_evals(config.evals, data) == ["xquad_r"]
  assert sorted(eval_defaults.evals_config()) == ["mlqa_r", "xquad_r"]



@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_input_prefixes_come_from_the_backbone_preset(arg):
  """multilingual-e5 was trained with lower-case "query: " / "passage: " (its model card); the
  backbones without prefixes of their own take the paper's E5-style capitalised ones."""
  expected = {"me5": ("query: ", "passage: "), "xlmr": ("Query: ", "Passage: "),
              "labse": ("Query: ", "Passage: ")}
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*_*.py"))):
    config = _load_config_file(path, arg)
    family = os.path.basename(path).split("_")[0]
    assert (config.data.query_prefix, config.data.passage_prefix) == expected[family], path
