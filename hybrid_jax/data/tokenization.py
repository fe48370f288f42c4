"""Tokenization with Hugging Face `tokenizers`: one wrapper used by training, evaluation and embed.

A model directory holds `tokenizer.json` (the fast-tokenizer file every HF model ships) and usually
`tokenizer_config.json` (which names the padding token). Texts are tokenized once, up front, in
Rust (batch-parallel); padding to a fixed or bucketed length happens here in NumPy so that the
arrays fed to jit have few distinct shapes.

Parity with transformers. `transformers.AutoTokenizer` (5.x) does not always tokenize with the
pipeline written in tokenizer.json. When the directory names a model-specific tokenizer class
(`tokenizer_class` in tokenizer_config.json, else in config.json, else the class registered for
config.json's `model_type`), that class's `__init__` builds a fresh pipeline from its own defaults
and tokenizer_config.json's arguments, and takes only the vocabulary, the added tokens and the
SentencePiece charsmap from tokenizer.json. For XLMRobertaTokenizer (XLM-R, multilingual-e5) the
fresh pre-tokenizer is WhitespaceSplit + Metaspace instead of the file's bare Metaspace, so
whitespace, leading and trailing included, never becomes a lone "▁" piece (the file's pipeline
turns a trailing space into "▁", id 6, which XLM-R's SentencePiece model, stripping whitespace,
never emits). For BertTokenizer the normalizer follows tokenizer_config.json's `do_lower_case`
(default True), not tokenizer.json's BertNormalizer. `from_dir`
resolves the class the same way and rebuilds the same pipeline with the same `tokenizers`
components (`_REBUILDERS`), so our ids are AutoTokenizer's by construction; generic classes
(PreTrainedTokenizerFast, TokenizersBackend, none named) use tokenizer.json as it is, as
transformers does.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from hybrid_jax import errors

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MODEL_CONFIG_FILE = "config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
_PAD_TOKEN_CANDIDATES = ("<pad>", "[PAD]")


class TokenizerError(errors.UserError):
  """A tokenizer file is missing, unreadable or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class TokenizedBatch:
  input_ids: np.ndarray  # [N, L] int32, padded with the tokenizer's pad id
  attention_mask: np.ndarray  # [N, L] int32, 1 for real tokens
  lengths: np.ndarray  # [N] int32, number of real tokens (special tokens included)


class Tokenizer:
  """A `tokenizers.Tokenizer` with its padding token and fixed-shape batch encoding."""

  def __init__(self, hf_tokenizer: tokenizers.Tokenizer, pad_token_id: int, source: str = "<memory>"):
    # Work on a private copy: truncation settings are mutable state of the Rust object.
    self._tokenizer = tokenizers.Tokenizer.from_str(hf_tokenizer.to_str())
    self._tokenizer.no_padding()
    self._tokenizer.no_truncation()
    self.pad_token_id = int(pad_token_id)
    self.source = source

  # --- construction --------------------------------------------------------------------------
  @classmethod
  def from_dir(cls, model_dir: str) -> "Tokenizer":
    """Loads `tokenizer.json` from a model directory as `transformers.AutoTokenizer` would.

    The pad token comes from tokenizer_config.json; the tokenizer class transformers would pick
    (see the module docstring) decides whether tokenizer.json's pipeline is rebuilt.
    """
    path = os.path.join(model_dir, TOKENIZER_FILE)
    if not os.path.isdir(model_dir):
      raise TokenizerError(
          f"Tokenizer directory {model_dir!r} does not exist. Expected a Hugging Face model "
          f"directory holding {TOKENIZER_FILE}.")
    if not os.path.isfile(path):
      raise TokenizerError(
          f"No {TOKENIZER_FILE} in {model_dir!r} (found: {sorted(os.listdir(model_dir))}). "
          "hybrid_jax needs the fast-tokenizer file; create it in Python with "
          "transformers.AutoTokenizer.from_pretrained(DIR).save_pretrained(DIR).")
    tokenizer_config = _read_optional_json(os.path.join(model_dir, TOKENIZER_CONFIG_FILE))
    model_config = _read_optional_json(os.path.join(model_dir, MODEL_CONFIG_FILE))
    init_kwargs = _transformers_init_kwargs(model_dir, tokenizer_config)
    with open(path, encoding="utf-8") as f:
      text = f.read()
    hf_tokenizer = _parse_tokenizer_json(text, path)
    class_name = transformers_tokenizer_class(tokenizer_config, model_config)
    _rebuild_like_transformers(hf_tokenizer, text, class_name, init_kwargs, model_dir)
    return cls._with_pad_token(hf_tokenizer, _token_content(init_kwargs.get("pad_token")), path)

  @classmethod
  def from_file(cls, tokenizer_json: str, pad_token: str | None = None) -> "Tokenizer":
    """Loads a tokenizer.json as it is (what AutoTokenizer does when no class is named)."""
    try:
      with open(tokenizer_json, encoding="utf-8") as f:
        text = f.read()
    except OSError as e:
      raise TokenizerError(f"Cannot read {tokenizer_json}: {e}") from e
    return cls._with_pad_token(_parse_tokenizer_json(text, tokenizer_json), pad_token,
                               tokenizer_json)

  @classmethod
  def _with_pad_token(cls, hf_tokenizer: tokenizers.Tokenizer, pad_token: str | None,
                      source: str) -> "Tokenizer":
    candidates = ((pad_token,) if pad_token else ()) + _PAD_TOKEN_CANDIDATES
    for token in candidates:
      token_id = hf_tokenizer.token_to_id(token)
      if token_id is not None:
        return cls(hf_tokenizer, token_id, source=source)
    raise TokenizerError(
        f"{source} has no padding token (looked for {list(candidates)}). Set 'pad_token' "
        f"in {TOKENIZER_CONFIG_FILE} next to it.")

  def save(self, out_dir: str) -> None:
    """Writes tokenizer.json and a minimal tokenizer_config.json naming the pad token."""
    os.makedirs(out_dir, exist_ok=True)
    self._tokenizer.save(os.path.join(out_dir, TOKENIZER_FILE))
    config_path = os.path.join(out_dir, TOKENIZER_CONFIG_FILE)
    config = {}
    if os.path.isfile(config_path):
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["pad_token"] = self.id_to_token(self.pad_token_id)
    with open(config_path, "w", encoding="utf-8") as f:
      json.dump(config, f, indent=2, ensure_ascii=False)

  # --- properties ----------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    """Number of token ids the tokenizer can emit (added tokens included)."""
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def hf_tokenizer(self) -> tokenizers.Tokenizer:
    return self._tokenizer

  def id_to_token(self, token_id: int) -> str | None:
    return self._tokenizer.id_to_token(token_id)

  def check_fits_embeddings(self, num_embeddings: int, model_name: str = "the model") -> None:
    """Fails if the tokenizer can emit ids past the embedding table (a silent NaN/garbage source)."""
    max_id = max(self._tokenizer.get_vocab(with_added_tokens=True).values())
    if max_id >= num_embeddings:
      raise TokenizerError(
          f"Tokenizer {self.source} emits token ids up to {max_id} but {model_name} has only "
          f"{num_embeddings} rows in its word-embedding table. The tokenizer and the checkpoint do "
          "not belong together: pass the tokenizer saved with this checkpoint.")

  # --- encoding ------------------------------------------------------------------------------
  def token_ids(self, texts: Sequence[str], max_length: int, prefix: str = "") -> list[np.ndarray]:
    """Token ids per text (special tokens added, truncated to max_length), unpadded."""
    if max_length < 2:
      raise ValueError(f"max_length must be >= 2 (room for special tokens), got {max_length}")
    self._tokenizer.enable_truncation(max_length)
    try:
      encodings = self._tokenizer.encode_batch([prefix + t for t in texts])
    finally:
      self._tokenizer.no_truncation()
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

  def pad(self, ids: Sequence[np.ndarray], length: int | None = None,
          pad_to_multiple_of: int = 1) -> TokenizedBatch:
    """Pads variable-length id arrays to `length` (or the longest, rounded up to a multiple)."""
    lengths = np.asarray([len(x) for x in ids], dtype=np.int32)
    if length is None:
      longest = int(lengths.max()) if len(ids) else 1
      length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    if len(ids) and lengths.max() > length:
      raise ValueError(f"a sequence of {lengths.max()} tokens does not fit padded length {length}")
    input_ids = np.full((len(ids), length), self.pad_token_id, dtype=np.int32)
    for row, x in enumerate(ids):
      input_ids[row, :len(x)] = x
    attention_mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    return TokenizedBatch(input_ids, attention_mask, lengths)

  def encode(self, texts: Sequence[str], max_length: int, prefix: str = "",
             pad_to_max_length: bool = True, pad_to_multiple_of: int = 1) -> TokenizedBatch:
    """Tokenizes, truncates and pads a list of texts.

    Args:
      texts: N strings.
      max_length: truncation length, special tokens included.
      prefix: prepended to every text (E5-style "Query: " / "Passage: ").
      pad_to_max_length: pad to exactly max_length (fixed shapes for training); otherwise pad to
        the longest text rounded up to `pad_to_multiple_of` (length buckets for inference).
    """
    ids = self.token_ids(texts, max_length, prefix)
    return self.pad(ids, max_length if pad_to_max_length else None, pad_to_multiple_of)


# --- transformers' choice of tokenizer class and its rebuilt pipeline ----------------------------
# Classes under which AutoTokenizer uses tokenizer.json as it is (TokenizersBackend is transformers
# 5's name for PreTrainedTokenizerFast; PythonBackend is mapped to it).
_GENERIC_TOKENIZER_CLASSES = ("", "TokenizersBackend", "PreTrainedTokenizerFast",
                              "PreTrainedTokenizer", "PythonBackend")
# The class transformers registers for each model type our encoder supports
# (TOKENIZER_MAPPING_NAMES in transformers/models/auto/tokenization_auto.py).
_TOKENIZER_CLASS_OF_MODEL_TYPE = {"bert": "BertTokenizer", "xlm-roberta": "XLMRobertaTokenizer",
                                  "roberta": "RobertaTokenizer"}


def transformers_tokenizer_class(tokenizer_config: dict, model_config: dict) -> str | None:
  """The tokenizer class `transformers.AutoTokenizer` instantiates for a model directory.

  transformers 5's order: tokenizer_config.json's `tokenizer_class`, then config.json's, then the
  class registered for config.json's `model_type`. "XFast" names class "X" (v5 keeps one class per
  model). Returns "" when no class applies (AutoTokenizer then uses tokenizer.json as it is) and
  None for a model type whose registered class we do not know.
  """
  name = tokenizer_config.get("tokenizer_class") or model_config.get("tokenizer_class")
  if not name:
    model_type = model_config.get("model_type") or ""
    if model_type and model_type not in _TOKENIZER_CLASS_OF_MODEL_TYPE:
      return None
    name = _TOKENIZER_CLASS_OF_MODEL_TYPE.get(model_type, "")
  if name != "PreTrainedTokenizerFast":
    name = name.removesuffix("Fast")
  return name


def _read_optional_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding="utf-8") as f:
      value = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise TokenizerError(f"Cannot read {path}: {e}") from e
  if not isinstance(value, dict):
    raise TokenizerError(f"{path} must hold a JSON object, found {type(value).__name__}")
  return value


def _transformers_init_kwargs(model_dir: str, tokenizer_config: dict) -> dict:
  """The keyword arguments transformers passes to the tokenizer class's __init__.

  tokenizer_config.json's entries; a legacy special_tokens_map.json overrides the special tokens
  when tokenizer_config.json has no `added_tokens_decoder` (transformers' _from_pretrained).
  """
  init_kwargs = dict(tokenizer_config)
  if "added_tokens_decoder" not in tokenizer_config:
    init_kwargs.update(_read_optional_json(os.path.join(model_dir, SPECIAL_TOKENS_MAP_FILE)))
  return init_kwargs


def _token_content(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return None if value is None else str(value)


def _parse_tokenizer_json(text: str, source: str) -> tokenizers.Tokenizer:
  try:
    return tokenizers.Tokenizer.from_str(text)
  except Exception as e:  # tokenizers raises a bare Exception on bad JSON
    raise TokenizerError(f"Cannot parse {source} as a Hugging Face tokenizer.json: {e}") from e


def _special_token_id(hf_tokenizer: tokenizers.Tokenizer, init_kwargs: dict, key: str,
                      default: str, class_name: str, model_dir: str) -> tuple[str, int]:
  token = _token_content(init_kwargs.get(key)) or default
  token_id = hf_tokenizer.token_to_id(token)
  if token_id is None:
    raise TokenizerError(
        f"{os.path.join(model_dir, TOKENIZER_FILE)} has no token {token!r}, the {key} of "
        f"{class_name} (set {key!r} in {TOKENIZER_CONFIG_FILE} to a token of the vocabulary).")
  return token, token_id


def _precompiled_charsmap(spec: dict) -> bytes | None:
  """The SentencePiece charsmap transformers keeps from tokenizer.json's normalizer (top level or
  one Sequence deep; transformers' TokenizersBackend.convert_to_native_format)."""
  normalizer = spec.get("normalizer") or {}
  parts = normalizer["normalizers"] if normalizer.get("type") == "Sequence" else [normalizer]
  for part in parts:
    if part.get("type") == "Precompiled" and part.get("precompiled_charsmap"):
      return base64.b64decode(part["precompiled_charsmap"])
  return None


def _rebuild_like_xlm_roberta(hf_tokenizer: tokenizers.Tokenizer, spec: dict, init_kwargs: dict,
                              model_dir: str) -> bool:
  """transformers 5's XLMRobertaTokenizer.__init__ (models/xlm_roberta/tokenization_xlm_roberta.py),
  also multilingual-e5's."""
  model = spec.get("model") or {}
  if model.get("type") != "Unigram":
    return False
  if model.get("unk_id") != 3 or model.get("byte_fallback"):
    # The class hard-codes these two; the pieces and their scores are the file's.
    hf_tokenizer.model = models.Unigram(
        [tuple(piece) for piece in model["vocab"]], unk_id=3, byte_fallback=False)
  # Only the charsmap survives: the file's other normalizers (XLM-R's Replace(" {2,}", " ")) go,
  # as WhitespaceSplit below already drops runs of whitespace.
  charsmap = _precompiled_charsmap(spec)
  hf_tokenizer.normalizer = None if charsmap is None else normalizers.Precompiled(charsmap)
  prepend_scheme = "always" if init_kwargs.get("add_prefix_space", True) else "never"
  hf_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.WhitespaceSplit(),
      pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)])
  hf_tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
  bos, bos_id = _special_token_id(hf_tokenizer, init_kwargs, "bos_token", "<s>",
                                  "XLMRobertaTokenizer", model_dir)
  eos, eos_id = _special_token_id(hf_tokenizer, init_kwargs, "eos_token", "</s>",
                                  "XLMRobertaTokenizer", model_dir)
  hf_tokenizer.post_processor = processors.TemplateProcessing(
      single=[bos, "$A", eos], pair=[bos, "$A", eos, eos, "$B", eos],
      special_tokens=[(bos, bos_id), (eos, eos_id)])
  return True


def _rebuild_like_bert(hf_tokenizer: tokenizers.Tokenizer, spec: dict, init_kwargs: dict,
                       model_dir: str) -> bool:
  """transformers 5's BertTokenizer.__init__ (models/bert/tokenization_bert.py), also LaBSE's."""
  model = spec.get("model") or {}
  if model.get("type") != "WordPiece":
    return False
  unk = _token_content(init_kwargs.get("unk_token")) or "[UNK]"
  if (model.get("unk_token"), model.get("continuing_subword_prefix"),
      model.get("max_input_chars_per_word")) != (unk, "##", 100):
    # The class builds WordPiece(vocab, unk_token) with the library's defaults for the rest.
    hf_tokenizer.model = models.WordPiece(model["vocab"], unk_token=unk)
  # The normalizer follows tokenizer_config.json's arguments (lowercasing by default), whatever
  # tokenizer.json's BertNormalizer says.
  hf_tokenizer.normalizer = normalizers.BertNormalizer(
      clean_text=True, handle_chinese_chars=init_kwargs.get("tokenize_chinese_chars", True),
      strip_accents=init_kwargs.get("strip_accents"),
      lowercase=init_kwargs.get("do_lower_case", True))
  hf_tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  hf_tokenizer.decoder = decoders.WordPiece(prefix="##")
  cls_token, cls_id = _special_token_id(hf_tokenizer, init_kwargs, "cls_token", "[CLS]",
                                        "BertTokenizer", model_dir)
  sep_token, sep_id = _special_token_id(hf_tokenizer, init_kwargs, "sep_token", "[SEP]",
                                        "BertTokenizer", model_dir)
  hf_tokenizer.post_processor = processors.TemplateProcessing(
      single=f"{cls_token}:0 $A:0 {sep_token}:0",
      pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
      special_tokens=[(cls_token, cls_id), (sep_token, sep_id)])
  return True


# tokenizer class -> rebuild of tokenizer.json's pipeline as that class's __init__ does it; True
# when done, False when tokenizer.json holds another kind of model than the class builds.
_REBUILDERS: dict[str, Callable[[tokenizers.Tokenizer, dict, dict, str], bool]] = {
    "XLMRobertaTokenizer": _rebuild_like_xlm_roberta,
    "BertTokenizer": _rebuild_like_bert,
}


def _rebuild_like_transformers(hf_tokenizer: tokenizers.Tokenizer, text: str,
                               class_name: str | None, init_kwargs: dict, model_dir: str) -> None:
  """Gives hf_tokenizer the pipeline transformers' tokenizer class would build (in place)."""
  if class_name in _GENERIC_TOKENIZER_CLASSES:
    return
  rebuild = _REBUILDERS.get(class_name or "")
  if rebuild is None:
    named = (f"the tokenizer class {class_name}" if class_name else
             "the tokenizer class transformers registers for its model type")
    warnings.warn(
        f"{model_dir} names {named}; hybrid_jax reproduces transformers' rebuilt pipeline only "
        f"for {sorted(_REBUILDERS)} and uses {TOKENIZER_FILE} as it is, so token ids may differ "
        "from transformers.AutoTokenizer's. Set \"tokenizer_class\": \"PreTrainedTokenizerFast\" "
        f"in {TOKENIZER_CONFIG_FILE} to make both use {TOKENIZER_FILE} as it is.")
    return
  spec = json.loads(text)
  if not rebuild(hf_tokenizer, spec, init_kwargs, model_dir):
    # transformers would force the vocabulary into the class's own model kind (BertTokenizer turns
    # a WordLevel vocabulary into WordPiece) or fail: a misreading not worth reproducing.
    warnings.warn(
        f"{model_dir} names the tokenizer class {class_name}, but its {TOKENIZER_FILE} holds a "
        f"{(spec.get('model') or {}).get('type')} model, not that class's kind; hybrid_jax uses "
        f"{TOKENIZER_FILE} as it is, transformers.AutoTokenizer would misread or reject it. Set "
        f"\"tokenizer_class\": \"PreTrainedTokenizerFast\" in {TOKENIZER_CONFIG_FILE} to make "
        "both use it as it is.")
