"""Test-wide setup: 8 simulated CPU devices, quiet and thread-limited TensorFlow.

Runs before any test module imports jax, so that sharded code is exercised on a 8-device mesh on
any laptop (the same code paths as an 8-chip TPU host).
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow must never grab an accelerator
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (must come after XLA_FLAGS)

assert jax.device_count() == 8, (
    f"expected 8 simulated CPU devices, found {jax.device_count()}: jax was imported before "
    "tests/conftest.py could set XLA_FLAGS"
)
