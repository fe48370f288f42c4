"""The `config.data` section of the experiment configs (owned by hybrid_jax/data/).

Two defaults: the built-in synthetic data (`:runlocal`, demos, tests) and, with `real_data=True`,
the real parallel QA pairs available offline: MLQA-R (7 languages, 1148 ids in 2-4 languages each)
as the training set, so that XQuAD-R (different articles) stays unseen for evaluation
(LAReQA has no dedicated training set). MLQA-R is CC BY-NC 4.0. Both come from
`python -m hybrid_jax.data.fetch` (data/fetch.py) and are read by the rule in data/locations.py.
"""

import ml_collections


def synthetic_config() -> ml_collections.ConfigDict:
  """`config.data.synthetic`: the generator's knobs (hybrid_jax/data/synthetic.py)."""
  config = ml_collections.ConfigDict()
  config.num_languages = 4  # made-up languages, one script each (lat grk cyr arm geo), at most 5
  config.num_entities = 64  # question ids = entities x relations
  config.num_relations = 12
  config.num_values = 24
  config.coverage = 0.8  # chance that a language other than the first has a given id
  config.test_fraction = 0.2  # ids held out of training for evaluation (never trained on)
  config.seed = 0  # the texts and the tokenizer are a pure function of these fields
  return config


def data_config(batch_type: str = "hybrid", real_data: bool = False, *,
                prefixes: tuple[str, str]) -> ml_collections.ConfigDict:
  """`config.data`. prefixes: (query, passage) input prefixes, the model's own
  (models/presets.input_prefixes): training and evaluation of a run read them from here."""
  config = ml_collections.ConfigDict()
  # --- commonly changed ---
  config.batch_type = batch_type  # mono (X-X-mono) | xy (X-Y) | hybrid | mixed (row-level ablation)
  config.alpha = 0.5  # hybrid: P(batch is mono) (paper: 0.5); mixed: P(row is mono)
  config.source = "lareqa" if real_data else "synthetic"  # synthetic | lareqa | jsonl | tfds
  # lareqa dir / jsonl file (relative: also looked up under $HYBRID_JAX_DATA) / tfds: xquad_r | mlqa_r
  config.path = "mlqa-r" if real_data else ""
  config.languages = ()  # training languages, in this order; () = every language in the source
  config.language_weighting = "uniform"  # mono language draw: uniform | size | temperature
  config.language_temperature = 0.3  # "temperature" weighting: P(L) ~ (ids in L) ** T
  config.repeat_policy = "error"  # batch larger than a language's ids: error | repeat
  # --- inputs ---
  config.query_prefix, config.passage_prefix = prefixes  # the backbone's (presets.input_prefixes)
  config.query_max_length = 64 if real_data else 16  # tokens, special tokens included
  config.passage_max_length = 128 if real_data else 24  # raise (e.g. 256) with passage_with_context
  config.passage_with_context = False  # lareqa: passage = gold sentence + " " + its paragraph
  config.hard_negatives = False  # add each row's hard negative passage (negative_* arrays)
  # Packed sequences (data/packing.py): several texts per row instead of one padded row each;
  # the same embeddings and loss (tests/test_packed_training.py), ~1.7x fewer computed tokens on
  # LAReQA (benchmarks/README.md). False: every text padded to its side's max length.
  config.packing = True
  config.packing_row_length = 128  # L of the packed rows (>= query/passage_max_length)
  config.packing_rows = 0  # R per global batch (a multiple of the batch shards); 0 = chosen
  # --- held-out test part (lareqa; data/lareqa.py HeldoutSplit) and validation ---
  # A share of the question ids, whole articles at a time, that training never sees (nor any
  # sentence of those articles); evaluate them with `evaluate --part=test`. 0 = train on all.
  config.heldout_fraction = 0.0
  config.heldout_unit = "article"  # article | paragraph
  config.heldout_seed = 0
  # Validation: a share of the remaining ids, for the validation loss and best checkpoint.
  config.validation_fraction = 0.1  # question ids held out for validation loss (early stopping)
  # How they are drawn: "id", or whole groups of ids sharing an "article" / "paragraph" (lareqa
  # only), so that no validation gold sentence is a training text; "auto": article for lareqa.
  config.validation_unit = "auto"
  config.validation_batches = 16  # fixed validation list length (covers batch types, languages)
  # Validation batches are the same for every strategy (mono, xy, hybrid), so that validation
  # losses and the best checkpoints they pick compare across runs; "" = the run's own batch type.
  config.validation_batch_type = "hybrid"
  config.validation_alpha = 0.5
  config.seed = 0  # batch t is a pure function of (seed, t)
  # --- input pipeline ---
  config.tf_threads = 4  # tf.data thread pool size (TF never touches accelerators)
  config.prefetch_batches = 4  # batches prepared ahead of the train step
  config.tfds_data_dir = ""  # tfds: prepared datasets ("" = TFDS's default, ~/tensorflow_datasets)
  config.tfds_manual_dir = ""  # tfds: LAReQA files to prepare from if needed ("" = shared data root)
  config.synthetic = synthetic_config()  # used when source == "synthetic"
  return config
