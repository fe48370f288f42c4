"""The `config.evals` section: evaluators run during and after training (owned by hybrid_jax/eval/)."""

import ml_collections


def evals_config() -> ml_collections.ConfigDict:
  """Name -> evaluator spec. Empty until the evaluator fills it."""
  return ml_collections.ConfigDict()
