"""Evaluators of the LAReQA grid, and the one registry of evaluator types (config.evals specs).

The same objects serve the command line (`python -m hybrid_jax.evaluate`) and periodic
evaluation inside training (eval/periodic.py):

    evaluator = LareqaEvaluator("xquad-r", languages=("en", "de"), groups={"unseen": ("el",)})
    results = evaluator.evaluate(embed_fn, output_dir=None)   # dict, results.json schema
    scalars = scalar_metrics(results, prefix="xquad_r")       # for metric writers

Types (the `type` of a config.evals spec, eval/defaults.py): "lareqa" (XQuAD-R / MLQA-R
directory), "beir" (a BEIR-format directory, searched at corpus scale: search/beir_eval.py),
"synthetic" (the built-in synthetic data's held-out ids, eval/synthetic_eval.py) and "mkqa"
(MKQA queries against a BEIR-format corpus, answer recall: search/mkqa.py).
`EVALUATOR_CLASSES` maps each to its class and is the only list of them: `EVALUATOR_TYPES` (the
trainer's config check), `build_evaluators` (config.evals) and the evaluate command line
(eval/runner.py) all read it. The base classes live in eval/grid_evaluator.py and
search/corpus_eval.py, so that type modules import them and this module imports the types, never
the reverse.
"""

from __future__ import annotations

import types
from typing import Mapping, Sequence

import numpy as np

from hybrid_jax.data import lareqa
from hybrid_jax.data import locations
from hybrid_jax.eval import collection as collection_lib
from hybrid_jax.eval import grid_evaluator
from hybrid_jax.eval import synthetic_eval
from hybrid_jax.search import beir_eval
from hybrid_jax.search import mkqa

# The base names, for callers that build evaluators by hand (benchmarks, notebooks).
EmbedFn = grid_evaluator.EmbedFn
GridEvaluator = grid_evaluator.GridEvaluator
EvaluatorConfigError = grid_evaluator.EvaluatorConfigError

LAREQA_DATASETS = ("xquad-r", "mlqa-r")

# Corpus-scale evaluators (search/corpus_eval.py): the same constructor arguments, `collection`
# and `evaluate`, so config.evals, periodic evaluation and the command line treat them alike.
BeirEvaluator = beir_eval.BeirEvaluator
MkqaEvaluator = mkqa.MkqaEvaluator


class UnknownEvaluatorTypeError(EvaluatorConfigError):
  """A config.evals spec names a type that no evaluator class registers."""


class LareqaEvaluator(GridEvaluator):
  """XQuAD-R or MLQA-R from a local LAReQA directory (`<lang>.json` per language)."""

  type_name = "lareqa"

  def __init__(self, dataset: str = "xquad-r", data_dir: str = "",
               languages: Sequence[str] = (), candidate_context: bool = False,
               part: str = "all", heldout: lareqa.HeldoutSplit | None = None, **kwargs):
    super().__init__(**kwargs)
    if dataset not in LAREQA_DATASETS:
      raise EvaluatorConfigError(f"unknown LAReQA dataset {dataset!r}; expected one of "
                                 f"{LAREQA_DATASETS}")
    if part not in lareqa.PARTS:
      raise EvaluatorConfigError(f"LAReQA part {part!r}; expected one of {lareqa.PARTS}")
    if part != "all" and (heldout is None or not heldout.fraction):
      raise EvaluatorConfigError(
          f"LAReQA part {part!r} needs a held-out split with heldout_fraction > 0 (the run's "
          "data.heldout_fraction); part 'all' scores the whole directory")
    self.dataset = dataset
    self.data_dir = locations.dataset_dir(dataset, data_dir)
    self.languages = tuple(languages)
    self.candidate_context = candidate_context
    self.part = part
    self.heldout = heldout.validate("the evaluator's") if heldout is not None else None
    self.name = dataset if part == "all" else f"{dataset}-{part}"

  @classmethod
  def from_spec(cls, name: str, spec: Mapping, **common) -> "LareqaEvaluator":
    part = spec.get("part", "all") or "all"
    heldout = lareqa.HeldoutSplit.from_config(spec) if part != "all" else None
    return cls(spec.get("dataset", "xquad-r"), spec.get("data_dir", ""),
               tuple(spec.get("languages") or ()), bool(spec.get("candidate_context", False)),
               part, heldout, **common)

  def _load_collection(self) -> collection_lib.Collection:
    return collection_lib.from_lareqa(self.data_dir, self.languages or None,
                                      candidate_context=self.candidate_context, name=self.name,
                                      part=self.part, heldout=self.heldout)


# type name -> class; read-only, so that no caller grows a private list of its own.
EVALUATOR_CLASSES: Mapping[str, type] = types.MappingProxyType({
    cls.type_name: cls
    for cls in (LareqaEvaluator, BeirEvaluator, synthetic_eval.SyntheticEvaluator,
                MkqaEvaluator)})
EVALUATOR_TYPES: tuple[str, ...] = tuple(EVALUATOR_CLASSES)


def scalar_metrics(results: dict, prefix: str = "") -> dict[str, float]:
  """Flat {"<prefix>/<summary>/<metric>": value} of the summaries, for metric writers."""
  out = {}
  head = f"{prefix}/" if prefix else ""
  for group, entry in results["summary"].items():
    for k, v in (entry or {}).items():
      if isinstance(v, (int, float)) and not (isinstance(v, float) and np.isnan(v)):
        out[f"{head}{group}/{k}"] = float(v)
  return out


def build_evaluator(name: str | None, spec: Mapping, *, query_prefix: str = "Query: ",
                    passage_prefix: str = "Passage: ", mesh=None, show_progress: bool = True,
                    normalize: bool = True, where: str = "config.evals",
                    training_languages: Sequence[str] | None = None) -> GridEvaluator:
  """The evaluator of one spec (see `build_evaluators`).

  `name` is the spec's config.evals key (a BEIR evaluator's report name; None: the directory's
  name); `where` says in errors where the spec came from."""
  spec = dict(spec)
  kind = spec.get("type")
  cls = EVALUATOR_CLASSES.get(kind)
  if cls is None:
    field = f"{where}.{name}.type" if name is not None else f"{where} type"
    raise UnknownEvaluatorTypeError(f"{field} = {kind!r}; expected one of {EVALUATOR_TYPES}")
  common = dict(query_prefix=spec.get("query_prefix") or query_prefix,
                passage_prefix=spec.get("passage_prefix") or passage_prefix,
                groups={k: tuple(v) for k, v in dict(spec.get("groups") or {}).items()},
                normalize=normalize, mesh=mesh, show_progress=show_progress,
                training_languages=training_languages)
  return cls.from_spec(name, spec, **common)


def build_evaluators(evals_config: Mapping, *, query_prefix: str = "Query: ",
                     passage_prefix: str = "Passage: ", mesh=None,
                     show_progress: bool = True,
                     training_languages: Sequence[str] | None = None
                     ) -> dict[str, GridEvaluator]:
  """Evaluators from `config.evals` (eval/defaults.py): name -> spec with a `type`.

  Specs: type "lareqa" (dataset, data_dir, languages, candidate_context), "beir" (data_dir,
  split, lang) or "synthetic" (synthetic: the generator fields, see
  synthetic_eval.complete_spec); all take groups; query_prefix / passage_prefix override the
  arguments when non-empty. `every_steps` is read by eval/periodic.py, not here.
  """
  return {name: build_evaluator(name, spec, query_prefix=query_prefix,
                                passage_prefix=passage_prefix, mesh=mesh,
                                show_progress=show_progress,
                                training_languages=training_languages)
          for name, spec in dict(evals_config).items()}
