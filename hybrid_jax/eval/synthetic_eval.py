"""The retrieval grid on the built-in synthetic data's held-out ids (the `:runlocal` evaluator).

The synthetic generator (hybrid_jax/data/synthetic.py) holds a `test_fraction` of its question ids
out of training entirely and can write them as LAReQA-format files. This evaluator writes them to a
temporary directory and reads them with the ordinary LAReQA collection reader, so the demo run is
scored by exactly the code that scores XQuAD-R: monolingual, cross-lingual and multilingual
settings over made-up languages whose scripts share no token, where cross-lingual retrieval has to
be learned from X-Y pairs.

Config spec (config.evals.<name>): type "synthetic", every_steps, groups, and `synthetic`: the
generator fields. A run's held-out ids exist only for the generator spec it trained on, so an empty
`synthetic` is filled from the run's data section by `complete_spec` (the trainer's
config.data, or the evaluate command's --config / the workdir's config.json).
"""

from __future__ import annotations

import tempfile
from typing import Mapping

from hybrid_jax.data import synthetic
from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import grid_evaluator

TYPE_NAME = "synthetic"


def complete_spec(spec: Mapping, data_config: Mapping | None) -> dict:
  """A copy of a config.evals spec whose empty `synthetic` field holds the run's generator fields.

  `data_config` is the run's data section (ConfigDict or dict; None or {} when unknown). Specs of
  other types, specs that set `synthetic`, and runs without a synthetic section come back as
  they were (then SyntheticEvaluator uses the generator defaults)."""
  spec = dict(spec)
  if spec.get("type") != TYPE_NAME or spec.get("synthetic"):
    return spec
  fields = (data_config or {}).get("synthetic")
  if fields:
    spec["synthetic"] = fields.to_dict() if hasattr(fields, "to_dict") else dict(fields)
  return spec


class SyntheticEvaluator(grid_evaluator.GridEvaluator):
  """Grid evaluation on the synthetic test ids of one generator spec."""

  type_name = TYPE_NAME

  def __init__(self, synthetic_config: Mapping | None = None, **kwargs):
    super().__init__(**kwargs)
    self.spec = synthetic.SyntheticSpec.from_config(dict(synthetic_config or {}))
    self.spec.validate()
    self.name = "synthetic"

  @classmethod
  def from_spec(cls, name: str, spec: Mapping, **common) -> "SyntheticEvaluator":
    return cls(spec.get("synthetic"), **common)

  def _load_collection(self) -> collection_lib.Collection:
    with tempfile.TemporaryDirectory(prefix="hybrid_jax_synthetic_test_") as tmp:
      synthetic.write_lareqa_dir(tmp, self.spec, ids="test")
      return collection_lib.from_lareqa(tmp, name=f"synthetic-test (seed {self.spec.seed})")
