"""TensorFlow for the input pipeline only: imported lazily, kept off the accelerators, few threads.

JAX owns the GPUs/TPUs; TensorFlow (tf.data, TFDS) must neither grab their memory nor start a
thread per core on a host that also feeds the accelerators. Every module that needs TensorFlow
gets it from `import_tensorflow`, so the limits are set before TF's runtime starts.

This module imports only hybrid_jax.native_log (a leaf), so any module may use it without an
import circle.
"""

from __future__ import annotations

from hybrid_jax import native_log

_TF_CONFIGURED = False


def import_tensorflow(num_threads: int = 4):
  """TensorFlow for tf.data only: no accelerators, few threads. Safe to call repeatedly; the
  limits hold only where this is the first use of TensorFlow in the process (call it before
  anything else that starts TF's runtime, e.g. clu's TensorBoard writer)."""
  global _TF_CONFIGURED
  with native_log.quiet_native_banners():  # TF's C++ start-up INFO lines, not its warnings
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not _TF_CONFIGURED:
    _TF_CONFIGURED = True
    # Both calls fail once TF's runtime has started (e.g. another module used TF first); the
    # per-dataset private thread pool of the input pipeline still bounds its threads then.
    try:
      tf.config.set_visible_devices([], "GPU")
      tf.config.set_visible_devices([], "TPU")
    except (RuntimeError, ValueError):
      pass
    try:
      tf.config.threading.set_inter_op_parallelism_threads(num_threads)
      tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:
      pass
  return tf
