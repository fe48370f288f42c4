"""sentence-transformers loads an export and embeds exactly as hybrid_jax's TextEmbedder does.

Two models: a tiny trained :runlocal run (`export.export`, what `python -m hybrid_jax.export
--workdir` runs) and the converted multilingual-e5-small (a plain Hugging Face directory given the
sentence-transformers files), each on about 200 real XQuAD-R texts in eleven languages, with the
"query" and the "passage"/"document" prompts. `--model=HF_DIR` (a labelled copy) is tested through
the command line on the runlocal export.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from hybrid_jax import checkpointing
from hybrid_jax import export
from hybrid_jax import trainer
from hybrid_jax.data import lareqa
from hybrid_jax.data import locations
from hybrid_jax.models import e5_convert
from hybrid_jax.models import hf_checkpoint
from hybrid_jax.models import inference
from hybrid_jax.models import sentence_transformers_files as st_files
from train_helpers import REPO, runlocal_config

TOLERANCE = 1e-5
XQUAD_R = os.path.join(locations.data_root(), "xquad-r")


@functools.lru_cache(maxsize=1)
def _xquad_r() -> dict:
  return lareqa.read_languages(XQUAD_R)


def multilingual_texts(per_language: int) -> list[str]:
  """`per_language` questions and as many answer sentences from each XQuAD-R language."""
  texts = []
  for _, parsed in sorted(_xquad_r().items()):
    texts += [q.question for q in parsed.questions[:per_language]]
    texts += [c.sentence for c in parsed.candidates[:per_language]]
  return texts


def max_difference(model_dir: str, embedder: inference.TextEmbedder, texts, prompts) -> dict:
  """max |SentenceTransformer(model_dir).encode - TextEmbedder.embed| per prompt name."""
  from sentence_transformers import SentenceTransformer  # pylint: disable=g-import-not-at-top
  model = SentenceTransformer(model_dir, device="cpu")
  ours_by_prefix = {}
  out = {}
  for name, prefix in prompts.items():
    theirs = model.encode(texts, prompt_name=name, batch_size=64, convert_to_numpy=True)
    if prefix not in ours_by_prefix:  # "passage" and "document" share one
      ours_by_prefix[prefix] = embedder.embed(texts, prefix=prefix)
    ours = ours_by_prefix[prefix]
    assert theirs.shape == ours.shape == (len(texts), embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(theirs, axis=1), 1.0, atol=1e-5)
    out[name] = float(np.abs(theirs - ours).max())
  return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
  """A tiny 2-layer :runlocal run, a few seconds of training, no evaluators."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = runlocal_config("hybrid", **{
      "model.num_hidden_layers": 2, "train.num_steps": 20, "train.warmup_steps": 2,
      "train.log_every_steps": 10, "train.eval_every_steps": 10,
      "train.checkpoint_every_steps": 10})
  config.evals = ml_collections.ConfigDict()
  trainer.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.real_data
def test_runlocal_export_encodes_like_text_embedder(run_dir, tmp_path):
  out = str(tmp_path / "st")
  assert export.export(run_dir, out, "last") == 20
  data = checkpointing.read_run_config(run_dir)["data"]
  written = json.loads(open(os.path.join(out, "config_sentence_transformers.json")).read())
  assert written["prompts"] == {"query": data["query_prefix"], "passage": data["passage_prefix"],
                                "document": data["passage_prefix"]} == {
                                    "query": "Query: ", "passage": "Passage: ",
                                    "document": "Passage: "}
  assert json.loads(open(os.path.join(out, "sentence_bert_config.json")).read())[
      "max_seq_length"] == 16  # runlocal: query and passage max length 16
  assert [m["type"].rsplit(".", 1)[1] for m in json.load(open(os.path.join(
      out, "modules.json")))] == ["Transformer", "Pooling", "Normalize"]

  loaded = checkpointing.load_params(run_dir, "last")
  assert loaded.config.pooling == "mean"
  embedder = inference.TextEmbedder.from_params(loaded, batch_size=64, max_length=16)
  texts = multilingual_texts(10)  # 220 texts; most are longer than 16 tokens: truncation counts
  assert len(texts) == 220
  diffs = max_difference(out, embedder, texts, written["prompts"])
  print(f"runlocal export: max |SentenceTransformer - TextEmbedder| {diffs}")
  assert max(diffs.values()) <= TOLERANCE, diffs


def test_cli_labels_a_copy_of_a_plain_hugging_face_directory(run_dir, tmp_path):
  hf_only = str(tmp_path / "hf")
  export.export(run_dir, hf_only, "last", sentence_transformers=False)
  assert not os.path.exists(os.path.join(hf_only, st_files.MODULES_FILE))
  copy = str(tmp_path / "copy")
  result = subprocess.run(
      [sys.executable, "-m", "hybrid_jax.export", f"--model={hf_only}", f"--out={copy}",
       "--query_prefix=q: ", "--passage_prefix=", "--max_seq_length=12"],
      capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not os.path.exists(os.path.join(hf_only, st_files.MODULES_FILE))  # the source is kept
  prompts = json.load(open(os.path.join(copy, st_files.MODEL_CONFIG_FILE)))["prompts"]
  assert prompts == {"query": "q: ", "passage": "", "document": ""}
  assert json.load(open(os.path.join(copy, st_files.SENTENCE_BERT_CONFIG_FILE))) == {
      "max_seq_length": 12, "do_lower_case": False, "model_args": {"add_pooling_layer": False}}
  # Missing prefixes and a bad length are user errors with a reason, before anything is written.
  for flags, message in ((["--query_prefix=q: "], "needs --query_prefix and --passage_prefix"),
                         (["--query_prefix=", "--passage_prefix=", "--max_seq_length=500"],
                          "max_seq_length=500: expected 2 .. 128")):
    result = subprocess.run(
        [sys.executable, "-m", "hybrid_jax.export", f"--model={hf_only}",
         f"--out={tmp_path / 'bad'}", *flags], capture_output=True, text=True, cwd=REPO,
        timeout=300, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "bad").exists()


@pytest.mark.real_data
@pytest.mark.parametrize("pooling", ["cls", "pooler"])
def test_cls_and_pooler_poolings_map_exactly(run_dir, tmp_path, pooling):
  """cls -> Pooling(cls); pooler -> Pooling(cls) + Dense(tanh) with the pooler's weights."""
  loaded = checkpointing.load_params(run_dir, "last")
  config = loaded.config.replace(pooling=pooling, add_pooling_layer=pooling == "pooler")
  params = dict(loaded.params)
  if pooling == "pooler":  # a random pooler: any weights must carry over
    rng = np.random.default_rng(0)
    size = config.hidden_size
    params["pooler"] = {"dense": {
        "kernel": rng.normal(0, 0.2, (size, size)).astype(np.float32),
        "bias": rng.normal(0, 0.2, size).astype(np.float32)}}
  out = str(tmp_path / pooling)
  hf_checkpoint.save_pretrained(out, config, params, loaded.tokenizer)
  settings = st_files.PromptSettings("Query: ", "Passage: ", 16)
  st_files.write_files(out, config, settings, params)
  modules = [m["type"].rsplit(".", 1)[1] for m in json.load(open(os.path.join(out,
                                                                           "modules.json")))]
  assert modules == (["Transformer", "Pooling", "Dense", "Normalize"] if pooling == "pooler"
                     else ["Transformer", "Pooling", "Normalize"])
  embedder = inference.TextEmbedder(config, params, loaded.tokenizer, batch_size=64,
                                    max_length=16)
  diffs = max_difference(out, embedder, multilingual_texts(3), {"query": "Query: "})
  assert max(diffs.values()) <= TOLERANCE, diffs


@pytest.mark.real_data
def test_e5_small_encodes_like_text_embedder(tmp_path):
  # The converted model (converted once, ~/.cache or $HYBRID_JAX_MODELS), linked file by file into
  # a fresh directory that gets the sentence-transformers files: nothing changes in the cache.
  # (export_hf_dir's copy of a directory is tested above on the runlocal model; here the weights
  # are read once, for the files and for our embedder.)
  source = e5_convert.ensure_converted(verbose=False)
  model_dir = tmp_path / "me5"
  model_dir.mkdir()
  for name in os.listdir(source):
    (model_dir / name).symlink_to(os.path.join(source, name))
  loaded = hf_checkpoint.load_pretrained(str(model_dir))
  assert loaded.config.pooling == "mean"  # e5's pooling, the default of a plain directory
  st_files.write_files(str(model_dir), loaded.config,
                       st_files.PromptSettings("query: ", "passage: ", 32), loaded.params)
  prompts = json.load(open(model_dir / st_files.MODEL_CONFIG_FILE))["prompts"]
  assert prompts == {"query": "query: ", "passage": "passage: ", "document": "passage: "}
  # One batch of all texts: one compiled shape per padded length (CPU compiles dominate). Most
  # texts are longer than 32 tokens, so truncation is compared too. "document" is the "passage"
  # prompt (checked above): encoding it again would show nothing new.
  embedder = inference.TextEmbedder(loaded.config, loaded.params, loaded.tokenizer,
                                    batch_size=256, max_length=32)
  texts = multilingual_texts(9)  # 198 texts
  diffs = max_difference(str(model_dir), embedder, texts,
                         {"query": "query: ", "passage": "passage: "})
  print(f"e5-small: max |SentenceTransformer - TextEmbedder| {diffs}")
  assert max(diffs.values()) <= TOLERANCE, diffs
