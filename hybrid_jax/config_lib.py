"""Shared pieces of the experiment configs in configs/.

A config file is `get_config(arg=None) -> ml_collections.ConfigDict`. The argument is a typed
string, big_vision style: `configs/xlmr_hybrid.py:runlocal,alpha=0.3` passes "runlocal,alpha=0.3"
which `parse_arg` turns into {"runlocal": True, "alpha": 0.3} using the defaults' types.
"""

from __future__ import annotations

import difflib
import re
import sys
from typing import Iterable, Sequence

import ml_collections

from hybrid_jax import errors


class ConfigArgError(errors.UserError):
  """A config argument string names an unknown key or a value of the wrong type."""


class UnknownConfigFieldError(errors.UserError):
  """A --config.SECTION.FIELD override names a field the config does not have."""


# --- command-line overrides -----------------------------------------------------------------------
def _keys(node) -> list[str] | None:
  if isinstance(node, (ml_collections.ConfigDict, dict)):
    return [str(k) for k in node.keys()]
  return None


def check_overrides(config, fields: Iterable[str], flag_name: str = "config") -> None:
  """Every override path ("train.learning_rate") must name an existing field; else an
  UnknownConfigFieldError naming it, the closest valid names (difflib) and the section's fields.

  ml_collections would fail with a bare AttributeError: "'nonexistent'"."""
  for dotted in fields:
    node, walked = config, []
    for part in dotted.split("."):
      name = re.sub(r"\[.*\]$", "", part)  # "mesh[0]": the field is "mesh"
      keys = _keys(node)
      if keys is None:
        break  # inside a tuple or a value: ml_collections reports what is wrong there
      if name not in keys:
        section = ".".join([flag_name] + walked)
        close = difflib.get_close_matches(name, keys, n=3, cutoff=0.5)
        hint = (f" Did you mean {' or '.join(f'--{section}.{c}' for c in close)}?" if close
                else "")
        raise UnknownConfigFieldError(
            f"--{flag_name}.{dotted}: {section} has no field {name!r}.{hint} The fields of "
            f"{section} are: {', '.join(sorted(keys))}.")
      node = node[name]
      walked.append(name)


def override_fields(argv: Sequence[str], flag_name: str = "config") -> list[str]:
  """The field paths of the --config.X.Y=... (and --noconfig.X.Y) arguments in argv."""
  fields = []
  pattern = re.compile(rf"^--?(?:no)?{re.escape(flag_name)}\.([^=]+)")
  for arg in argv:
    if arg == "--":
      break
    match = pattern.match(arg)
    if match:
      fields.append(match.group(1))
  return fields


class _CheckedConfigParser:
  """Wraps ml_collections' config-file parser: after the file is loaded, the command line's
  overrides are checked against it, before ml_collections looks any of them up."""

  def __init__(self, parser, flag_name: str):
    self._parser = parser
    self._flag_name = flag_name

  def __getattr__(self, name):
    return getattr(self._parser, name)

  def parse(self, argument):
    from absl import flags  # pylint: disable=g-import-not-at-top
    config = self._parser.parse(argument)
    argv = flags.FLAGS.read_flags_from_files(sys.argv, force_gnu=False)
    # Inside absl's flag parsing a ValueError would become "FATAL Flags parsing error" (status
    # 1); this is the same one-line `error:` and status 2 as every other user error.
    errors.exit_on_user_error(
        lambda: check_overrides(config, override_fields(argv[1:], self._flag_name),
                                self._flag_name))
    return config


def DEFINE_config_file(name: str, default: str | None = None,  # pylint: disable=invalid-name
                       help_string: str = "path to config file.", **kwargs):
  """ml_collections' config_flags.DEFINE_config_file, with unknown override fields reported as
  UnknownConfigFieldError (closest names, the section's fields) instead of an AttributeError."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  holder = config_flags.DEFINE_config_file(name, default, help_string, **kwargs)
  flag_values = kwargs.get("flag_values", flags.FLAGS)
  flag = flag_values[name]
  flag.parser = _CheckedConfigParser(flag.parser, name)
  return holder


def _to_bool(key: str, text: str) -> bool:
  lowered = text.strip().lower()
  if lowered in ("1", "true", "yes", "on", ""):
    return True
  if lowered in ("0", "false", "no", "off"):
    return False
  raise ConfigArgError(f"config argument {key}={text!r}: expected true/false")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses "runlocal,alpha=0.3,langs=en+de" against typed defaults.

  A bare name sets a boolean to True. Values are cast to the type of their default; tuple
  defaults take "+"-separated items (commas separate arguments).
  """
  values = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigArgError(
          f"unknown config argument {key!r} in {arg!r}; known arguments: {sorted(defaults)}")
    default = defaults[key]
    if isinstance(default, bool):
      values[key] = _to_bool(key, text) if has_value else True
    elif not has_value:
      raise ConfigArgError(f"config argument {key!r} needs a value, e.g. {key}={default!r}")
    elif isinstance(default, tuple):
      values[key] = tuple(x for x in text.split("+") if x)
    else:
      try:
        values[key] = type(default)(text)
      except ValueError as e:
        raise ConfigArgError(
            f"config argument {key}={text!r}: expected a {type(default).__name__}") from e
  return ml_collections.ConfigDict(values)


def train_config() -> ml_collections.ConfigDict:
  """The `config.train` section: optimisation, loss, logging, checkpoints (owned by trainer.py)."""
  config = ml_collections.ConfigDict()
  # --- commonly changed ---
  config.batch_size = 100  # GLOBAL batch (query-passage pairs); per-host/device sizes derived
  config.num_steps = 10_000  # total optimizer steps
  config.learning_rate = 3e-5  # AdamW peak learning rate (paper)
  config.warmup_steps = 1000  # linear warmup from 0, then linear decay to 0 at num_steps
  # --- optimizer ---
  config.weight_decay = 0.01  # AdamW decoupled weight decay, not on biases/LayerNorm (paper)
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.adam_eps = 1e-8
  config.grad_clip_norm = 1.0  # global-norm gradient clipping (0 = off)
  # --- loss (hybrid_jax/losses.py) ---
  config.temperature = 0.05  # InfoNCE temperature (scale 1/0.05, the paper leaves it open)
  config.learnable_temperature = False  # train log(scale), CLIP-style (initial: 1/temperature)
  config.in_batch_negatives = True  # other rows' positives are negatives (hard negatives: data.)
  config.symmetric_loss = False  # add the passage -> query term
  config.mask_same_id = True  # rows sharing a question id are never negatives of each other
  # Drop every candidate (in-batch positive or hard negative of any row) that is one of the row's
  # positives in any language (passage ids, data/passage_ids.py), e.g. a neighbour-sentence negative that
  # is another row's gold sentence. On by default: on XQuAD-R 15 of 32 rows per batch have one.
  # Batches without passage ids (e.g. a custom pipeline) need it set to False.
  config.mask_false_negatives = True
  # Recorded in config.json so that results say which mask definition they used (losses.py
  # FALSE_NEGATIVE_MASK_DEFINITION; the only one implemented).
  config.false_negative_mask_definition = "per_question"
  # >0: GradCache re-encoding in chunks of this many rows; with data.packing, PACKED rows per chunk
  # (must divide the global packed rows: data.packing_rows, or the chosen multiple of the shards).
  config.gradcache_chunk_size = 0
  # --- logging, validation, checkpoints ---
  config.log_every_steps = 50  # metrics (TensorBoard + metrics.jsonl) and the console line
  config.eval_every_steps = 500  # validation loss (and best checkpoint); 0 = only at the end
  config.checkpoint_every_steps = 500  # full-state Orbax checkpoint (async)
  config.keep_checkpoints = 3  # full-state checkpoints kept (the best one is kept separately)
  # Resume from this checkpoint step instead of the newest readable one (-1); newer checkpoints
  # are moved aside, so drop the override before re-running (checkpointing.py).
  config.restore_step = -1
  config.shared_filesystem = False  # True: a local --workdir path is visible from every host (NFS)
  return config


def mesh_config() -> tuple:
  """Device mesh axes and sizes; -1 takes the remaining devices."""
  # A tuple, not a list: ml_collections can override tuples from the command line.
  return (("data", -1), ("fsdp", 1))


# Arguments every config file accepts after the ":" of --config=FILE:ARG.
COMMON_ARGS = dict(
    runlocal=False,  # tiny encoder + synthetic data: the whole path in a few CPU minutes
    alpha=-1.0,  # override data.alpha (-1 = keep the file's value)
    steps=0,  # override train.num_steps (0 = keep)
    batch_size=0,  # override train.batch_size (0 = keep)
    backbone="",  # another backbone preset, e.g. xlmr-large ("" = the config file's own)
)


def flatten(tree, prefix: str = "") -> dict:
  """A nested dict (a config's to_dict() or its JSON) as {"train.learning_rate": 3e-05, ...}."""
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def build_config(backbone: str, batch_type: str, arg: str | None = None,
                 **extra_args) -> ml_collections.ConfigDict:
  """Assembles a full experiment config; configs/*.py are thin calls of this."""
  # Imported here so that `import hybrid_jax.config_lib` stays light.
  from hybrid_jax.data import defaults as data_defaults  # pylint: disable=g-import-not-at-top
  from hybrid_jax.eval import defaults as eval_defaults  # pylint: disable=g-import-not-at-top
  from hybrid_jax.models import presets  # pylint: disable=g-import-not-at-top

  args = parse_arg(arg, **COMMON_ARGS, **extra_args)
  backbone = args.backbone or backbone
  config = ml_collections.ConfigDict()
  config.seed = 0  # parameter init and dropout; data order has its own seed (data.seed)
  config.model = presets.model_config("tiny" if args.runlocal else backbone)
  # Full runs train on the real parallel QA pairs; :runlocal on the built-in synthetic data.
  # The named backbone's prefixes, also for :runlocal (its tiny encoder stands in for the model).
  config.data = data_defaults.data_config(batch_type, real_data=not args.runlocal,
                                          prefixes=presets.input_prefixes(backbone))
  config.train = train_config()
  config.mesh = mesh_config()
  config.evals = eval_defaults.evals_config(
      training_dataset=config.data.path if config.data.source == "lareqa" else "")
  if backbone == "me5-small" and not args.runlocal:
    # The offline multilingual-e5-small, converted once by `python -m hybrid_jax.models.e5_convert`.
    from hybrid_jax.models import e5_convert  # pylint: disable=g-import-not-at-top
    config.model.init_from = e5_convert.default_dir()
  if args.runlocal:
    config.train.batch_size = 32
    config.train.num_steps = 300
    config.train.warmup_steps = 30
    config.train.learning_rate = 1e-3
    config.train.log_every_steps = 25
    config.train.eval_every_steps = 100
    config.train.checkpoint_every_steps = 100
    # Synthetic texts are at most 10 tokens: one padded length for queries and passages lets the
    # loss encode both in a single encoder call (losses.batch_loss), half the graph to compile.
    config.data.query_max_length = 16
    config.data.passage_max_length = 16
    # The grid on the synthetic data's held-out ids, at the end of training (eval/synthetic_eval.py).
    config.evals = ml_collections.ConfigDict({"synthetic": {
        "type": "synthetic", "every_steps": 0, "groups": {}}})
  if args.alpha >= 0:
    config.data.alpha = args.alpha
  if args.steps:
    config.train.num_steps = args.steps
  if args.batch_size:
    config.train.batch_size = args.batch_size
  return config
