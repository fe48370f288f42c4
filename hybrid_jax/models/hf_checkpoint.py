"""Hugging Face checkpoint directories <-> hybrid_jax encoder parameters.

A Hugging Face model directory holds `config.json`, the weights (`model.safetensors`, a sharded
`model.safetensors.index.json`, or the older `pytorch_model.bin`) and the tokenizer
(`tokenizer.json`, `tokenizer_config.json`). `load_pretrained` reads one into an `EncoderConfig`,
float32 NumPy parameters and a `Tokenizer`; safetensors are read with safetensors' NumPy API, so
torch is needed only for `pytorch_model.bin`. `save_pretrained` writes the same layout back, so a
model trained here loads in PyTorch with `transformers.AutoModel.from_pretrained(dir)`.

The encoder's parameter tree mirrors HF's module names, so the mapping is mechanical:
`encoder/layer_3/attention/self/query/kernel` <-> `encoder.layer.3.attention.self.query.weight`
(transposed: flax kernels are [in, out], torch Linear weights [out, in]); LayerNorm `scale` <->
`weight`; Embed `embedding` <-> `weight`. Every way a user can hand us a wrong directory (missing or
unreadable files, a model type we do not implement, tensors whose shapes contradict config.json, a
tokenizer larger than the embedding table) raises `CheckpointError` naming the file or tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import jax
import numpy as np
import safetensors
import safetensors.numpy

from hybrid_jax import errors
from hybrid_jax.data import tokenization
from hybrid_jax.models import encoder as encoder_lib

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX_FILE = "model.safetensors.index.json"
PYTORCH_FILE = "pytorch_model.bin"

# Prefixes of the base model inside task models (BertForMaskedLM keeps the encoder under "bert.").
_BASE_PREFIXES = ("bert.", "roberta.")
# Tensors that are not encoder weights: task heads and non-persistent buffers some versions saved.
_IGNORED = re.compile(r"^(cls\.|lm_head\.|classifier\.|qa_outputs\.|"
                      r"embeddings\.position_ids$|embeddings\.token_type_ids$)")


class CheckpointError(errors.UserError):
  """A checkpoint directory is missing, unreadable or does not match the encoder."""


@dataclasses.dataclass
class Pretrained:
  config: encoder_lib.EncoderConfig
  params: Any  # float32 NumPy pytree, the structure of encoder.init_params(config, ...)
  tokenizer: tokenization.Tokenizer | None


# --- name mapping ---------------------------------------------------------------------------------
def _hf_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """HF state-dict key of a flax parameter path, and whether the tensor is transposed."""
  parts = []
  for part in path[:-1]:
    match = re.fullmatch(r"layer_(\d+)", part)
    parts.extend(("layer", match.group(1)) if match else (part,))
  leaf = path[-1]
  transpose = leaf == "kernel"
  parts.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
  return ".".join(parts), transpose


def _flat_params(params) -> dict[tuple[str, ...], Any]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {tuple(k.key for k in path): leaf for path, leaf in flat}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree


def params_to_state_dict(params) -> dict[str, np.ndarray]:
  """Flax parameters -> HF state dict (float32, contiguous, unprefixed BertModel-style keys)."""
  state_dict = {}
  for path, value in _flat_params(params).items():
    name, transpose = _hf_name(path)
    array = np.asarray(jax.device_get(value), dtype=np.float32)
    state_dict[name] = np.ascontiguousarray(array.T if transpose else array)
  return state_dict


def _strip_prefixes(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Removes a task model's base prefix and old LayerNorm names (gamma/beta)."""
  out = {}
  for name, value in state_dict.items():
    for prefix in _BASE_PREFIXES:
      if name.startswith(prefix):
        name = name[len(prefix):]
        break
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
    out[name] = value
  return out


def params_from_state_dict(config: encoder_lib.EncoderConfig, state_dict: Mapping[str, Any],
                           source: str = "the checkpoint") -> dict:
  """HF state dict -> flax parameters of `config`, checking every name and shape."""
  state_dict = _strip_prefixes(state_dict)
  expected = jax.eval_shape(lambda: encoder_lib.init_params(config, jax.random.key(0)))
  flat = {}
  missing = []
  for path, spec in _flat_params(expected).items():
    name, transpose = _hf_name(path)
    if name not in state_dict:
      missing.append(name)
      continue
    array = np.asarray(state_dict[name], dtype=np.float32)
    if transpose:
      array = array.T
    if array.shape != spec.shape:
      shape = array.shape[::-1] if transpose else array.shape
      want = spec.shape[::-1] if transpose else spec.shape
      raise CheckpointError(
          f"Tensor {name!r} in {source} has shape {list(shape)} but config.json implies "
          f"{list(want)} (hidden_size={config.hidden_size}, vocab_size={config.vocab_size}, "
          f"intermediate_size={config.intermediate_size}, max_position_embeddings="
          f"{config.max_position_embeddings}, type_vocab_size={config.type_vocab_size}). "
          "config.json and the weights come from different models; use the config.json saved "
          "with these weights.")
    flat[path] = np.ascontiguousarray(array)
  if missing:
    shown = missing[:5] + (["..."] if len(missing) > 5 else [])
    raise CheckpointError(
        f"{source} lacks {len(missing)} tensors the {config.model_type} encoder described by "
        f"config.json needs (num_hidden_layers={config.num_hidden_layers}), e.g. {shown}. "
        "Check that config.json belongs to these weights.")
  used = {_hf_name(path)[0] for path in flat}
  unexpected = sorted(n for n in state_dict
                      if n not in used and not _IGNORED.match(n)
                      and not (n.startswith("pooler.") and not config.add_pooling_layer))
  if unexpected:
    shown = unexpected[:5] + (["..."] if len(unexpected) > 5 else [])
    raise CheckpointError(
        f"{source} holds {len(unexpected)} tensors the {config.model_type} encoder described by "
        f"config.json does not have, e.g. {shown} (config.json says num_hidden_layers="
        f"{config.num_hidden_layers}). Check that config.json belongs to these weights.")
  return _unflatten(flat)


# --- reading files --------------------------------------------------------------------------------
def _read_config(model_dir: str) -> dict:
  path = os.path.join(model_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise CheckpointError(
        f"No {CONFIG_FILE} in {model_dir!r} (found: {sorted(os.listdir(model_dir))}). A Hugging "
        "Face model directory needs config.json next to its weights; save one with "
        "transformers' model.save_pretrained(DIR) or hybrid_jax's save_pretrained.")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"Cannot read {path} as JSON: {e}") from e
  if not isinstance(config, dict):
    raise CheckpointError(f"{path} holds a {type(config).__name__}, expected a JSON object.")
  return config


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # safetensors raises SafetensorError / OSError on corrupt files
    raise CheckpointError(f"Cannot read {path} as safetensors: {e}") from e


def _read_weights(model_dir: str) -> tuple[dict[str, np.ndarray], str]:
  """Reads the weights in the order transformers prefers them; returns them and their file."""
  path = os.path.join(model_dir, SAFETENSORS_FILE)
  if os.path.isfile(path):
    return _read_safetensors(path), path
  index_path = os.path.join(model_dir, SAFETENSORS_INDEX_FILE)
  if os.path.isfile(index_path):
    try:
      with open(index_path, encoding="utf-8") as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"Cannot read the shard index {index_path}: {e}") from e
    state_dict = {}
    for shard in shards:
      shard_path = os.path.join(model_dir, shard)
      if not os.path.isfile(shard_path):
        raise CheckpointError(f"{index_path} names the shard {shard!r}, which is missing.")
      state_dict.update(_read_safetensors(shard_path))
    return state_dict, index_path
  path = os.path.join(model_dir, PYTORCH_FILE)
  if os.path.isfile(path):
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise CheckpointError(
          f"{path} is a PyTorch pickle and reading it needs torch, which is not installed. "
          "Install torch, or convert the directory to safetensors once with transformers "
          "(model.save_pretrained(DIR, safe_serialization=True)).") from e
    try:
      state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types on truncated/corrupt pickles
      raise CheckpointError(f"Cannot read {path} as a PyTorch state dict: {e}") from e
    return {k: v.detach().to(torch.float32).numpy() for k, v in state_dict.items()}, path
  raise CheckpointError(
      f"No weights in {model_dir!r}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX_FILE} or "
      f"{PYTORCH_FILE} (found: {sorted(os.listdir(model_dir))}).")


def load_pretrained(model_dir: str, *, pooling: str | None = None, dtype: str | None = None,
                    **config_overrides) -> Pretrained:
  """Loads a Hugging Face BERT / XLM-R / RoBERTa directory.

  Args:
    model_dir: directory with config.json, weights and (optionally) tokenizer.json.
    pooling: "cls" | "mean" | "pooler"; default: what the directory was saved with by
      hybrid_jax, else "mean".
    dtype: compute dtype ("float32", "bfloat16"); parameters are float32 regardless.
    **config_overrides: other EncoderConfig fields (dropout rates, remat, add_pooling_layer).

  Returns:
    Pretrained(config, params, tokenizer); tokenizer is None when the directory has none.
  """
  model_dir = os.fspath(model_dir)
  if not os.path.isdir(model_dir):
    raise CheckpointError(
        f"Model directory {model_dir!r} does not exist. Expected a Hugging Face model directory "
        f"with {CONFIG_FILE} and {SAFETENSORS_FILE} (or {PYTORCH_FILE}).")
  hf_config = _read_config(model_dir)
  config_path = os.path.join(model_dir, CONFIG_FILE)
  model_type = hf_config.get("model_type")
  if model_type not in encoder_lib.MODEL_TYPES:
    raise CheckpointError(
        f"{config_path} has model_type {model_type!r}; hybrid_jax's encoder implements "
        f"{list(encoder_lib.MODEL_TYPES)} (BERT: LaBSE, multilingual-e5; XLM-R/RoBERTa).")
  state_dict, weights_path = _read_weights(model_dir)
  stripped = _strip_prefixes(state_dict)
  overrides = dict(config_overrides, pooling=pooling, dtype=dtype)
  if overrides.get("add_pooling_layer") is None:
    # HF keeps "has a pooler" out of config.json; the weights say it.
    overrides["add_pooling_layer"] = "pooler.dense.weight" in stripped
  try:
    config = encoder_lib.EncoderConfig.from_hf_config(hf_config, **overrides)
  except (ValueError, TypeError) as e:
    raise CheckpointError(f"{config_path} does not describe a usable encoder: {e}") from e
  params = params_from_state_dict(config, stripped, source=weights_path)

  tokenizer = None
  if os.path.isfile(os.path.join(model_dir, tokenization.TOKENIZER_FILE)):
    try:
      tokenizer = tokenization.Tokenizer.from_dir(model_dir)
      tokenizer.check_fits_embeddings(config.vocab_size, model_name=f"the model in {model_dir}")
    except tokenization.TokenizerError as e:
      raise CheckpointError(str(e)) from e
  return Pretrained(config=config, params=params, tokenizer=tokenizer)


def save_pretrained(out_dir: str, config: encoder_lib.EncoderConfig, params,
                    tokenizer: tokenization.Tokenizer | None = None) -> None:
  """Writes config.json + model.safetensors (+ tokenizer files) loadable by transformers."""
  if tokenizer is not None:
    try:
      tokenizer.check_fits_embeddings(config.vocab_size, model_name="the model being saved")
    except tokenization.TokenizerError as e:
      raise CheckpointError(str(e)) from e
  state_dict = params_to_state_dict(params)
  # Round-trip through the importer's checks, so we never write a directory we cannot read.
  params_from_state_dict(config, state_dict, source="the parameters being saved")
  os.makedirs(out_dir, exist_ok=True)
  safetensors.numpy.save_file(state_dict, os.path.join(out_dir, SAFETENSORS_FILE),
                              metadata={"format": "pt"})  # transformers checks this tag
  hf_config = config.to_hf_config()
  hf_config["dtype"] = "float32"
  with open(os.path.join(out_dir, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  if tokenizer is not None:
    tokenizer.save(out_dir)
    _name_generic_tokenizer_class(out_dir)


def _name_generic_tokenizer_class(out_dir: str) -> None:
  """Makes transformers' AutoTokenizer load tokenizer.json as it is.

  Without `tokenizer_class`, AutoTokenizer picks the model type's slow-tokenizer class (e.g.
  XLMRobertaTokenizer), which rejects tokenizer.json files of other kinds (WordLevel, BPE). The
  generic fast class reads any tokenizer.json, special-token post-processing included.
  """
  path = os.path.join(out_dir, tokenization.TOKENIZER_CONFIG_FILE)
  with open(path, encoding="utf-8") as f:
    tokenizer_config = json.load(f)
  tokenizer_config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
  with open(path, "w", encoding="utf-8") as f:
    json.dump(tokenizer_config, f, indent=2, ensure_ascii=False)
