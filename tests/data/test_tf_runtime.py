"""TensorFlow for the input pipeline: its limits hold in a training process."""

import subprocess
import sys

from train_helpers import REPO

# A fresh process: TensorFlow's runtime can be configured once, before its first use.
_TRAINER_FIRST = """
import ml_collections, tempfile
from hybrid_jax import trainer
config = ml_collections.ConfigDict({"data": {"tf_threads": 3}, "train": {}})
writer = trainer._metric_writer(config, tempfile.mkdtemp(), 0)  # starts TF's runtime
import tensorflow as tf
print(tf.config.threading.get_inter_op_parallelism_threads(), tf.config.get_visible_devices("GPU"))
"""


def test_the_trainers_tensorboard_writer_starts_tensorflow_after_its_limits():
  # When the writer came first, TF kept its default of 0 inter-op threads (one per core) and the
  # pipeline's later call to set data.tf_threads failed silently.
  result = subprocess.run([sys.executable, "-c", _TRAINER_FIRST], capture_output=True, text=True,
                          cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "3 []"
