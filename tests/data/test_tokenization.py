"""Tokenizer wrapper: loading, truncation with special tokens, padding, clear errors."""

import json
import os

import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors

from hybrid_jax.data import tokenization


def _word_level_tokenizer(words):
  vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}
  for w in words:
    vocab.setdefault(w, len(vocab))
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.post_processor = processors.TemplateProcessing(
      single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  return tok


@pytest.fixture
def model_dir(tmp_path):
  _word_level_tokenizer("a b c d e f Query:".split()).save(str(tmp_path / "tokenizer.json"))
  return str(tmp_path)


def test_encode_truncates_keeping_special_tokens_and_pads(model_dir):
  tok = tokenization.Tokenizer.from_dir(model_dir)
  assert tok.pad_token_id == 0 and tok.vocab_size == 11
  batch = tok.encode(["a b c d e f", "b"], max_length=5)
  # [CLS]=2 a=4 b=5 c=6 [SEP]=3: truncation keeps the closing special token.
  np.testing.assert_array_equal(batch.input_ids, [[2, 4, 5, 6, 3], [2, 5, 3, 0, 0]])
  np.testing.assert_array_equal(batch.attention_mask, [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
  np.testing.assert_array_equal(batch.lengths, [5, 3])
  assert batch.input_ids.dtype == np.int32


def test_prefix_and_bucketed_padding(model_dir):
  tok = tokenization.Tokenizer.from_dir(model_dir)
  batch = tok.encode(["a", "a b"], max_length=32, prefix="Query: ", pad_to_max_length=False,
                     pad_to_multiple_of=8)
  assert batch.input_ids.shape == (2, 8)
  np.testing.assert_array_equal(batch.input_ids[1, :5], [2, 10, 4, 5, 3])


def test_save_round_trip_keeps_pad_token(model_dir, tmp_path):
  tok = tokenization.Tokenizer.from_dir(model_dir)
  out = tmp_path / "copy"
  tok.save(str(out))
  with open(out / "tokenizer_config.json") as f:
    assert json.load(f)["pad_token"] == "[PAD]"
  again = tokenization.Tokenizer.from_dir(str(out))
  np.testing.assert_array_equal(again.encode(["c d"], 6).input_ids, tok.encode(["c d"], 6).input_ids)


def test_clear_errors(tmp_path, model_dir):
  with pytest.raises(tokenization.TokenizerError, match="does not exist"):
    tokenization.Tokenizer.from_dir(str(tmp_path / "nope"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(tokenization.TokenizerError, match="No tokenizer.json"):
    tokenization.Tokenizer.from_dir(str(empty))
  (empty / "tokenizer.json").write_text("{not json")
  with pytest.raises(tokenization.TokenizerError, match="Cannot parse"):
    tokenization.Tokenizer.from_dir(str(empty))
  tok = tokenization.Tokenizer.from_dir(model_dir)
  with pytest.raises(tokenization.TokenizerError, match="emits token ids up to 10 but .* only 8 rows"):
    tok.check_fits_embeddings(8)
  tok.check_fits_embeddings(11)
