"""The sentence-transformers files of an exported model: pooling, normalisation, prompts, length.

A Hugging Face directory written by `hf_checkpoint.save_pretrained` loads in
`transformers.AutoModel`, but a sentence-transformers (and so MTEB) user would have to guess how
hybrid_jax turns hidden states into an embedding. `write_files` adds what
`sentence_transformers.SentenceTransformer(DIR)` reads, so that

    SentenceTransformer(DIR).encode(texts, prompt_name="query")     # or "passage" / "document"

gives the embeddings `inference.TextEmbedder(...).embed(texts, prefix=query_prefix)` gives:

    modules.json                      Transformer (this directory) -> Pooling [-> Dense] -> Normalize
    sentence_bert_config.json         max_seq_length (truncation, special tokens included)
    config_sentence_transformers.json prompts {"query", "passage", "document"}; cosine similarity
    1_Pooling/config.json             the pooling mode
    2_Dense/                          pooler only: the BERT pooler's dense + tanh
    N_Normalize/                      L2 normalisation (the encoder's output is unit length)

How each pooling of the encoder (models/encoder.py `pool`) maps, exactly:
  cls     hidden state of position 0. sentence-transformers' "cls" takes the first non-padding
          position, the same token for right-padded batches (our tokenizers pad on the right).
  mean    mean over real tokens (attention mask 1), prefix tokens included: "mean" with
          include_prompt=True (a prompt is text prepended before tokenisation, like our prefix).
  pooler  CLS -> dense -> tanh with the BERT pooler's weights (LaBSE): "cls" followed by a Dense
          module (tanh) holding those weights, as the sentence-transformers LaBSE model does.
All three end in L2 normalisation (Normalize), as `Encoder` does with `l2_normalize`.

One difference sentence-transformers cannot express in these files: it has ONE max_seq_length for
queries and passages, where a hybrid_jax run has data.query_max_length and passage_max_length. The
export uses the longer of the two, so texts within the query length embed identically, and a
query longer than data.query_max_length is embedded from more tokens than the evaluator used.

The module names in modules.json are the `sentence_transformers.models.*` ones every release reads
(2.x to 6.x; 6.x maps them to its new locations); the JSON layouts are the long-standing ones too.
Tested with the sentence-transformers version pinned in setup.py's [test] extra. Writing needs
neither torch nor sentence-transformers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import numpy as np
import safetensors.numpy

from hybrid_jax import errors
from hybrid_jax.models import encoder as encoder_lib

MODULES_FILE = "modules.json"
SENTENCE_BERT_CONFIG_FILE = "sentence_bert_config.json"
MODEL_CONFIG_FILE = "config_sentence_transformers.json"
POOLING_DIR = "1_Pooling"
DENSE_DIR = "2_Dense"
# Prompt names: "query" and "passage" as our configs say; "document" is MTEB's name for a passage.
PROMPT_NAMES = ("query", "passage", "document")

_MODULE_TYPES = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Dense": "sentence_transformers.models.Dense",
    "Normalize": "sentence_transformers.models.Normalize",
}
# sentence-transformers' pooling mode of each encoder pooling (the pooler adds a Dense module).
# Each is one `pooling_mode_<flag>` boolean of 1_Pooling/config.json.
_POOLING_FLAGS = {"cls": "cls_token", "mean": "mean_tokens", "pooler": "cls_token"}
_ALL_POOLING_FLAGS = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                      "weightedmean_tokens", "lasttoken")


class SentenceTransformersExportError(errors.UserError):
  """The model or the settings cannot be written as a sentence-transformers model."""


@dataclasses.dataclass(frozen=True)
class PromptSettings:
  """What sentence-transformers needs beyond the weights: input prefixes and truncation length."""
  query_prefix: str
  passage_prefix: str
  max_seq_length: int  # tokens, special tokens included

  def prompts(self) -> dict[str, str]:
    return {"query": self.query_prefix, "passage": self.passage_prefix,
            "document": self.passage_prefix}

  @classmethod
  def from_data_config(cls, data: dict, max_seq_length: int | None = None) -> "PromptSettings":
    """From a run's config.data (query/passage prefixes and max lengths); `max_seq_length`
    overrides the default, the longer of data.query_max_length and data.passage_max_length."""
    missing = [k for k in ("query_prefix", "passage_prefix", "query_max_length",
                           "passage_max_length") if k not in data]
    if missing:
      raise SentenceTransformersExportError(
          f"the run's config.data lacks {missing}, which the sentence-transformers prompts and "
          "max_seq_length come from; pass --query_prefix, --passage_prefix and --max_seq_length.")
    if max_seq_length is None:
      max_seq_length = max(int(data["query_max_length"]), int(data["passage_max_length"]))
    return cls(str(data["query_prefix"]), str(data["passage_prefix"]), int(max_seq_length))


def _write_json(path: str, value) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, ensure_ascii=False)
    f.write("\n")


def _pooling_config(pooling: str, hidden_size: int) -> dict:
  """1_Pooling/config.json in the layout of every release (one boolean per mode)."""
  config = {"word_embedding_dimension": hidden_size}
  config.update({f"pooling_mode_{flag}": flag == _POOLING_FLAGS[pooling]
                 for flag in _ALL_POOLING_FLAGS})
  config["include_prompt"] = True  # our prefix tokens are pooled like any other token
  return config


def check_exportable(config: encoder_lib.EncoderConfig, settings: PromptSettings,
                     params=None) -> None:
  """Raises SentenceTransformersExportError unless write_files can label this model."""
  if config.pooling not in _POOLING_FLAGS:
    raise SentenceTransformersExportError(
        f"pooling {config.pooling!r} has no sentence-transformers equivalent here; exportable: "
        f"{sorted(_POOLING_FLAGS)}")
  if config.pooling == "pooler" and (params is None or "pooler" not in params):
    raise SentenceTransformersExportError(
        "pooling='pooler' needs the pooler's dense weights (params['pooler']); found none. Export "
        "a model with add_pooling_layer=True, or use pooling 'cls' or 'mean'.")
  if not 2 <= settings.max_seq_length <= config.max_sequence_length:
    raise SentenceTransformersExportError(
        f"max_seq_length={settings.max_seq_length}: expected 2 .. {config.max_sequence_length} "
        f"(the positions of this {config.model_type} encoder); pass a length in that range.")


def write_files(model_dir: str, config: encoder_lib.EncoderConfig, settings: PromptSettings,
                params=None) -> list[str]:
  """Writes the sentence-transformers files into `model_dir` (a Hugging Face directory of this
  model: config.json, weights, tokenizer files); returns the paths written.

  params: the encoder's parameters; read only for pooling='pooler' (the pooler's dense layer).
  """
  check_exportable(config, settings, params)
  written = []

  def path(*names):
    full = os.path.join(model_dir, *names)
    written.append(full)
    return full

  modules = [("Transformer", "")]
  os.makedirs(os.path.join(model_dir, POOLING_DIR), exist_ok=True)
  _write_json(path(POOLING_DIR, "config.json"), _pooling_config(config.pooling, config.hidden_size))
  modules.append(("Pooling", POOLING_DIR))
  if config.pooling == "pooler":
    dense = params["pooler"]["dense"]
    os.makedirs(os.path.join(model_dir, DENSE_DIR), exist_ok=True)
    _write_json(path(DENSE_DIR, "config.json"), {
        "in_features": config.hidden_size, "out_features": config.hidden_size, "bias": True,
        "activation_function": "torch.nn.modules.activation.Tanh"})
    # torch Linear layout: weight [out, in] (our kernels are [in, out]).
    safetensors.numpy.save_file(
        {"linear.weight": np.ascontiguousarray(np.asarray(dense["kernel"], np.float32).T),
         "linear.bias": np.ascontiguousarray(np.asarray(dense["bias"], np.float32))},
        path(DENSE_DIR, "model.safetensors"), metadata={"format": "pt"})
    modules.append(("Dense", DENSE_DIR))
  normalize_dir = f"{len(modules)}_Normalize"
  os.makedirs(os.path.join(model_dir, normalize_dir), exist_ok=True)
  _write_json(path(normalize_dir, "config.json"), {})
  modules.append(("Normalize", normalize_dir))

  _write_json(path(MODULES_FILE), [
      {"idx": i, "name": str(i), "path": directory, "type": _MODULE_TYPES[kind]}
      for i, (kind, directory) in enumerate(modules)])
  transformer_config = {"max_seq_length": settings.max_seq_length, "do_lower_case": False}
  if not config.add_pooling_layer:
    # BertModel / XLMRobertaModel build a pooler unless told otherwise, and would warn that its
    # weights are "newly initialized"; the embedding never reads it. ("model_args" is the key
    # every release reads; 6.x renames it model_kwargs.)
    transformer_config["model_args"] = {"add_pooling_layer": False}
  _write_json(path(SENTENCE_BERT_CONFIG_FILE), transformer_config)
  _write_json(path(MODEL_CONFIG_FILE), {
      "model_type": "SentenceTransformer", "prompts": settings.prompts(),
      "default_prompt_name": None, "similarity_fn_name": "cosine"})
  return written


def add_to_hf_dir(src_dir: str, out_dir: str, *, query_prefix: str, passage_prefix: str,
                  max_seq_length: int | None = None, pooling: str | None = None) -> list[str]:
  """Copies a Hugging Face directory (e.g. the converted multilingual-e5-small) to `out_dir` and
  writes the sentence-transformers files there (in place when out_dir is src_dir).

  The directory is read with `hf_checkpoint.load_pretrained` first, so only a model hybrid_jax's
  encoder reproduces is labelled. max_seq_length: default the model's position table; pooling:
  default the directory's own (hybrid_jax exports record it, else "mean").
  """
  from hybrid_jax.models import hf_checkpoint  # pylint: disable=g-import-not-at-top
  loaded = hf_checkpoint.load_pretrained(src_dir, pooling=pooling)
  if loaded.tokenizer is None:
    raise SentenceTransformersExportError(
        f"{src_dir!r} has no tokenizer.json; sentence-transformers needs the model's tokenizer "
        "next to the weights.")
  settings = PromptSettings(query_prefix, passage_prefix, int(
      loaded.config.max_sequence_length if max_seq_length is None else max_seq_length))
  check_exportable(loaded.config, settings, loaded.params)  # before anything is copied
  if os.path.realpath(src_dir) != os.path.realpath(out_dir):
    if os.path.exists(out_dir) and os.listdir(out_dir):
      raise SentenceTransformersExportError(
          f"--out={out_dir!r} exists and is not empty; choose a new directory (or --out equal to "
          "--model to add the files in place).")
    shutil.copytree(src_dir, out_dir, dirs_exist_ok=True)
  return write_files(out_dir, loaded.config, settings, loaded.params)
