"""Hugging Face checkpoint import/export: transformers dirs -> our encoder -> transformers again."""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
import pytest
import safetensors.numpy
import tokenizers
import torch
import transformers

from hybrid_jax.data import tokenization
from hybrid_jax.models import encoder as encoder_lib
from hybrid_jax.models import hf_checkpoint
from torch_reference import Case  # tests/models/torch_reference.py
from torch_reference import l2_normalize, padded_batch, state_dict_numpy, torch_model, torch_outputs

PARITY_TOL = 1e-4
BERT = Case("bert", hidden_size=36, num_attention_heads=6, num_hidden_layers=2,
            add_pooling_layer=True)
XLMR = Case("xlm-roberta", hidden_size=60, num_attention_heads=5, num_hidden_layers=2,
            add_pooling_layer=False)
LENGTHS = (12, 8, 3)


def _word_level_tokenizer(vocab_size: int, pad_token: str = "[PAD]") -> tokenization.Tokenizer:
  vocab = {pad_token: 0, "[UNK]": 1}
  vocab.update({f"w{i}": i for i in range(2, vocab_size)})
  hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  return tokenization.Tokenizer(hf, pad_token_id=0)


def _encode(config, params, ids, mask):
  return jax.jit(encoder_lib.Encoder(config).apply)({"params": params}, ids, mask)


def _max_diff(a, b) -> float:
  return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def _save_transformers_dir(model, path, weights: str):
  """A directory as transformers writes it, with safetensors or a pytorch_model.bin pickle."""
  model.save_pretrained(path)  # transformers 5 writes model.safetensors
  if weights == "bin":
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))


@pytest.mark.parametrize("case, weights, pooling", [
    (BERT, "safetensors", "pooler"),
    (XLMR, "bin", "mean"),
], ids=["bert-safetensors", "xlmr-pytorch_model.bin"])
def test_import_of_a_transformers_directory(tmp_path, case, weights, pooling):
  model = torch_model(case, seed=4)
  _save_transformers_dir(model, tmp_path, weights)
  loaded = hf_checkpoint.load_pretrained(str(tmp_path), pooling=pooling)
  assert loaded.config.model_type == case.model_type
  assert loaded.config.add_pooling_layer == case.add_pooling_layer  # read from the weights
  assert loaded.config.pooling == pooling and loaded.tokenizer is None
  assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {np.dtype(np.float32)}
  ids, mask = padded_batch(case, LENGTHS, seed=4)
  reference = torch_outputs(model, ids, mask)
  ours = _encode(loaded.config, loaded.params, ids, mask)
  assert _max_diff(ours.last_hidden_state, reference["last_hidden_state"]) <= PARITY_TOL
  assert _max_diff(ours.pooled, reference[pooling]) <= PARITY_TOL
  assert _max_diff(ours.embedding, l2_normalize(reference[pooling])) <= PARITY_TOL


def test_import_strips_the_task_model_prefix(tmp_path):
  # BertForMaskedLM stores the encoder under "bert." next to an "cls." head we do not use.
  torch.manual_seed(5)
  masked_lm = transformers.BertForMaskedLM(BERT.hf_config()).eval()
  masked_lm.save_pretrained(tmp_path)
  loaded = hf_checkpoint.load_pretrained(str(tmp_path), pooling="cls")
  assert not loaded.config.add_pooling_layer  # the MLM model has no pooler
  ids, mask = padded_batch(BERT, LENGTHS, seed=5)
  reference = torch_outputs(masked_lm.bert, ids, mask)
  ours = _encode(loaded.config, loaded.params, ids, mask)
  assert _max_diff(ours.last_hidden_state, reference["last_hidden_state"]) <= PARITY_TOL


@pytest.mark.parametrize("case, pooling", [(BERT, "pooler"), (XLMR, "mean")],
                         ids=["bert", "xlmr"])
def test_export_loads_in_transformers_with_the_same_outputs(tmp_path, case, pooling):
  config = encoder_lib.EncoderConfig.from_hf_config(
      case.hf_config().to_dict(), add_pooling_layer=case.add_pooling_layer, pooling=pooling)
  # Random params with non-trivial LayerNorms and biases (torch_model perturbs them), so every
  # tensor's mapping matters; taken from a torch model of another seed to skip an init compile.
  params = hf_checkpoint.params_from_state_dict(config, state_dict_numpy(torch_model(case, 7)))
  params = jax.tree.map(lambda x: x * np.float32(1.5), params)  # unlike anything torch made
  tokenizer = _word_level_tokenizer(case.vocab_size)
  hf_checkpoint.save_pretrained(str(tmp_path), config, params, tokenizer)

  saved_config = json.loads((tmp_path / "config.json").read_text())
  assert saved_config["model_type"] == case.model_type
  assert saved_config["architectures"] == [
      {"bert": "BertModel", "xlm-roberta": "XLMRobertaModel"}[case.model_type]]
  model = transformers.AutoModel.from_pretrained(
      str(tmp_path), add_pooling_layer=case.add_pooling_layer).eval()
  assert type(model).__name__ == saved_config["architectures"][0]

  ids, mask = padded_batch(case, LENGTHS, seed=7)
  reference = torch_outputs(model, ids, mask)
  ours = _encode(config, params, ids, mask)
  assert _max_diff(ours.last_hidden_state, reference["last_hidden_state"]) <= PARITY_TOL
  assert _max_diff(ours.pooled, reference[pooling]) <= PARITY_TOL

  # And back: our own export re-imports bit-exactly, with pooling and tokenizer.
  reloaded = hf_checkpoint.load_pretrained(str(tmp_path))
  assert reloaded.config == config
  jax.tree.map(np.testing.assert_array_equal, reloaded.params,
               jax.tree.map(np.asarray, params))
  assert reloaded.tokenizer is not None and reloaded.tokenizer.vocab_size == case.vocab_size
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path)).pad_token_id == 0


def test_load_overrides_dtype_and_dropout(tmp_path):
  torch_model(BERT).save_pretrained(tmp_path)
  loaded = hf_checkpoint.load_pretrained(str(tmp_path), pooling="cls", dtype="bfloat16",
                                         hidden_dropout_prob=0.0, remat=True)
  assert (loaded.config.dtype, loaded.config.hidden_dropout_prob, loaded.config.remat) == (
      "bfloat16", 0.0, True)
  assert {x.dtype for x in jax.tree.leaves(loaded.params)} == {np.dtype(np.float32)}


# --- clear errors ---------------------------------------------------------------------------------
@pytest.fixture()
def bert_dir(tmp_path):
  torch_model(BERT).save_pretrained(tmp_path)
  return tmp_path


def test_missing_directory(tmp_path):
  with pytest.raises(hf_checkpoint.CheckpointError, match="does not exist"):
    hf_checkpoint.load_pretrained(str(tmp_path / "nope"))


def test_missing_config(bert_dir):
  os.remove(bert_dir / "config.json")
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=r"No config\.json in .*model\.safetensors"):
    hf_checkpoint.load_pretrained(str(bert_dir))


def test_unreadable_config(bert_dir):
  (bert_dir / "config.json").write_text("{not json")
  with pytest.raises(hf_checkpoint.CheckpointError, match=r"Cannot read .*config\.json as JSON"):
    hf_checkpoint.load_pretrained(str(bert_dir))


def test_missing_weights(bert_dir):
  os.remove(bert_dir / "model.safetensors")
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=r"No weights in .*expected model\.safetensors.*pytorch_model\.bin"):
    hf_checkpoint.load_pretrained(str(bert_dir))


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_unreadable_weights(bert_dir, name):
  os.remove(bert_dir / "model.safetensors")
  (bert_dir / name).write_bytes(b"\x00garbage" * 10)
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=rf"Cannot read .*{name.replace('.', r'[.]')}"):
    hf_checkpoint.load_pretrained(str(bert_dir))


@pytest.mark.parametrize("field,value,message", [
    ("model_type", "t5", r"model_type 't5'.*implements \['bert', 'xlm-roberta', 'roberta'\]"),
    ("position_embedding_type", "relative_key",
     r"config\.json does not describe a usable encoder.*'relative_key'"),
])
def test_unsupported_config_fields(bert_dir, field, value, message):
  config = json.loads((bert_dir / "config.json").read_text())
  config[field] = value
  (bert_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_checkpoint.CheckpointError, match=message):
    hf_checkpoint.load_pretrained(str(bert_dir))


def test_config_that_contradicts_the_weights_names_the_tensor(bert_dir):
  config = json.loads((bert_dir / "config.json").read_text())
  config["intermediate_size"] = 64
  (bert_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=r"'encoder\.layer\.0\.intermediate\.dense\.bias'.*shape \[53\] "
                           r"but config\.json implies \[64\]"):
    hf_checkpoint.load_pretrained(str(bert_dir))


def test_config_with_fewer_or_more_layers_than_the_weights(bert_dir):
  config = json.loads((bert_dir / "config.json").read_text())
  config["num_hidden_layers"] = 1
  (bert_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_checkpoint.CheckpointError, match=r"does not have.*encoder\.layer\.1\."):
    hf_checkpoint.load_pretrained(str(bert_dir))
  config["num_hidden_layers"] = 3
  (bert_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=r"lacks \d+ tensors.*encoder\.layer\.2\."):
    hf_checkpoint.load_pretrained(str(bert_dir))


def test_tokenizer_larger_than_the_embedding_table(bert_dir):
  _word_level_tokenizer(BERT.vocab_size + 10).save(str(bert_dir))
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=rf"ids up to {BERT.vocab_size + 9} .*only {BERT.vocab_size} rows"):
    hf_checkpoint.load_pretrained(str(bert_dir))


def test_pooler_pooling_without_pooler_weights(tmp_path):
  torch_model(XLMR).save_pretrained(tmp_path)
  with pytest.raises(hf_checkpoint.CheckpointError, match="needs add_pooling_layer=True"):
    hf_checkpoint.load_pretrained(str(tmp_path), pooling="pooler")


def test_save_rejects_params_that_do_not_match_the_config(tmp_path):
  config = encoder_lib.EncoderConfig.from_hf_config(BERT.hf_config().to_dict(),
                                                    add_pooling_layer=True)
  params = hf_checkpoint.params_from_state_dict(config, state_dict_numpy(torch_model(BERT)))
  with pytest.raises(hf_checkpoint.CheckpointError, match="word_embeddings"):
    hf_checkpoint.save_pretrained(str(tmp_path), config.replace(vocab_size=50), params)
  assert not (tmp_path / "model.safetensors").exists()


def test_sharded_safetensors_index(tmp_path):
  model = torch_model(BERT)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  names = sorted(state)
  halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2:]}
  for shard, keys in halves.items():
    safetensors.numpy.save_file({k: state[k] for k in keys}, str(tmp_path / shard))
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}))
  model.config.save_pretrained(tmp_path)
  loaded = hf_checkpoint.load_pretrained(str(tmp_path), pooling="pooler")
  np.testing.assert_array_equal(
      loaded.params["pooler"]["dense"]["kernel"], state["pooler.dense.weight"].T)


def test_transposed_kernel_shape_error_uses_torch_layout():
  config = encoder_lib.EncoderConfig.from_hf_config(BERT.hf_config().to_dict(),
                                                    add_pooling_layer=True)
  state = {k: v.numpy() for k, v in torch_model(BERT).state_dict().items()}
  state["encoder.layer.1.output.dense.weight"] = np.zeros((36, 50), np.float32)
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=r"'encoder\.layer\.1\.output\.dense\.weight'.*shape \[36, 50\] but "
                           r"config\.json implies \[36, 53\]"):
    hf_checkpoint.params_from_state_dict(config, state)


def test_pytorch_bin_without_torch_installed(tmp_path, monkeypatch):
  _save_transformers_dir(torch_model(BERT), tmp_path, "bin")
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
  with pytest.raises(hf_checkpoint.CheckpointError,
                     match=r"pytorch_model\.bin is a PyTorch pickle and reading it needs torch"):
    hf_checkpoint.load_pretrained(str(tmp_path))
