r"""Encoder train step: hybrid_jax's Flax encoder versus the same model in PyTorch transformers.

    python benchmarks/encoder_step.py                       # small: 4 layers, hidden 256
    python benchmarks/encoder_step.py --shape=xlmr-base     # XLM-R base, batch 8, seq 128

One train step = forward + backward + AdamW update of a dual-encoder-style loss: the batch is
split in halves (queries, passages), each row mean-pooled and L2-normalised, and the halves scored
with an in-batch-negatives InfoNCE (scale 20), as in training. Both sides run the same architecture
with the same weights (the torch model's random init, imported through hf_checkpoint), the same
batch (random ids, padded rows of varied lengths), dropout 0.1 in training mode, AdamW (lr 3e-5,
weight decay 0.01):
  ours   jax.jit(step, donate_argnums=0): value_and_grad + optax.adamw; dropout bits from the
         threefry generator, as hybrid_jax.train_step does.
  torch  transformers XLMRobertaModel / BertModel in train mode (its default SDPA attention),
         torch.optim.AdamW; torch.set_num_threads = the number of cores XLA's CPU client uses.
Each side runs on its framework's default device: CPU here; on a GPU host both use the GPU (torch
in float32; pass --dtype=bfloat16 for ours to see the mixed-precision figure).
Both are warmed up (compile / allocator), then timed in interleaved rounds (ours, torch, ours,
...) so that load from other processes on a shared machine hits both alike. Before timing, the
dropout-free losses of both are compared, which shows the two steps compute the same function.
Prints sequences/s of both and the ratio ours / torch (goal >= 1.0).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from hybrid_jax.models import encoder as encoder_lib  # noqa: E402
from hybrid_jax.models import hf_checkpoint  # noqa: E402

SHAPES = {
    # The :runlocal encoder: for smoke runs (benchmarks/accelerator.sh --smoke).
    "tiny": dict(model_type="xlm-roberta", vocab_size=512, hidden_size=64, num_hidden_layers=2,
                 num_attention_heads=4, intermediate_size=128, batch_size=4, seq_len=16, steps=1,
                 rounds=1, warmup=1),
    # A laptop-sized model: fast enough to iterate on.
    "small": dict(model_type="xlm-roberta", vocab_size=32000, hidden_size=256,
                  num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                  batch_size=16, seq_len=128, steps=6, rounds=4, warmup=2),
    # XLM-R base (the paper's backbone): 12 layers, hidden 768, 250k vocabulary.
    "xlmr-base": dict(model_type="xlm-roberta", vocab_size=250002, hidden_size=768,
                      num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      batch_size=8, seq_len=128, steps=1, rounds=3, warmup=1),
}
SCALE = 20.0  # InfoNCE logit scale (1 / temperature 0.05)
LEARNING_RATE, WEIGHT_DECAY = 3e-5, 0.01


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", choices=sorted(SHAPES), default="small")
  parser.add_argument("--batch_size", type=int, help="override the shape's batch size (even)")
  parser.add_argument("--seq_len", type=int, help="override the shape's padded length")
  parser.add_argument("--steps", type=int, help="timed steps per round and side")
  parser.add_argument("--rounds", type=int, help="interleaved timing rounds")
  parser.add_argument("--warmup", type=int, help="untimed steps per side (compile included)")
  parser.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout")
  parser.add_argument("--dtype", default="float32", help="our compute dtype (torch stays fp32)")
  parser.add_argument("--sides", choices=("both", "ours", "torch"), default="both",
                      help="time one side only (to profile it, or to check that the two do "
                      "not slow each other down when interleaved)")
  args = parser.parse_args()
  shape = dict(SHAPES[args.shape])
  for name in ("batch_size", "seq_len", "steps", "rounds", "warmup"):
    if getattr(args, name) is not None:
      shape[name] = getattr(args, name)
  if shape["batch_size"] % 2:
    parser.error("--batch_size must be even (queries and passages are the two halves)")
  return args, shape


def make_batch(shape, pad_id: int, seed: int = 0):
  """Random ids [B, L] with rows of varied lengths (60-100% of L), and the attention mask."""
  rng = np.random.default_rng(seed)
  batch, length = shape["batch_size"], shape["seq_len"]
  lengths = rng.integers(int(0.6 * length), length + 1, size=batch)
  lengths[0] = length
  ids = rng.integers(5, shape["vocab_size"], size=(batch, length))
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  return np.where(mask == 1, ids, pad_id).astype(np.int32), mask


# --- PyTorch side ---------------------------------------------------------------------------------
def torch_loss(model, ids, mask):
  hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, H]
  weights = mask[..., None].to(hidden.dtype)
  pooled = (hidden * weights).sum(1) / weights.sum(1)
  emb = torch.nn.functional.normalize(pooled, dim=-1)
  half = emb.shape[0] // 2
  scores = SCALE * emb[:half] @ emb[half:].T  # [B/2, B/2]
  return torch.nn.functional.cross_entropy(scores, torch.arange(half, device=scores.device))


def make_torch_step(model, optimizer, ids, mask, device):
  ids = torch.as_tensor(ids, dtype=torch.long, device=device)
  mask = torch.as_tensor(mask, dtype=torch.long, device=device)

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch_loss(model, ids, mask)
    loss.backward()
    optimizer.step()
    return loss

  return step


# --- JAX side -------------------------------------------------------------------------------------
def make_jax_step(config: encoder_lib.EncoderConfig):
  encoder = encoder_lib.Encoder(config)
  optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)

  def loss_fn(params, ids, mask, dropout_key, deterministic):
    rngs = None if deterministic else {"dropout": dropout_key}
    emb = encoder.apply({"params": params}, ids, mask, deterministic=deterministic,
                        rngs=rngs).embedding  # [B, H] f32, normalised
    half = emb.shape[0] // 2
    scores = SCALE * emb[:half] @ emb[half:].T  # [B/2, B/2]
    return optax.softmax_cross_entropy_with_integer_labels(scores, jnp.arange(half)).mean()

  def train_step(state, ids, mask, dropout_key):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, ids, mask, dropout_key, False)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  eval_loss = jax.jit(lambda p, ids, mask: loss_fn(p, ids, mask, None, True))
  return optimizer, jax.jit(train_step, donate_argnums=0), eval_loss


def main():
  args, shape = parse_args()
  num_threads = len(os.sched_getaffinity(0))  # XLA's CPU client uses every core it may run on
  torch.set_num_threads(num_threads)
  roberta = shape["model_type"] != "bert"
  hf_config = (transformers.XLMRobertaConfig if roberta else transformers.BertConfig)(
      vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
      num_hidden_layers=shape["num_hidden_layers"],
      num_attention_heads=shape["num_attention_heads"],
      intermediate_size=shape["intermediate_size"],
      max_position_embeddings=shape["seq_len"] + (3 if roberta else 1),
      type_vocab_size=1 if roberta else 2, pad_token_id=1 if roberta else 0,
      layer_norm_eps=1e-5 if roberta else 1e-12,
      hidden_dropout_prob=args.dropout, attention_probs_dropout_prob=args.dropout)
  _log(f"shape {args.shape}: {shape}; dropout {args.dropout}; {num_threads} threads; "
       f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} on "
       f"{'cuda' if torch.cuda.is_available() else 'cpu'}")

  torch.manual_seed(0)
  model = transformers.AutoModel.from_config(hf_config, add_pooling_layer=False)
  config = encoder_lib.EncoderConfig.from_hf_config(
      hf_config.to_dict(), add_pooling_layer=False, pooling="mean", dtype=args.dtype)
  params = hf_checkpoint.params_from_state_dict(
      config, {k: v.detach().numpy() for k, v in model.state_dict().items()})
  # Each side on its framework's accelerator when there is one (CPU here).
  torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  model.to(torch_device)
  params = jax.device_put(params)
  ids, mask = make_batch(shape, hf_config.pad_token_id)

  # Same function on both sides: dropout-free losses at the shared initial weights.
  optimizer, jax_step, jax_eval_loss = make_jax_step(config)
  model.eval()
  with torch.no_grad():
    reference = float(torch_loss(
        model, torch.as_tensor(ids, dtype=torch.long, device=torch_device),
        torch.as_tensor(mask, dtype=torch.long, device=torch_device)))
  ours = float(jax_eval_loss(params, ids, mask))
  _log(f"dropout-free loss at init: ours {ours:.6f}, torch {reference:.6f} "
       f"(|diff| {abs(ours - reference):.2e})")
  model.train()
  torch_optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE,
                                      weight_decay=WEIGHT_DECAY)
  torch_step = make_torch_step(model, torch_optimizer, ids, mask, torch_device)

  state = (params, optimizer.init(params))
  ids_device, mask_device = jax.device_put(ids), jax.device_put(mask)
  dropout_key = jax.random.key(0, impl="threefry2x32")
  step_counter = 0

  def run_ours(steps: int) -> float:
    nonlocal state, step_counter
    start = time.perf_counter()
    for _ in range(steps):
      state, loss = jax_step(state, ids_device, mask_device,
                             jax.random.fold_in(dropout_key, step_counter))
      step_counter += 1
    loss.block_until_ready()
    return time.perf_counter() - start

  def run_torch(steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      torch_step()
    if torch_device.type == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - start

  time_ours, time_torch = args.sides in ("both", "ours"), args.sides in ("both", "torch")
  if not time_ours:
    run_ours = lambda steps: float("nan")  # noqa: E731
  if not time_torch:
    run_torch = lambda steps: float("nan")  # noqa: E731
  start = time.perf_counter()
  run_ours(shape["warmup"])
  _log(f"ours: warm-up {shape['warmup']} steps (compile included) "
       f"{time.perf_counter() - start:.1f}s")
  start = time.perf_counter()
  run_torch(shape["warmup"])
  _log(f"torch: warm-up {shape['warmup']} steps {time.perf_counter() - start:.1f}s")

  ours_time = torch_time = 0.0
  rounds, steps = shape["rounds"], shape["steps"]
  for r in range(rounds):
    ours_round, torch_round = run_ours(steps), run_torch(steps)
    ours_time += ours_round
    torch_time += torch_round
    remaining = (rounds - r - 1) * np.nansum([ours_round, torch_round])
    _log(f"round {r + 1}/{rounds}: ours {steps / ours_round:.3f} steps/s, torch "
         f"{steps / torch_round:.3f} steps/s; ETA {remaining:.0f}s")

  sequences = rounds * steps * shape["batch_size"]
  ours_rate, torch_rate = sequences / ours_time, sequences / torch_time
  print(f"encoder train step, shape {args.shape} (batch {shape['batch_size']}, seq "
        f"{shape['seq_len']}, {shape['num_hidden_layers']} layers, hidden "
        f"{shape['hidden_size']}, dtype {args.dtype}); jax on {jax.devices()[0].platform}, torch "
        f"on {torch_device.type}, {num_threads} CPU threads:")
  if time_ours:
    print(f"  hybrid_jax (jax {jax.__version__}):   {ours_rate:9.2f} sequences/s")
  if time_torch:
    print(f"  transformers (torch {torch.__version__}): {torch_rate:9.2f} sequences/s")
  if time_ours and time_torch:
    print(f"  ratio ours/torch: {ours_rate / torch_rate:.2f}x (goal >= 1.0x)")


if __name__ == "__main__":
  main()
