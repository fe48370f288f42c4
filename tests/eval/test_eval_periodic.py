"""PeriodicEvaluation (the trainer's config.evals) on the synthetic data's held-out ids: schedule,
spec completion, scalars and reports of a run, and embedders reused with new parameters."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from hybrid_jax.data import synthetic
from hybrid_jax.eval import periodic
from hybrid_jax.models import encoder as encoder_lib

GENERATOR = {"num_languages": 2, "num_entities": 6, "num_relations": 3, "test_fraction": 0.5,
             "seed": 1}
OWN_GENERATOR = dict(GENERATOR, seed=2)


class FakeWriter:
  def __init__(self):
    self.scalars: list[tuple[int, dict]] = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))


def _config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "data": {"source": "synthetic", "path": "", "query_prefix": "Query: ",
               "passage_prefix": "Passage: ", "query_max_length": 16, "passage_max_length": 16,
               "synthetic": GENERATOR},
      "train": {"eval_batch_size": 16},
      "evals": {
          "every10": {"type": "synthetic", "every_steps": 10, "groups": {}},
          "at_end": {"type": "synthetic", "every_steps": 0},
          "off": {"type": "synthetic", "every_steps": -1, "synthetic": {"num_languages": 99}},
          "own": {"type": "synthetic", "every_steps": 0, "synthetic": OWN_GENERATOR},
      }})


def _encoder(vocab_size: int) -> encoder_lib.EncoderConfig:
  return encoder_lib.EncoderConfig(
      model_type="bert", vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1,
      num_attention_heads=2, intermediate_size=32, max_position_embeddings=32, type_vocab_size=2,
      pad_token_id=0, layer_norm_eps=1e-12)


def test_periodic_evaluation_on_the_synthetic_test_ids(tmp_path, capsys):
  tokenizer = synthetic.build_tokenizer(synthetic.SyntheticSpec(**GENERATOR))
  encoder_config = _encoder(tokenizer.vocab_size)
  params_a, params_b = (jax.device_get(encoder_lib.init_params(encoder_config, jax.random.key(s)))
                        for s in (0, 1))
  logged = []
  evaluation = periodic.PeriodicEvaluation(_config(), str(tmp_path), encoder_config, tokenizer,
                                           log=logged.append)

  # Switched off (-1): never built, so even its invalid generator spec goes unread.
  assert sorted(evaluation.evaluators) == ["at_end", "every10", "own"]
  # An empty spec gets the run's generator; a spec of its own keeps it.
  assert evaluation.evaluators["every10"].spec == synthetic.SyntheticSpec(**GENERATOR)
  assert evaluation.evaluators["own"].spec == synthetic.SyntheticSpec(**OWN_GENERATOR)

  # every_steps 10: step 0 and every 10th; 0: the last step only; all run at the last step.
  assert evaluation.due(0, 30, 0) == ["every10"]
  assert evaluation.due(5, 30, 0) == []
  assert evaluation.due(20, 30, 0) == ["every10"]
  assert sorted(evaluation.due(30, 30, 0)) == ["at_end", "every10", "own"]
  # A run resumed at step 20 was scored there before the resume; step 0 is always scored.
  assert evaluation.due(20, 30, 20) == []
  assert evaluation.due(0, 30, 0) == evaluation.due(0, 30, 20) == ["every10"]

  writer = FakeWriter()
  evaluation.run(["every10"], 0, params_a, writer)
  ((step, scalars),) = writer.scalars
  results = evaluation.results["every10"]
  assert step == 0 and set(evaluation.results) == {"every10"}
  assert scalars["eval/every10/monolingual/map"] == results["summary"]["monolingual"]["map"]
  assert all(k.startswith("eval/every10/") for k in scalars)
  assert {"eval/every10/cross_lingual/map", "eval/every10/multilingual/map"} <= set(scalars)
  with open(tmp_path / "eval" / "every10-step0" / "results.json", encoding="utf-8") as f:
    assert json.load(f)["summary"] == results["summary"]
  (line,) = logged
  assert line.startswith("eval every10 at step 0 (") and "monolingual" in line
  assert "embedded" not in capsys.readouterr().err  # the evaluators print no progress lines

  # The embedders are kept and get new parameters: the same objects, no new shapes compiled,
  # and the embeddings a fresh embedder with those parameters gives.
  query_embedder, passage_embedder = evaluation.embedders(params_a)
  assert query_embedder is passage_embedder  # equal max lengths: one embedder
  texts = evaluation.evaluators["every10"].collection.query_texts
  embedded_a = query_embedder.embed(texts, prefix="Query: ")
  shapes = set(query_embedder.compiled_shapes)
  again, _ = evaluation.embedders(params_b)
  assert again is query_embedder
  embedded_b = again.embed(texts, prefix="Query: ")
  assert again.compiled_shapes == shapes
  assert np.abs(embedded_a - embedded_b).max() > 1e-3
  fresh = periodic.PeriodicEvaluation(_config(), str(tmp_path), encoder_config, tokenizer,
                                      log=logged.append)
  assert fresh.embedders(params_b)[0] is query_embedder  # the cache is process-wide

  evaluation.run(["at_end", "own"], 30, params_b, writer)
  assert [s for s, _ in writer.scalars] == [0, 30, 30]
  assert set(evaluation.results) == {"every10", "at_end", "own"}
  assert os.path.isfile(tmp_path / "eval" / "own-step30" / "results.json")
