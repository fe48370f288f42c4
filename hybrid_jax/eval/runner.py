"""What `python -m hybrid_jax.evaluate` does: pick the source, encode (cached), score, report.

Sources (exactly one): a Hugging Face model directory, a training workdir (checkpoint step), or
a directory of precomputed embeddings (embeddings_io format). Datasets: XQuAD-R / MLQA-R (LAReQA
directories), the synthetic data, and the corpus-scale ones (search/corpus_eval.py): one
BEIR-format directory, or MKQA queries against a BEIR-format corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shlex
import sys
import time
from typing import Sequence

import numpy as np

from hybrid_jax import errors
from hybrid_jax.eval import evaluators as evaluators_lib
from hybrid_jax.eval import report
from hybrid_jax.eval import synthetic_eval

# --dataset: a LAReQA dataset name (type "lareqa"), or any other registered evaluator type.
DATASETS = evaluators_lib.LAREQA_DATASETS + tuple(
    t for t in evaluators_lib.EVALUATOR_TYPES if t != evaluators_lib.LareqaEvaluator.type_name)


class EvaluateUsageError(errors.UserError):
  """The command line asks for something inconsistent."""


class MissingPathError(EvaluateUsageError):
  """A directory named on the command line does not exist (or is a file)."""


@dataclasses.dataclass
class RunOptions:
  """Everything one evaluation run needs (the command-line flags, minus parsing)."""
  dataset: str = "xquad-r"
  data_dir: str = ""
  languages: Sequence[str] = ()
  candidate_context: bool = False
  part: str = "all"  # LAReQA: all | test | train (of a held-out split, lareqa.HeldoutSplit)
  heldout_fraction: float = -1.0  # -1: the run's data.heldout_fraction (when it trained here)
  heldout_unit: str = ""  # "": the run's, else article
  heldout_seed: int = -1  # -1: the run's, else 0
  beir_split: str = "test"
  mkqa_file: str = ""  # mkqa: the official mkqa.jsonl[.gz]
  corpus_dir: str = ""  # mkqa: the BEIR-format corpus directory (corpus.jsonl)
  answer_language: str = "en"  # mkqa: "en" or "query" (the query's own language)
  corpus_store: str = ""  # beir / mkqa: embedding store ("" = <output_dir>/embeddings/corpus)
  store_shard_size: int = 100_000  # passages per store shard (the unit of resume)
  store_dtype: str = "float32"  # float32 | float16 on disk
  trec_depth: int = 0  # documents per query in run.trec (0: beir 1000, mkqa 100)
  search_dtype: str = "float32"  # float32 | bfloat16 embeddings in the exact search
  model: str = ""
  workdir: str = ""
  step: str = "best"
  config: object = None  # ml_collections.ConfigDict of the experiment (prefixes, model section)
  embeddings: str = ""
  export_embeddings: str = ""
  output_dir: str = ""
  query_prefix: str | None = None  # None: config.data's, else "Query: "
  passage_prefix: str | None = None
  query_max_length: int = 64
  passage_max_length: int = 0  # 0: 128 for sentences, 512 with context
  batch_size: int = 128
  pooling: str = ""  # "" = the model's own
  dtype: str = "float32"
  groups: dict = dataclasses.field(default_factory=dict)
  normalize: bool = True
  center_languages: bool = False  # subtract per-language mean embeddings (grid_evaluator.py)
  show_progress: bool = True


def parse_groups(text: str) -> dict[str, tuple[str, ...]]:
  """ "unseen=el+vi;low=th+hi" -> {"unseen": ("el", "vi"), "low": ("th", "hi")}; "" -> {}."""
  groups = {}
  for item in (text or "").split(";"):
    if not item.strip():
      continue
    name, eq, members = item.partition("=")
    if not eq or not name.strip() or not members.strip():
      raise EvaluateUsageError(f"--groups item {item!r}: expected NAME=lang+lang, e.g. "
                               "low_resource=el+hi+th+tr+vi")
    groups[name.strip()] = tuple(m.strip() for m in members.split("+") if m.strip())
  return groups


def _source_name(opts: RunOptions) -> str:
  for path in (opts.model, opts.workdir, opts.embeddings):
    if path:
      return os.path.basename(os.path.normpath(path)) or "run"
  return "run"


def default_output_dir(opts: RunOptions) -> str:
  """<workdir>/eval/<dataset>-step<step> for a training run, else eval_results/<source>/<dataset>."""
  dataset = opts.dataset
  if opts.dataset == "beir":
    dataset = "beir-" + os.path.basename(os.path.normpath(opts.data_dir))
  elif opts.dataset == "mkqa":
    dataset = f"mkqa-{os.path.basename(os.path.normpath(opts.corpus_dir))}-{opts.answer_language}"
  if opts.candidate_context:
    dataset += "-context"
  if opts.center_languages:  # never overwrite the plain evaluation of the same source
    dataset += "-centered"
  if opts.part != "all":
    dataset += f"-{opts.part}"
  if opts.workdir and "://" not in opts.workdir:
    return os.path.join(opts.workdir, "eval", f"{dataset}-step{opts.step}")
  # Outputs are written with local file APIs: a remote (gs://) run's go to the local directory.
  step = f"-step{opts.step}" if opts.workdir else ""
  return os.path.join("eval_results", _source_name(opts), dataset + step)


def _validate(opts: RunOptions) -> None:
  sources = [name for name, value in (("--model", opts.model), ("--workdir", opts.workdir),
                                      ("--embeddings", opts.embeddings)) if value]
  if len(sources) != 1:
    raise EvaluateUsageError(
        f"give exactly one source: --model=HF_DIR, --workdir=DIR or --embeddings=DIR "
        f"(got {sources or 'none'})")
  if opts.dataset not in DATASETS:
    raise EvaluateUsageError(f"--dataset={opts.dataset!r}; expected one of {DATASETS}")
  if opts.dataset == "beir" and not opts.data_dir:
    raise EvaluateUsageError("--dataset=beir needs --data_dir (a directory with corpus.jsonl, "
                             "queries.jsonl and qrels/<split>.tsv)")
  if opts.dataset == "beir" and len(opts.languages) > 1:
    raise EvaluateUsageError("--dataset=beir reads one directory (one language); --languages "
                             "takes at most one code there, used as its label")
  if opts.dataset == "mkqa" and not (opts.mkqa_file and opts.corpus_dir):
    raise EvaluateUsageError("--dataset=mkqa needs --mkqa_file (the official mkqa.jsonl or "
                             ".jsonl.gz) and --corpus_dir (a BEIR directory with corpus.jsonl)")
  if opts.mkqa_file and not os.path.isfile(opts.mkqa_file):
    raise MissingPathError(f"--mkqa_file={opts.mkqa_file!r} is not a file (found "
                           f"{'a directory' if os.path.isdir(opts.mkqa_file) else 'nothing'}); "
                           "expected MKQA's mkqa.jsonl or mkqa.jsonl.gz")
  if opts.center_languages and opts.dataset in (evaluators_lib.BeirEvaluator.type_name,
                                                evaluators_lib.MkqaEvaluator.type_name):
    raise EvaluateUsageError(
        f"--center_languages with --dataset={opts.dataset}: centring needs every candidate "
        "embedding in memory to take its language's mean, and the corpus-scale search streams "
        "them; use it with xquad-r, mlqa-r or synthetic, or drop --center_languages")
  if opts.embeddings and opts.export_embeddings:
    raise EvaluateUsageError("--export_embeddings writes embeddings computed by --model or "
                             "--workdir; with --embeddings they already exist")
  check_directories(opts)


# flag -> (what a directory named by it holds, how else to get one), for the message when the
# path is not a directory.
_EXPECTED_DIRECTORIES = {
    "model": ("a Hugging Face model directory (config.json, model.safetensors, tokenizer.json)",
              "export a training run with `python -m hybrid_jax.export`"),
    "workdir": ("a training run directory (config.json, encoder_config.json, tokenizer/, "
                "checkpoints/)", "pass the --workdir the run was trained with"),
    "embeddings": ("an embeddings directory (queries.npy, queries.uids.txt, candidates.npy, "
                   "candidates.uids.txt)", "write one with --export_embeddings"),
    "corpus_dir": ("a BEIR-format corpus directory (corpus.jsonl: _id, title, text)",
                   "convert one, e.g. python -m hybrid_jax.search.convert_lareqa --out=DIR"),
    "data_dir": ("the evaluation data (LAReQA: one <lang>.json per language; BEIR: corpus.jsonl, "
                 "queries.jsonl, qrels/<split>.tsv)",
                 "leave --data_dir out to read $HYBRID_JAX_DATA/<dataset> (LAReQA)"),
}


def check_directories(opts: RunOptions) -> None:
  """Every directory the user named exists, before any data or model is read."""
  for flag, (expected, alternative) in _EXPECTED_DIRECTORIES.items():
    path = getattr(opts, flag)
    if not path or "://" in path or os.path.isdir(path):  # gs:// etc.: checked by their readers
      continue
    found = "a file" if os.path.exists(path) else "nothing there"
    raise MissingPathError(f"--{flag}={path!r} is not a directory (found {found}); expected "
                           f"{expected}. Check the path, or {alternative}.")


def _run_data_config(opts: RunOptions) -> dict:
  """The `data` section that applies: --config's, else the training run's own config.json."""
  data = getattr(opts.config, "data", None) if opts.config is not None else None
  if data is not None:
    return data.to_dict() if hasattr(data, "to_dict") else dict(data)
  if opts.workdir:
    from hybrid_jax import checkpointing  # pylint: disable=g-import-not-at-top
    try:  # through epath, so a gs:// workdir's config.json is read too
      return dict(checkpointing.read_run_config(opts.workdir).get("data") or {})
    except checkpointing.CheckpointConfigError:
      return {}
  return {}


def _prefixes(opts: RunOptions) -> tuple[str, str]:
  """Flags win; then the config's data section (a run is scored with the prefixes it trained
  with); then E5's "Query: " / "Passage: "."""
  data = _run_data_config(opts)
  query = opts.query_prefix if opts.query_prefix is not None else data.get("query_prefix",
                                                                           "Query: ")
  passage = opts.passage_prefix if opts.passage_prefix is not None else data.get(
      "passage_prefix", "Passage: ")
  return query, passage


def heldout_split(opts: RunOptions) -> dict:
  """heldout_fraction / _unit / _seed of --part: the flags, else the run's config.data when the
  run trained on this LAReQA dataset (so `--workdir=RUN --part=test` scores what RUN held out)."""
  data = _run_data_config(opts)
  trained_here = (data.get("source") == "lareqa" and os.path.basename(os.path.normpath(
      str(data.get("path", "")))) == os.path.basename(os.path.normpath(
          opts.data_dir or opts.dataset)))
  run = data if trained_here else {}
  fraction = opts.heldout_fraction if opts.heldout_fraction >= 0 else run.get("heldout_fraction")
  if fraction is None:
    raise EvaluateUsageError(
        f"--part={opts.part} needs the held-out split: pass --heldout_fraction (e.g. 0.2, the "
        f"run's data.heldout_fraction), or --workdir of a run trained on {opts.dataset}")
  return {"heldout_fraction": float(fraction),
          "heldout_unit": opts.heldout_unit or run.get("heldout_unit", "article"),
          "heldout_seed": opts.heldout_seed if opts.heldout_seed >= 0 else int(
              run.get("heldout_seed", 0))}


def evaluator_spec(opts: RunOptions) -> dict:
  """The config.evals-style spec (eval/evaluators.py) of the command line's dataset flags."""
  groups = {name: tuple(members) for name, members in dict(opts.groups).items()}
  if opts.part != "all" and opts.dataset not in evaluators_lib.LAREQA_DATASETS:
    raise EvaluateUsageError(f"--part={opts.part} splits LAReQA directories (xquad-r, mlqa-r), "
                             f"not --dataset={opts.dataset}; use --beir_split for BEIR")
  if opts.dataset in evaluators_lib.LAREQA_DATASETS:
    spec = {"type": evaluators_lib.LareqaEvaluator.type_name, "dataset": opts.dataset,
            "data_dir": opts.data_dir, "languages": tuple(opts.languages),
            "candidate_context": opts.candidate_context, "groups": groups, "part": opts.part}
    if opts.part != "all":
      spec.update(heldout_split(opts))
    return spec
  corpus_options = {"corpus_store": opts.corpus_store, "store_shard_size": opts.store_shard_size,
                    "store_dtype": opts.store_dtype, "trec_depth": opts.trec_depth,
                    "search_dtype": opts.search_dtype}
  if opts.dataset == evaluators_lib.BeirEvaluator.type_name:
    return {"type": opts.dataset, "data_dir": opts.data_dir, "split": opts.beir_split,
            "lang": opts.languages[0] if opts.languages else None, "groups": groups,
            **corpus_options}
  if opts.dataset == evaluators_lib.MkqaEvaluator.type_name:
    return {"type": opts.dataset, "mkqa_file": opts.mkqa_file, "corpus_dir": opts.corpus_dir,
            "languages": tuple(opts.languages), "answer_language": opts.answer_language,
            "groups": groups, **corpus_options}
  # The run's generator spec: a :runlocal run's held-out ids exist only for the spec it used.
  return synthetic_eval.complete_spec({"type": opts.dataset, "groups": groups},
                                      _run_data_config(opts))


def make_evaluator(opts: RunOptions) -> evaluators_lib.GridEvaluator:
  query_prefix, passage_prefix = _prefixes(opts)
  # name None: a BEIR set is named after its directory, every other type after its dataset.
  # A training run's own languages give the "unseen" group (a zero-shot --model has none).
  from hybrid_jax import checkpointing  # pylint: disable=g-import-not-at-top
  training_languages = checkpointing.read_training_languages(opts.workdir) if opts.workdir else None
  evaluator = evaluators_lib.build_evaluator(
      None, evaluator_spec(opts), query_prefix=query_prefix, passage_prefix=passage_prefix,
      normalize=opts.normalize, show_progress=opts.show_progress, where="--dataset",
      training_languages=training_languages)
  if opts.center_languages:
    evaluator.center_languages = True  # a GridEvaluator: _validate rejected the corpus types
  return evaluator


def _file_stamp(directory: str) -> dict:
  """Sizes and modification times of a model directory's files: the cache key of its outputs.

  Nanoseconds, not seconds: a model rewritten within the same second keeps every size (same
  architecture), so whole seconds would let the cache serve the old model's embeddings."""
  stamp = {}
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      st = os.stat(path)
      stamp[name] = [st.st_size, st.st_mtime_ns]
  return stamp


def _params_digest(params) -> str:
  """SHA-1 of a parameter tree's names, shapes, dtypes and bytes.

  A workdir's step number does not identify its parameters (a run retrained in the same workdir
  reaches the same steps), so the cache key holds the parameters themselves; hashing is about a
  second per GB, small next to encoding a collection."""
  import jax  # pylint: disable=g-import-not-at-top

  digest = hashlib.sha1()
  for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0],
                           key=lambda item: jax.tree_util.keystr(item[0])):
    array = np.ascontiguousarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape}".encode())
    digest.update(array.reshape(-1).view(np.uint8))  # the bytes, without a copy
  return digest.hexdigest()


def _passage_max_length(opts: RunOptions) -> int:
  return opts.passage_max_length or (512 if opts.candidate_context else 128)


def _model_embedders(opts: RunOptions):
  """(query embed_fn, passage embed_fn, cache key, description) for --model / --workdir."""
  from hybrid_jax.models import inference  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(opts.dtype)
  if dtype is None:
    raise EvaluateUsageError(f"--dtype={opts.dtype!r}; expected float32 or bfloat16")
  passage_len = _passage_max_length(opts)
  if opts.model:
    query_embedder = inference.TextEmbedder.from_pretrained(
        opts.model, pooling=opts.pooling or None, batch_size=opts.batch_size,
        max_length=opts.query_max_length, dtype=dtype)
    key = {"model": os.path.abspath(opts.model), "files": _file_stamp(opts.model)}
    description = f"model {opts.model}"
  else:
    query_embedder, key, description = _workdir_embedder(opts, dtype)
  passage_embedder = inference.TextEmbedder(
      query_embedder.config, query_embedder.params, query_embedder.tokenizer,
      batch_size=opts.batch_size, max_length=passage_len, dtype=dtype)
  # The pooling that applies (the flag, else the model's own), so that editing a model's
  # config.json or a workdir's encoder_config.json re-encodes too.
  key.update(pooling=query_embedder.config.pooling, dtype=opts.dtype,
             query_max_length=opts.query_max_length, passage_max_length=passage_len)
  embed_queries, embed_passages = inference.embed_fns(query_embedder, passage_embedder,
                                                      show_progress=opts.show_progress)
  return embed_queries, embed_passages, key, description


def _workdir_embedder(opts: RunOptions, dtype):
  """A TextEmbedder over the parameters of a training run's checkpoint."""
  from hybrid_jax import checkpointing  # pylint: disable=g-import-not-at-top
  from hybrid_jax.models import inference  # pylint: disable=g-import-not-at-top

  loaded = checkpointing.load_params(opts.workdir, opts.step)
  embedder = inference.TextEmbedder.from_params(loaded, batch_size=opts.batch_size,
                                                max_length=opts.query_max_length, dtype=dtype)
  key = {"workdir": os.path.abspath(opts.workdir), "step": str(loaded.step),
         "params_sha1": _params_digest(loaded.params)}
  # The step actually loaded ("best" names a checkpoint, not a step), so results say which.
  asked = "" if str(opts.step) == str(loaded.step) else f" ({opts.step})"
  return embedder, key, f"workdir {opts.workdir} step {loaded.step}{asked}"


def run(opts: RunOptions, argv: Sequence[str] = ()) -> dict:
  """One evaluation; writes the output directory and returns the results dict."""
  _validate(opts)
  started = time.time()
  evaluator = make_evaluator(opts)
  collection = evaluator.collection  # read (and validated) before any model is loaded
  output_dir = opts.output_dir or default_output_dir(opts)
  os.makedirs(output_dir, exist_ok=True)
  log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if opts.show_progress else (
      lambda msg: None)
  log(f"{collection.name}: {collection.num_queries} queries, {collection.num_candidates} "
      f"candidates, languages {' '.join(collection.languages)}; output {output_dir}")

  embed_started = time.time()
  if opts.embeddings:
    query_emb, cand_emb = evaluator.load_embeddings(opts.embeddings)
    description = f"embeddings {opts.embeddings}"
  else:
    embed_queries, embed_passages, key, description = _model_embedders(opts)
    query_emb, cand_emb = evaluator.embed(
        embed_queries, cache_dir=os.path.join(output_dir, "embeddings"), cache_key=key,
        passage_embed_fn=embed_passages)
    if opts.export_embeddings:
      evaluator.export_embeddings(opts.export_embeddings, query_emb, cand_emb)
      log(f"exported embeddings to {opts.export_embeddings}")
  embed_seconds = time.time() - embed_started

  score_started = time.time()
  per_query, results = evaluator.score(query_emb, cand_emb)
  score_seconds = time.time() - score_started
  wall = time.time() - started
  query_prefix, passage_prefix = _prefixes(opts)
  command = "python -m hybrid_jax.evaluate " + " ".join(shlex.quote(a) for a in argv[1:])
  meta = {"source": description, "command": command, "query_prefix": query_prefix,
          "passage_prefix": passage_prefix, "candidate_context": opts.candidate_context,
          "part": opts.part, "center_languages": opts.center_languages,
          **({"heldout": heldout_split(opts)} if opts.part != "all" else {}),
          "num_queries": collection.num_queries, "num_candidates": collection.num_candidates,
          "embedding_dim": int(query_emb.shape[1]), "embed_seconds": round(embed_seconds, 2),
          "score_seconds": round(score_seconds, 2), "wall_seconds": round(wall, 2)}
  header = [f"Source: {description}. Prefixes: query {query_prefix!r}, passage "
            f"{passage_prefix!r}; candidates: {'sentence + context' if opts.candidate_context else 'sentence'}."
            + (f" Part {opts.part!r} of the held-out split {heldout_split(opts)}."
               if opts.part != "all" else "")
            + (" Embeddings centred per language (each language's mean query / candidate "
               "embedding of this collection subtracted, then re-normalised)."
               if opts.center_languages else ""),
            f"{collection.num_queries} queries, {collection.num_candidates} candidates. "
            f"Wall time {wall:.1f}s (encoding {embed_seconds:.1f}s, scoring {score_seconds:.1f}s).",
            "", f"    {command}"]
  meta.update(evaluator.run_info())
  written = evaluator.write_reports(output_dir, per_query, results, header, meta)
  print(evaluator.summary_table(results))
  log(f"wrote {', '.join(os.path.basename(p) for p in written)} to {output_dir} "
      f"(wall time {wall:.1f}s)")
  return results
