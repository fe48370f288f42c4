"""Device mesh, parameter partition rules, and host-local batches -> global jax.Arrays.

The mesh comes from `config.mesh`, a list of (axis name, size) with one size allowed to be -1
("the remaining devices"): `[("data", -1), ("fsdp", 1)]` is pure data parallelism,
`[("data", 2), ("fsdp", 4)]` shards every parameter's `embed` dimension over 4 devices (FSDP /
ZeRO-3: XLA all-gathers a layer's weights when it needs them and reduce-scatters its gradients),
and an optional `("tensor", n)` axis splits attention heads and feed-forward columns.

Parameters carry LOGICAL axis names (models/encoder.py `logical_axes`); `PARTITION_RULES` maps each
to mesh axes. A rule whose mesh axis is missing from the mesh, or whose dimension is not divisible by
the mesh axis size, leaves that dimension replicated, so one rule set serves every mesh and model.

The batch is split over every mesh axis except "tensor" ("data" and "fsdp": FSDP is data parallel
for activations). Each host reads rows [i * B/P, (i+1) * B/P) of the global batch (the data
pipeline's host slice) and `host_to_global` assembles the global arrays from the host slices with
`jax.make_array_from_process_local_data`; losses then see the GLOBAL batch under jit.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hybrid_jax import errors

# Logical axis -> mesh axis (or tuple of mesh axes, or None). The first rule naming a logical axis
# wins. "batch" is the leading dimension of every input array.
PARTITION_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),  # FSDP: hidden-size dimension of every weight matrix, LayerNorm, bias
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("qkv", "tensor"),
    ("position", None),
    ("type", None),
)
TENSOR_AXIS = "tensor"
KNOWN_AXES = ("data", "fsdp", TENSOR_AXIS)


class ShardingConfigError(errors.UserError):
  """config.mesh or the batch size does not fit the devices and hosts."""


# --- mesh -----------------------------------------------------------------------------------------
def _mesh_axes(mesh_config) -> list[tuple[str, int]]:
  try:
    axes = [(str(name), int(size)) for name, size in mesh_config]
  except (TypeError, ValueError) as e:
    raise ShardingConfigError(
        f"config.mesh must be a list of (axis name, size) pairs such as "
        f"[('data', -1), ('fsdp', 1)], found {mesh_config!r}") from e
  if not axes:
    raise ShardingConfigError("config.mesh is empty; use e.g. [('data', -1), ('fsdp', 1)]")
  names = [n for n, _ in axes]
  unknown = sorted(set(names) - set(KNOWN_AXES))
  if unknown or len(set(names)) != len(names):
    raise ShardingConfigError(
        f"config.mesh axis names must be distinct and among {KNOWN_AXES} (the partition rules "
        f"refer to them), found {names}")
  return axes


def mesh_shape(mesh_config, num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """(axis names, sizes) with -1 resolved; checks that the sizes use exactly `num_devices`."""
  axes = _mesh_axes(mesh_config)
  names = tuple(n for n, _ in axes)
  sizes = [s for _, s in axes]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ShardingConfigError(
        f"config.mesh sizes must be positive, with at most one -1 (the remaining devices); "
        f"found {list(axes)}")
  fixed = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % fixed:
      raise ShardingConfigError(
          f"config.mesh {list(axes)}: {num_devices} devices are not divisible by the fixed axis "
          f"sizes (product {fixed}); change the sizes so that they divide {num_devices}.")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ShardingConfigError(
        f"config.mesh {list(axes)} uses {fixed} devices but {num_devices} are available; set one "
        "size to -1 to take the remaining devices.")
  return names, tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The device mesh of config.mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(mesh_config, len(devices))
  # Auto axis types: shardings propagate through jit as in GSPMD (make_mesh defaults to Explicit).
  return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                       devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """Mesh axes the batch dimension is split over: all but "tensor"."""
  return tuple(n for n in mesh.axis_names if n != TENSOR_AXIS)


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[n] for n in batch_axes(mesh))


# --- batch sizes ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BatchSizes:
  global_size: int  # rows of the global batch (the config's one knob)
  per_host: int  # rows each process reads and feeds
  per_device: int  # rows each batch shard (device along the data/fsdp axes) holds
  num_hosts: int
  num_shards: int


def batch_sizes(global_batch_size: int, mesh: Mesh | Mapping[str, int],
                process_count: int | None = None) -> BatchSizes:
  """Derives per-host and per-device sizes, with a clear error when they are not whole.

  mesh: the Mesh, or its shape {axis name: size} (to check a config before devices exist)."""
  process_count = jax.process_count() if process_count is None else process_count
  shape = dict(mesh.shape) if isinstance(mesh, Mesh) else dict(mesh)
  axes = tuple(n for n in shape if n != TENSOR_AXIS)
  shards = math.prod(shape[n] for n in axes)
  if global_batch_size <= 0:
    raise ShardingConfigError(f"train.batch_size must be positive, found {global_batch_size}")
  if global_batch_size % shards:
    lower = global_batch_size // shards * shards
    raise ShardingConfigError(
        f"config.train.batch_size={global_batch_size} is not divisible by the {shards} devices "
        f"the batch is split over (the batch shards of the mesh {shape}, axes {axes}); use a "
        f"multiple of {shards}, e.g. {max(lower, shards)} or {lower + shards}.")
  if global_batch_size % process_count:
    raise ShardingConfigError(
        f"config.train.batch_size={global_batch_size} is not divisible by the {process_count} "
        f"processes (hosts); use a multiple of {process_count}.")
  return BatchSizes(global_batch_size, global_batch_size // process_count,
                    global_batch_size // shards, process_count, shards)


# --- partitioning ---------------------------------------------------------------------------------
def _mesh_axes_for(logical: str | None, rules, mesh: Mesh) -> tuple[str, ...]:
  if logical is None:
    return ()
  for name, target in rules:
    if name == logical:
      targets = (target,) if isinstance(target, str) or target is None else tuple(target)
      return tuple(t for t in targets if t is not None and t in mesh.axis_names)
  raise ShardingConfigError(f"no partition rule for logical axis {logical!r}; rules cover "
                            f"{[n for n, _ in rules]}")


def logical_to_mesh_spec(logical_spec: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                         rules=PARTITION_RULES) -> PartitionSpec:
  """Mesh PartitionSpec of one array from its logical spec; undivisible dims stay replicated."""
  used: set[str] = set()
  out = []
  for dim, logical in zip(shape, tuple(logical_spec) + (None,) * (len(shape) - len(logical_spec))):
    axes = tuple(a for a in _mesh_axes_for(logical, rules, mesh) if a not in used)
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if axes and dim % math.prod(mesh.shape[a] for a in axes) == 0:
      used.update(axes)
      out.append(axes[0] if len(axes) == 1 else axes)
    else:
      out.append(None)
  return PartitionSpec(*out)


def param_shardings(mesh: Mesh, logical_specs, shapes, rules=PARTITION_RULES):
  """NamedShardings for a parameter tree. logical_specs: tree of PartitionSpec (or None = all
  replicated) with the structure of `shapes` (a tree of arrays or ShapeDtypeStructs)."""
  def one(spec, shape):
    spec = PartitionSpec() if spec is None else spec
    return NamedSharding(mesh, logical_to_mesh_spec(spec, shape.shape, mesh, rules))
  return jax.tree.map(one, logical_specs, shapes,
                      is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (row) dimension split over the batch axes, the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


# --- host-local numpy -> global arrays ------------------------------------------------------------
def host_to_global(host_batch: Mapping[str, np.ndarray], mesh: Mesh,
                   global_batch_size: int | None = None) -> dict[str, jax.Array]:
  """Global jax.Arrays of a batch from this host's rows (its contiguous slice, in process order).

  host_batch: name -> [b, ...] numpy array, b = global batch / process count.
  """
  sharding = batch_sharding(mesh)
  out = {}
  for name, local in host_batch.items():
    local = np.asarray(local)
    rows = local.shape[0] * jax.process_count() if global_batch_size is None else global_batch_size
    out[name] = jax.make_array_from_process_local_data(sharding, local,
                                                       (rows,) + local.shape[1:])
  return out
