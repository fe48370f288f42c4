"""Evaluation during training: config.evals at their every_steps, scored with the current params.

The trainer builds one `PeriodicEvaluation` before its first step and asks it at every step:

    evaluation = PeriodicEvaluation(config, workdir, encoder_config, tokenizer, log=log_fn)
    if due := evaluation.due(step, last_step=config.train.num_steps, start_step=start_step):
      evaluation.run(due, step, encoder_params_host, writer)   # NumPy float32 encoder params
    evaluation.results  # name -> results dict (results.json schema) of the latest run

Schedule (config.evals.<name>.every_steps, eval/defaults.py): N > 0 every N steps, at step 0 too,
but not again at the step a resumed run starts from (it was scored before the resume); 0 only at
the last step; -1 switched off (the evaluator is not even built). Every evaluator runs at the
last step.

The evaluators are built, and their collections read, in the constructor, so a bad path fails
before hours of training rather than after. Their text embedders are kept in a small process-wide
cache keyed by (encoder config, tokenizer, max length, batch size) and get each run's parameters
through `TextEmbedder.set_params`, so later runs (and later training runs in the same process,
e.g. tests and sweeps) reuse the compiled shapes.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from typing import Callable, Mapping, Sequence

import jax

from hybrid_jax import checkpointing
from hybrid_jax.eval import defaults as eval_defaults
from hybrid_jax.eval import evaluators as evaluators_lib
from hybrid_jax.eval import synthetic_eval
from hybrid_jax.models import inference

# (encoder config, tokenizer digest, max_length, batch size) -> TextEmbedder, oldest first. Four
# entries: the query and passage embedders of two models, enough for a sweep's alternating runs.
_EMBEDDERS: collections.OrderedDict = collections.OrderedDict()
_MAX_CACHED_EMBEDDERS = 4

_REPORTED_SETTINGS = ("monolingual", "cross_lingual", "multilingual")


def log_on_first_process(message: str) -> None:
  """The default log: stderr, once per job (process 0), not once per host."""
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def evaluator_specs(config) -> dict[str, dict]:
  """name -> spec of the config.evals entries that are switched on, synthetic specs completed
  with the run's generator fields (synthetic_eval.complete_spec)."""
  specs = {}
  for name, spec in dict(config.get("evals") or {}).items():
    if int(spec.get("every_steps", 0)) == -1:  # switched off (a command line cannot delete it)
      continue
    specs[name] = synthetic_eval.complete_spec(spec, config.data)
  return specs


class PeriodicEvaluation:
  """config.evals, built before training (bad paths fail early), run with the current params."""

  def __init__(self, config, workdir: str, encoder_config, tokenizer,
               log: Callable[[str], None] = log_on_first_process,
               training_languages: Sequence[str] | None = None):
    """
    Args:
      config: the experiment config (evals, data prefixes / lengths / synthetic, train).
      workdir: the training run's directory; reports go to <workdir>/eval/<name>-step<step>.
      encoder_config: the architecture of the parameters `run` will get.
      tokenizer: the run's tokenizer (data.tokenization.Tokenizer).
      log: where the one-line summaries and warnings go.
      training_languages: the languages the run trains on; the summaries then also average over
        the evaluation languages not among them (an "unseen" group).
    """
    specs = evaluator_specs(config)
    self.every = {name: int(spec.get("every_steps", 0)) for name, spec in specs.items()}
    # Progress lines would interleave with the training log; the summary line says enough.
    self.evaluators: dict[str, evaluators_lib.GridEvaluator] = evaluators_lib.build_evaluators(
        specs, query_prefix=config.data.query_prefix, passage_prefix=config.data.passage_prefix,
        show_progress=False, training_languages=training_languages)
    for evaluator in self.evaluators.values():
      _ = evaluator.collection  # read and validate the data now, not after hours of training
    self.log = log
    for name in eval_defaults.in_domain_evals(specs, config.data):
      log(f"warning: evaluator {name!r} scores {config.data.path!r}, the data this run trains on "
          "(in-domain). The paper keeps evaluation sets out of training; remove it with "
          f"--config.evals.{name}.every_steps=-1 or train on other data.")
    self.workdir = workdir
    self.results: dict[str, dict] = {}
    self._embedder_args = dict(config=encoder_config, tokenizer=tokenizer,
                               batch_size=int(config.train.get("eval_batch_size", 128)),
                               dtype=encoder_config.dtype)
    # Hashing the tokenizer's JSON costs a few ms; only runs with evaluators need it.
    self._tokenizer_key = hash(tokenizer.hf_tokenizer.to_str()) if self.evaluators else None
    self._max_lengths = (int(config.data.query_max_length), int(config.data.passage_max_length))

  def embedders(self, encoder_params_host) -> tuple[inference.TextEmbedder,
                                                    inference.TextEmbedder]:
    """(query embedder, passage embedder) holding `encoder_params_host`; the same objects for
    equal lengths, and across calls and instances with the same model (process-wide cache)."""
    out = []
    for length in self._max_lengths:
      key = (self._embedder_args["config"], self._tokenizer_key, length,
             self._embedder_args["batch_size"])
      embedder = _EMBEDDERS.get(key)
      if embedder is None:
        embedder = inference.TextEmbedder(params=encoder_params_host, max_length=length,
                                          **self._embedder_args)
        while len(_EMBEDDERS) >= _MAX_CACHED_EMBEDDERS:
          _EMBEDDERS.popitem(last=False)
        _EMBEDDERS[key] = embedder
      else:
        embedder.set_params(encoder_params_host)
        _EMBEDDERS.move_to_end(key)
      out.append(embedder)
    return out[0], out[1]

  def due(self, step: int, last_step: int, start_step: int) -> list[str]:
    """Names of the evaluators to run after `step` (see the module docstring)."""
    names = []
    for name, every in self.every.items():
      if step == last_step or (every > 0 and step % every == 0 and
                               (step > start_step or step == 0)):
        names.append(name)
    return names

  def run(self, names: Sequence[str], step: int, encoder_params_host, writer) -> None:
    """Scores the named evaluators with these parameters: results to `self.results`, scalars
    "eval/<name>/<summary>/<metric>" to `writer.write_scalars(step, ...)`, report files to
    <workdir>/eval/<name>-step<step> (process 0, local workdirs only), one log line each."""
    query_embedder, passage_embedder = self.embedders(encoder_params_host)
    embed_queries, embed_passages = inference.embed_fns(query_embedder, passage_embedder)
    for name in names:
      evaluator = self.evaluators[name]
      output_dir = None
      if jax.process_index() == 0 and not checkpointing.is_shared_path(self.workdir):
        output_dir = os.path.join(self.workdir, "eval", f"{name}-step{step}")
      started = time.time()
      results = evaluator.evaluate(embed_queries, output_dir, passage_embed_fn=embed_passages,
                                   header_lines=[f"Training run {self.workdir}, step {step}."])
      self.results[name] = results
      writer.write_scalars(step, evaluators_lib.scalar_metrics(results, prefix=f"eval/{name}"))
      self.log(f"eval {name} at step {step} ({time.time() - started:.1f}s): mAP "
               + _map_summary(results["summary"])
               + (f"; files in {output_dir}" if output_dir else ""))


def _map_summary(summary: Mapping) -> str:
  return ", ".join(f"{setting} {summary[setting]['map']:.3f}" for setting in _REPORTED_SETTINGS
                   if summary.get(setting) and "map" in summary[setting])
