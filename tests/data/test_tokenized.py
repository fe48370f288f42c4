"""Ragged token tables: gather + pad equals tokenizing the texts directly; truncation counted."""

from __future__ import annotations

import numpy as np
import tokenizers
from tokenizers import models, pre_tokenizers, processors

from hybrid_jax.data import tokenization
from hybrid_jax.data import tokenized


def _tokenizer():
  vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "Query:": 4}
  for word in "a b c d e f g h".split():
    vocab[word] = len(vocab)
  hf = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  hf.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                    special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  return tokenization.Tokenizer(hf, pad_token_id=0)


def test_gather_matches_direct_encoding_and_counts_truncation():
  tokenizer = _tokenizer()
  texts = np.array([["a b", None, "c"],
                    ["a b c d e f g", "h", None]], dtype=object)  # [N=2, K=3]
  table = tokenized.tokenize_field(tokenizer, texts, "Query: ", max_length=6)
  assert table.num_truncated == 1  # "Query: a b c d e f g" is 10 tokens with [CLS]/[SEP]
  example = np.array([1, 0, 0, 1])
  lang = np.array([0, 2, 0, 1])
  input_ids, mask = table.gather(example, lang)
  expected = tokenizer.encode([texts[n, k] for n, k in zip(example, lang)], 6, prefix="Query: ")
  np.testing.assert_array_equal(input_ids, expected.input_ids)
  np.testing.assert_array_equal(mask, expected.attention_mask)
  np.testing.assert_array_equal(input_ids[0], [2, 4, 5, 6, 7, 3])  # truncated, [SEP] kept
  np.testing.assert_array_equal(table.lengths(example, lang), [6, 4, 5, 4])
  np.testing.assert_array_equal(table.lengths(np.array([0, 1]), np.array([1, 2])), [0, 0])  # missing
  assert input_ids.dtype == mask.dtype == np.int32
