"""The `config.evals` section: evaluators run during and after training (owned by hybrid_jax/eval/).

Each entry is name -> spec, built by `hybrid_jax.eval.evaluators.build_evaluators` and run during
training by `hybrid_jax.eval.periodic.PeriodicEvaluation`:
  type          one of evaluators.EVALUATOR_TYPES: "lareqa" (XQuAD-R / MLQA-R directory), "beir"
                (MIRACL-style BEIR directory, searched at corpus scale), "synthetic" (the
                synthetic data's held-out ids) or "mkqa" (MKQA queries against a BEIR corpus)
  beir / mkqa   data_dir + split (beir); mkqa_file, corpus_dir, languages, answer_language
                ("en" | "query") (mkqa); both: corpus_store, store_shard_size, store_dtype,
                trec_depth, search_dtype (search/corpus_eval.py CorpusEvaluator)
  dataset       lareqa: "xquad-r" | "mlqa-r"
  data_dir      "" = $HYBRID_JAX_DATA/<dataset> (data/locations.py); beir: required
  languages     () = every <lang>.json in data_dir
  part          lareqa: "all" (default) | "test" | "train" of the held-out split given by
                heldout_fraction / heldout_unit / heldout_seed (data/lareqa.py HeldoutSplit)
  synthetic     synthetic: the generator fields; empty = config.data.synthetic
  every_steps   trainer: run every N steps (and at step 0 and at the end); 0 = at the end only;
                -1 = switched off (a command line cannot delete a config entry)
  groups        language groups averaged in the summaries, e.g. {"low_resource": ("el", "hi",
                "th", "tr", "vi")}; during training (and `evaluate --workdir`) an "unseen" group,
                the evaluation languages the run does not train on, is added unless given here
Query/passage prefixes come from config.data unless a spec sets query_prefix / passage_prefix.
"""

import os

import ml_collections

def lareqa_spec(dataset: str, every_steps: int) -> ml_collections.ConfigDict:
  spec = ml_collections.ConfigDict()
  spec.type = "lareqa"
  spec.dataset = dataset  # xquad-r | mlqa-r
  spec.data_dir = ""  # "" = $HYBRID_JAX_DATA/<dataset>
  spec.languages = ()  # () = all languages in data_dir
  spec.candidate_context = False  # candidate = sentence (+ " " + paragraph when True)
  spec.every_steps = every_steps  # 0 = only at the end of training
  # "unseen" is derived from the training languages (grid_evaluator.unseen_languages).
  spec.groups = ml_collections.ConfigDict()
  return spec


def evals_config(training_dataset: str = "") -> ml_collections.ConfigDict:
  """Name -> evaluator spec: the full XQuAD-R grid periodically, MLQA-R at the end.

  The dataset a run trains on ("xquad-r" | "mlqa-r") is left out: the paper never evaluates on its
  training data, and train-on-one / test-on-the-other is its domain-shift question."""
  config = ml_collections.ConfigDict()
  if training_dataset != "xquad-r":
    config.xquad_r = lareqa_spec("xquad-r", every_steps=2000)
  if training_dataset != "mlqa-r":
    config.mlqa_r = lareqa_spec("mlqa-r", every_steps=0)
  return config


def in_domain_evals(evals_config, data_config) -> list[str]:
  """Names of LAReQA evaluators that score the dataset the run trains on (to warn about); its
  held-out test part (part "test") is what a run may score in domain, so it is not listed."""
  if data_config.get("source") not in ("lareqa", "tfds"):
    return []
  trained = os.path.basename(os.path.normpath(str(data_config.get("path", "")))).replace("_", "-")
  return [name for name, spec in dict(evals_config or {}).items()
          if spec.get("type") == "lareqa" and trained and spec.get("part", "all") == "all" and (
              os.path.basename(os.path.normpath(spec.get("data_dir") or spec.get("dataset", "")))
              .replace("_", "-") == trained)]
