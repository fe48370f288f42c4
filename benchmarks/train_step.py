r"""The trainer's full train step versus the same model, loss and optimizer in PyTorch; GradCache memory.

    python benchmarks/train_step.py                          # both parts, default shapes
    python benchmarks/train_step.py --part=speed --shapes=small --rounds=5
    python benchmarks/train_step.py --part=memory --memory_batches=16,64,256,1024

Part 1, speed (same run, same machine, interleaved rounds so that outside load hits both alike,
the same number of CPU threads on both sides: --threads, default 1):
  ours   hybrid_jax's own step (`train_step.step_functions(...).train_step`: the jit'd,
         donated step `train_and_evaluate` runs): encoder on queries and passages, InfoNCE over
         the batch with the same-id mask (hybrid_jax.losses), global-norm clipping, AdamW with
         weight decay on matrices/embeddings only, linear warmup/decay schedule, dropout 0.1.
  torch  the same model in transformers (BertModel, train mode, SDPA attention) with the loss
         of sentence-transformers' MultipleNegativesRankingLoss (mean pooling, L2 norm,
         cross-entropy of scale * cos(q_i, p_j) against j = i), torch.nn.utils.clip_grad_norm_,
         torch.optim.AdamW with the same no-decay groups (bias, LayerNorm), LambdaLR warmup/decay.
  Same weights (ours exported to torch through hf_checkpoint), same batch, same hyperparameters;
  the dropout-free losses at init are printed and agree to ~1e-6. Prints steps/s and
  sequences/s (queries + passages) of both and the ratio ours / torch (goal >= 1.0x).

Part 2, memory: peak memory of our compiled train step versus the global batch size, plain loss
versus GradCache (train.gradcache_chunk_size), from XLA's `compiled.memory_analysis()`
(temporaries + arguments + outputs - aliased donated buffers), i.e. what the step needs on the
device. Nothing is executed, so large batches cost only compile time. Goal: flat for GradCache.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


# Both sides get the same number of CPU threads. With 1 (the default) XLA runs single-threaded too.
# (On a machine shared with other jobs, PyTorch's OpenMP threads spin at barriers when a core is
# taken: 2 threads were measured 23x slower than 1 under load here.)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cpu_threads  # noqa: E402  pylint: disable=wrong-import-position

THREADS = cpu_threads.pin_from_argv(default=1)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from hybrid_jax import config_lib  # noqa: E402
from hybrid_jax import losses  # noqa: E402
from hybrid_jax import sharding  # noqa: E402
from hybrid_jax import train_step  # noqa: E402
from hybrid_jax.models import encoder as encoder_lib  # noqa: E402
from hybrid_jax.models import hf_checkpoint  # noqa: E402

SHAPES = {
    # The :runlocal encoder and batch (the README demo).
    "runlocal": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, vocab_size=512, batch_size=32, query_len=16,
                     passage_len=16, steps=20),
    # A small BERT at realistic lengths (E5/LAReQA-style query 32, passage 128).
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=1024, vocab_size=32000, batch_size=16, query_len=32,
                  passage_len=128, steps=3),
    # multilingual-e5-small's architecture (12 layers, hidden 384, 250k vocabulary).
    "me5-small": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=1536, vocab_size=250037, batch_size=16, query_len=32,
                      passage_len=128, steps=1),
}
SCALE = 20.0  # 1 / temperature 0.05, both sides
LEARNING_RATE, WEIGHT_DECAY, WARMUP, TOTAL_STEPS, CLIP = 3e-5, 0.01, 10, 1000, 1.0


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _encoder_config(shape, dropout: float) -> encoder_lib.EncoderConfig:
  return encoder_lib.EncoderConfig(
      model_type="bert", vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
      num_hidden_layers=shape["num_hidden_layers"],
      num_attention_heads=shape["num_attention_heads"],
      intermediate_size=shape["intermediate_size"],
      max_position_embeddings=max(shape["query_len"], shape["passage_len"]), type_vocab_size=2,
      pad_token_id=0, layer_norm_eps=1e-12, hidden_dropout_prob=dropout,
      attention_probs_dropout_prob=dropout, pooling="mean")


def _train_config(chunk_size: int = 0) -> ml_collections.ConfigDict:
  train = config_lib.train_config()
  train.update(learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, warmup_steps=WARMUP,
               num_steps=TOTAL_STEPS, grad_clip_norm=CLIP, temperature=1 / SCALE,
               gradcache_chunk_size=chunk_size)
  return train


def _batch(batch_size: int, query_len: int, passage_len: int, vocab: int, seed: int = 0):
  """Padded rows of 50-100% of the length, distinct question ids."""
  rng = np.random.default_rng(seed)
  batch = {}
  for name, length in (("query", query_len), ("passage", passage_len)):
    lengths = rng.integers(length // 2, length + 1, size=batch_size)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    batch[f"{name}_input_ids"] = (rng.integers(5, vocab, size=(batch_size, length)) * mask
                                  ).astype(np.int32)
    batch[f"{name}_attention_mask"] = mask
  batch["question_id"] = np.arange(batch_size, dtype=np.int32)
  batch["batch_type"] = np.zeros(batch_size, np.int32)
  return batch


def _our_step(encoder_config, train, mesh):
  loss_cfg = losses.LossConfig.from_train_config(train)
  return train_step.step_functions(
      encoder_config, loss_cfg, train_step.OptimizerSettings.from_train_config(train), 0, mesh)


# --- part 1: speed --------------------------------------------------------------------------------
def _torch_side(encoder_config, params, batch, device, dropout):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  hf_config = transformers.BertConfig(**{
      k: v for k, v in encoder_config.to_hf_config().items() if k not in ("hybrid_jax",)})
  model = transformers.BertModel(hf_config, add_pooling_layer=False)
  state = {k: torch.from_numpy(np.array(v)) for k, v in
           hf_checkpoint.params_to_state_dict(params).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if "position_ids" not in k]
  assert not missing and not unexpected, (missing, unexpected)
  model.to(device)
  tensors = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in batch.items()}

  def embed(ids, mask):
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)

  def mnrl_loss():
    """sentence-transformers' MultipleNegativesRankingLoss (in-batch negatives, scale 20)."""
    q = embed(tensors["query_input_ids"], tensors["query_attention_mask"])
    p = embed(tensors["passage_input_ids"], tensors["passage_attention_mask"])
    scores = SCALE * q @ p.T
    return torch.nn.functional.cross_entropy(scores, torch.arange(len(q), device=device))

  no_decay = ("bias", "LayerNorm.weight")
  groups = [
      {"params": [p for n, p in model.named_parameters() if not any(x in n for x in no_decay)],
       "weight_decay": WEIGHT_DECAY},
      {"params": [p for n, p in model.named_parameters() if any(x in n for x in no_decay)],
       "weight_decay": 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8)
  scheduler = torch.optim.lr_scheduler.LambdaLR(
      optimizer, lambda s: s / WARMUP if s < WARMUP else max(0.0, (TOTAL_STEPS - s) /
                                                             (TOTAL_STEPS - WARMUP)))

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = mnrl_loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()
    scheduler.step()
    return loss

  def eval_loss():
    model.eval()
    with torch.no_grad():
      value = float(mnrl_loss())
    model.train(dropout > 0)
    return value

  return step, eval_loss


def speed(shape_name: str, rounds: int, warmup: int, dropout: float) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  shape = SHAPES[shape_name]
  threads = THREADS
  torch.set_num_threads(threads)
  if torch.get_num_interop_threads() != threads:
    try:
      torch.set_num_interop_threads(threads)
    except RuntimeError:  # only settable once per process (the first shape set it)
      pass
  encoder_config = _encoder_config(shape, dropout)
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)])
  fns = _our_step(encoder_config, _train_config(), mesh)
  batch = _batch(shape["batch_size"], shape["query_len"], shape["passage_len"],
                 shape["vocab_size"])
  params = fns.init_params()
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch_step, torch_eval_loss = _torch_side(
      encoder_config, jax.device_get(params["encoder"]), batch, device, dropout)
  global_batch = sharding.host_to_global(batch, mesh)
  ours_init = float(fns.eval_step(params, global_batch)["loss"])
  _log(f"[{shape_name}] {shape}; dropout {dropout}; {threads} threads; jax {jax.__version__} "
       f"({jax.devices()[0].platform}), torch {torch.__version__} ({device.type})")
  _log(f"[{shape_name}] dropout-free loss at the shared init: ours {ours_init:.6f}, torch "
       f"{torch_eval_loss():.6f}")

  state = train_step.TrainState(step=jnp.int32(0), params=params,
                             opt_state=fns.init_opt_state(params))
  compiled = fns.train_step.lower(state, global_batch).compile()
  steps = shape["steps"]

  def run_ours(n):
    nonlocal state
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = compiled(state, global_batch)
    jax.block_until_ready(metrics["loss"])
    return time.perf_counter() - start

  def run_torch(n):
    start = time.perf_counter()
    for _ in range(n):
      torch_step()
    if device.type == "cuda":
      torch.cuda.synchronize()
    return time.perf_counter() - start

  run_ours(warmup)
  run_torch(warmup)
  ours_time = torch_time = 0.0
  for r in range(rounds):
    a, b = run_ours(steps), run_torch(steps)
    ours_time, torch_time = ours_time + a, torch_time + b
    _log(f"[{shape_name}] round {r + 1}/{rounds}: ours {steps / a:.2f} steps/s, torch "
         f"{steps / b:.2f} steps/s; ETA {(rounds - r - 1) * (a + b):.0f}s")
  total = rounds * steps
  seqs = 2 * shape["batch_size"]  # queries + passages per step
  ours_rate, torch_rate = total / ours_time, total / torch_time
  print(f"{shape_name}: batch {shape['batch_size']} (q {shape['query_len']} / p "
        f"{shape['passage_len']} tokens), {shape['num_hidden_layers']} layers, hidden "
        f"{shape['hidden_size']}")
  print(f"  hybrid_jax train step: {ours_rate:8.2f} steps/s  {ours_rate * seqs:9.1f} sequences/s")
  print(f"  torch + MNRL + AdamW : {torch_rate:8.2f} steps/s  {torch_rate * seqs:9.1f} sequences/s")
  print(f"  ratio ours / torch   : {ours_rate / torch_rate:.2f}x (goal >= 1.0x)")
  return ours_rate / torch_rate


# --- part 2: memory -------------------------------------------------------------------------------
def _peak_bytes(compiled) -> int:
  stats = compiled.memory_analysis()
  return int(stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes)


def memory(shape_name: str, batches: list[int], chunk: int) -> None:
  shape = SHAPES[shape_name]
  encoder_config = _encoder_config(shape, 0.1)
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 1)])
  rows = []
  for batch_size in batches:
    row = [batch_size]
    for chunk_size in (0, chunk):
      if chunk_size and batch_size % chunk_size:
        row.append(None)
        continue
      fns = _our_step(encoder_config, _train_config(chunk_size), mesh)
      state = train_step.TrainState(
          step=jax.ShapeDtypeStruct((), jnp.int32),
          params=fns.abstract_params, opt_state=fns.abstract_opt_state)
      batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _batch(
          batch_size, shape["query_len"], shape["passage_len"], shape["vocab_size"]))
      started = time.time()
      compiled = fns.train_step.lower(state, batch).compile()
      row.append(_peak_bytes(compiled))
      _log(f"[memory {shape_name}] batch {batch_size}, "
           f"{'GradCache chunk %d' % chunk_size if chunk_size else 'plain'}: "
           f"{row[-1] / 2**20:.1f} MiB (compiled in {time.time() - started:.1f}s)")
    rows.append(row)
  print(f"\npeak memory of the train step ({shape_name}: {shape['num_hidden_layers']} layers, "
        f"hidden {shape['hidden_size']}, q {shape['query_len']} / p {shape['passage_len']} "
        f"tokens, fp32), XLA memory_analysis:")
  print(f"  {'batch':>6} {'plain MiB':>10} {'GradCache MiB':>14} {'ratio':>7}")
  for batch_size, plain, cached in rows:
    ratio = f"{plain / cached:.1f}x" if plain and cached else "-"
    fmt = lambda v: f"{v / 2**20:.1f}" if v else "-"  # noqa: E731
    print(f"  {batch_size:>6} {fmt(plain):>10} {fmt(cached):>14} {ratio:>7}")
  first, last = rows[0], rows[-1]
  if first[2] and last[2]:
    print(f"  growth from batch {first[0]} to {last[0]}: plain {last[1] / first[1]:.1f}x, "
          f"GradCache {last[2] / first[2]:.2f}x (goal: flat)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--part", choices=("speed", "memory", "both"), default="both")
  parser.add_argument("--threads", type=int, default=1,
                      help="CPU threads for each side (1: XLA single-threaded too)")
  parser.add_argument("--shapes", default="runlocal,small", help=f"of {sorted(SHAPES)}")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--dropout", type=float, default=0.1)
  parser.add_argument("--memory_shape", default="small")
  parser.add_argument("--memory_batches", default="16,64,256,1024")
  parser.add_argument("--chunk", type=int, default=16, help="GradCache chunk size")
  args = parser.parse_args()
  if args.part in ("speed", "both"):
    for name in args.shapes.split(","):
      speed(name, args.rounds, args.warmup, args.dropout)
  if args.part in ("memory", "both"):
    memory(args.memory_shape, [int(b) for b in args.memory_batches.split(",")], args.chunk)


if __name__ == "__main__":
  main()
