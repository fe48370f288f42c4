"""The `config.data` section of the experiment configs (owned by hybrid_jax/data/)."""

import ml_collections


def data_config(batch_type: str = "hybrid") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.source = "synthetic"  # synthetic | lareqa | jsonl
  config.path = ""  # lareqa: dir of <lang>.json; jsonl: a parallel-examples file
  config.languages = ()  # training languages; () = every language in the source
  config.batch_type = batch_type  # mono (X-X-mono) | xy (X-Y) | hybrid | mixed
  config.alpha = 0.5  # hybrid: probability that a batch is mono (paper: 0.5)
  config.language_weighting = "uniform"  # mono language draw: uniform | size | temperature
  config.language_temperature = 0.3  # exponent for "temperature" weighting (size ** T)
  config.query_prefix = "Query: "  # E5-style input prefixes (paper)
  config.passage_prefix = "Passage: "
  config.query_max_length = 64  # tokens, special tokens included
  config.passage_max_length = 128
  config.passage_with_context = False  # lareqa: passage = sentence + its paragraph
  config.hard_negatives = False  # add each example's hard negative passage to the batch
  config.validation_fraction = 0.05  # held-out ids for validation loss (early stopping)
  config.seed = 0  # batch t is a pure function of (seed, t)
  return config
