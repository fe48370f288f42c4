r"""Prints a config's batch sizes and per-device memory estimate for a set of devices; compiles
nothing and starts no training.

    python -m hybrid_jax.plan_memory --config=configs/xlmr_hybrid.py:batch_size=128 --target=8x80gb
    python -m hybrid_jax.plan_memory --config=configs/labse_hybrid.py:batch_size=128 --target=v4-32
    python -m hybrid_jax.plan_memory --config=configs/xlmr_hybrid.py:backbone=xlmr-large \
        --num_devices=32 --num_hosts=4 --device_memory_gb=40 --platform=gpu

`python -m hybrid_jax.train ... --dry_run` prints the same plan for the devices it sees. What the
estimate counts and how it was checked against XLA: hybrid_jax/memory_plan.py.
"""

from __future__ import annotations

from absl import app
from absl import flags

from hybrid_jax import config_lib
from hybrid_jax import errors
from hybrid_jax import native_log

_CONFIG = config_lib.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with an argument: FILE.py:batch_size=128",
    lock_config=True)
_TARGET = flags.DEFINE_string(
    "target", "8x80gb", "Named target (8x80gb, v4-32, v4-8) or 'local' (this machine's "
    "devices); --num_devices etc. override its fields.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Accelerators in total.")
_NUM_HOSTS = flags.DEFINE_integer("num_hosts", None, "Hosts (JAX processes).")
_MEMORY_GB = flags.DEFINE_float("device_memory_gb", None, "Memory per device, GB (10^9 bytes).")
_PLATFORM = flags.DEFINE_enum("platform", None, ["gpu", "tpu", "cpu"],
                              "Decides the compute dtype of model.dtype='auto'.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  native_log.quiet_library_info_logs()  # no backend-probing INFO lines around the plan
  from hybrid_jax import memory_plan  # pylint: disable=g-import-not-at-top

  def build():
    target = memory_plan.target_from(_TARGET.value, num_devices=_NUM_DEVICES.value,
                                     num_hosts=_NUM_HOSTS.value,
                                     device_memory_gb=_MEMORY_GB.value, platform=_PLATFORM.value)
    return memory_plan.plan(_CONFIG.value, target).report()
  print(errors.exit_on_user_error(build))


if __name__ == "__main__":
  app.run(main)
