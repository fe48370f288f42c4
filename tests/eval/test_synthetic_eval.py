"""The :runlocal evaluator: the synthetic data's held-out ids scored on the grid."""

import numpy as np

from hybrid_jax.data import synthetic
from hybrid_jax.eval import evaluators


def test_synthetic_evaluator_reads_the_held_out_ids_and_scores_an_oracle_perfectly():
  spec = {"num_languages": 3, "num_entities": 8, "num_relations": 4, "test_fraction": 0.5,
          "seed": 1}
  (evaluator,) = evaluators.build_evaluators(
      {"synthetic": {"type": "synthetic", "synthetic": spec}}, show_progress=False).values()
  collection = evaluator.collection
  held_out = set(synthetic.test_ids(synthetic.SyntheticSpec(**spec)))
  assert {uid.rsplit("_", 1)[0] for uid in collection.query_uids} == held_out
  assert sorted(collection.languages) == ["cyr", "grk", "lat"]

  # Oracle: a query and a candidate share a direction iff they belong to the same question id.
  ids = sorted(held_out)
  query_ids = [uid.rsplit("_", 1)[0] for uid in collection.query_uids]
  relevant = collection.relevant
  cand_id = {}
  for q, rel in zip(query_ids, relevant):
    for c, _ in rel:
      cand_id[c] = q

  def embed(texts, prefix):
    out = np.zeros((len(texts), len(ids) + 1), np.float32)
    if prefix == evaluator.query_prefix:
      for row, q in enumerate(query_ids):
        out[row, ids.index(q)] = 1.0
    else:
      for row in range(len(texts)):
        out[row, ids.index(cand_id[row]) if row in cand_id else len(ids)] = 1.0
    return out

  results = evaluator.evaluate(embed)
  for setting in ("monolingual", "cross_lingual", "multilingual"):
    assert results["summary"][setting]["map"] == 1.0, setting


def test_complete_spec_fills_an_empty_synthetic_spec_from_the_run():
  import ml_collections  # pylint: disable=g-import-not-at-top
  from hybrid_jax.eval import synthetic_eval  # pylint: disable=g-import-not-at-top

  run_fields = {"num_languages": 2, "seed": 5}
  data = ml_collections.ConfigDict({"synthetic": run_fields})
  spec = {"type": "synthetic", "every_steps": 0}
  completed = synthetic_eval.complete_spec(spec, data)
  assert completed == {**spec, "synthetic": run_fields} and "synthetic" not in spec  # a copy
  assert isinstance(completed["synthetic"], dict)
  assert synthetic_eval.complete_spec(spec, {"synthetic": run_fields}) == completed
  own = {"type": "synthetic", "synthetic": {"seed": 9}}
  assert synthetic_eval.complete_spec(own, data) == own
  assert synthetic_eval.complete_spec({"type": "lareqa"}, data) == {"type": "lareqa"}
  assert synthetic_eval.complete_spec(spec, {}) == spec  # no synthetic section: defaults apply
  assert synthetic_eval.complete_spec(spec, None) == spec
