"""The retrieval grid on the built-in synthetic data's held-out ids (the `:runlocal` evaluator).

The synthetic generator (hybrid_jax/data/synthetic.py) holds a `test_fraction` of its question ids
out of training entirely and can write them as LAReQA-format files. This evaluator writes them to a
temporary directory and reads them with the ordinary LAReQA collection reader, so the demo run is
scored by exactly the code that scores XQuAD-R: monolingual, cross-lingual and multilingual
settings over made-up languages whose scripts share no token, where cross-lingual retrieval has to
be learned from X-Y pairs.

Config spec (config.evals.<name>): type "synthetic", every_steps, groups, and `synthetic`: the
generator fields (config.data.synthetic; the trainer fills it in when the spec leaves it empty).
"""

from __future__ import annotations

import tempfile
from typing import Mapping

from hybrid_jax.data import synthetic
from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import evaluators


class SyntheticEvaluator(evaluators.GridEvaluator):
  """Grid evaluation on the synthetic test ids of one generator spec."""

  def __init__(self, synthetic_config: Mapping | None = None, **kwargs):
    super().__init__(**kwargs)
    self.spec = synthetic.SyntheticSpec.from_config(dict(synthetic_config or {}))
    self.spec.validate()
    self.name = "synthetic"

  def _load_collection(self) -> collection_lib.Collection:
    with tempfile.TemporaryDirectory(prefix="hybrid_jax_synthetic_test_") as tmp:
      synthetic.write_lareqa_dir(tmp, self.spec, ids="test")
      return collection_lib.from_lareqa(tmp, name=f"synthetic-test (seed {self.spec.seed})")
