"""PyTorch `transformers` reference models and padded batches for the encoder parity tests.

The reference is the independent implementation: randomly initialised `BertModel` /
`XLMRobertaModel` / `RobertaModel` in eval mode, whose state dict our importer maps onto the Flax
encoder. Models are tiny (hidden 36-60, 1-4 layers) so the whole parity suite stays fast on CPU.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import transformers

_CONFIG_CLASSES = {
    "bert": transformers.BertConfig,
    "xlm-roberta": transformers.XLMRobertaConfig,
    "roberta": transformers.RobertaConfig,
}


@dataclasses.dataclass(frozen=True)
class Case:
  """One reference architecture: family, odd sizes and whether the BERT pooler exists."""
  model_type: str
  hidden_size: int
  num_attention_heads: int
  num_hidden_layers: int
  add_pooling_layer: bool
  vocab_size: int = 97
  intermediate_size: int = 53
  max_position_embeddings: int = 40

  @property
  def name(self) -> str:
    return (f"{self.model_type}-h{self.hidden_size}-n{self.num_attention_heads}-"
            f"l{self.num_hidden_layers}-{'pooler' if self.add_pooling_layer else 'nopooler'}")

  def hf_config(self) -> transformers.PretrainedConfig:
    roberta = self.model_type != "bert"
    return _CONFIG_CLASSES[self.model_type](
        vocab_size=self.vocab_size, hidden_size=self.hidden_size,
        num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
        intermediate_size=self.intermediate_size,
        max_position_embeddings=self.max_position_embeddings,
        type_vocab_size=1 if roberta else 2, pad_token_id=1 if roberta else 0,
        layer_norm_eps=1e-5 if roberta else 1e-12)


def torch_model(case: Case, seed: int = 0) -> transformers.PreTrainedModel:
  """A randomly initialised transformers base model in eval mode (dropout off)."""
  torch.manual_seed(seed)
  model = transformers.AutoModel.from_config(case.hf_config(),
                                             add_pooling_layer=case.add_pooling_layer)
  # HF initialises LayerNorm to (1, 0) and biases to 0; perturb them so the mapping of every
  # tensor (not only the random kernels) is checked.
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        tensor.add_(0.1 * torch.randn_like(tensor))
  return model.eval()


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def padded_batch(case: Case, lengths, seed: int = 0, length: int | None = None):
  """Random token ids [B, L] (never the pad id inside a sequence) and attention mask [B, L]."""
  pad_id = case.hf_config().pad_token_id
  rng = np.random.default_rng(seed)
  length = length or max(lengths)
  ids = rng.integers(3, case.vocab_size, size=(len(lengths), length))
  mask = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
  ids = np.where(mask == 1, ids, pad_id).astype(np.int32)
  return ids, mask


def torch_outputs(model, ids, mask, token_type_ids=None) -> dict[str, np.ndarray]:
  """last_hidden_state and the three poolings, computed from the reference model's outputs."""
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(ids, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long),
                token_type_ids=(None if token_type_ids is None
                                else torch.as_tensor(token_type_ids, dtype=torch.long)))
  hidden = out.last_hidden_state.numpy()
  weights = mask[..., None].astype(np.float64)
  result = {
      "last_hidden_state": hidden,
      "cls": hidden[:, 0],
      "mean": ((hidden * weights).sum(1) / weights.sum(1)).astype(np.float32),
  }
  if out.pooler_output is not None:
    result["pooler"] = out.pooler_output.numpy()
  return result


def l2_normalize(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)
