"""Test-wide setup: 8 simulated CPU devices, quiet and thread-limited TensorFlow.

Runs before any test module imports jax, so that sharded code is exercised on a 8-device mesh on
any laptop (the same code paths as an 8-chip TPU host).
"""

import os

from train_helpers import xla_flags  # noqa: E402  (numpy only: jax is not imported yet)

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # TensorFlow must never grab an accelerator
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402  (must come after XLA_FLAGS)

assert jax.device_count() == 8, (
    f"expected 8 simulated CPU devices, found {jax.device_count()}: jax was imported before "
    "tests/conftest.py could set XLA_FLAGS"
)

import pytest  # noqa: E402

from hybrid_jax.data import locations  # noqa: E402

# Tests that read the real LAReQA files carry the `real_data` marker (per test, or `pytestmark`
# per module). Without the data they are skipped with one reason, folded into one summary line;
# with HYBRID_JAX_REQUIRE_DATA=1 (set by .ci/run) a missing folder ends the session at once, so a
# run can never pass by skipping.
REAL_DATASETS = ("xquad-r", "mlqa-r")
_MISSING = [d for d in REAL_DATASETS if not locations.has_dataset(d)]
_SKIP_REASON = (f"LAReQA data not found ({', '.join(_MISSING)} under {locations.data_root()}): run "
                f"`{locations.FETCH_COMMAND}` or set {locations.DATA_ENV_VAR}")


def pytest_configure(config):
  config.addinivalue_line("markers", "real_data: reads the real XQuAD-R / MLQA-R files")
  if _MISSING and os.environ.get("HYBRID_JAX_REQUIRE_DATA") == "1":
    raise pytest.UsageError(
        f"HYBRID_JAX_REQUIRE_DATA=1 but {_SKIP_REASON}. The data directory is "
        f"{locations.lookup_rule()}.")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  # A hook, not an autouse fixture: it runs before session fixtures that would read the data.
  if _MISSING and item.get_closest_marker("real_data"):
    pytest.skip(_SKIP_REASON)


# pytest-xdist (pytest.ini: -n auto --dist=worksteal) splits the tests in collection order between
# its workers, and a worker that runs dry takes over the tail of another's share. The slowest
# files go first, so they start at once and what is left to take over at the end is short
# (seconds measured with 2 workers on 2 cores, 2026-12-07).
SLOWEST_FILES_FIRST = (
    "test_trainer.py",  # 290 s: three trainings, two hosts, SIGKILL/SIGTERM resumes
    "test_fault_injection.py",  # 115 s: 12 training processes
    "test_gradcache_packing.py", "test_memory_plan.py", "test_export.py",
    "test_dropout_sharding.py", "test_sharding.py", "test_gradcache.py",
    "test_benchmarks_smoke.py", "test_packed_training.py", "test_encoder_packing.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file

