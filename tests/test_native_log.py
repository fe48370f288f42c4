"""TensorFlow's C++ start-up INFO lines are dropped from fd 2; warnings and everything else stay."""

import os
import subprocess
import sys

from hybrid_jax import native_log

BANNER = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796214263.440244   11765 port.cc:153] oneDNN custom operations are on. You may "
    "see slightly different numerical results due to floating-point round-off errors.",
    "I0000 00:00:1796214376.153028   13543 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.",
]
KEPT = [
    "W0000 00:00:1796214263.440244   11765 gpu_device.cc:2341] Cannot dlopen some GPU libraries.",
    "E0000 00:00:1796214263.440244   11765 cuda_dnn.cc:8310] Unable to register cuDNN factory",
    "To enable the following instructions: AVX2 AVX512F, in other operations, rebuild TensorFlow.",
    "Traceback (most recent call last):",
]


def test_kept_lines_drop_only_info_records_and_the_absl_notice():
  assert native_log.kept_lines("\n".join(BANNER + KEPT + [""])) == KEPT


def test_quiet_native_banners_filters_what_native_code_writes_to_fd_2():
  native_bytes = ("\n".join(BANNER + KEPT[:1]) + "\n").encode()
  program = (
      "import os, sys\n"
      "from hybrid_jax import native_log\n"
      "with native_log.quiet_native_banners():\n"
      f"  os.write(2, {native_bytes!r})\n"
      "  print('python warning', file=sys.stderr)\n"
      "os.write(2, b'after\\n')\n")
  result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert result.returncode == 0, result.stderr
  assert result.stderr.splitlines() == [KEPT[0], "python warning", "after"]


def test_importing_tensorflow_through_it_prints_no_banner():
  program = ("from hybrid_jax import native_log\n"
             "with native_log.quiet_native_banners():\n"
             "  import tensorflow\n"
             "print('imported', tensorflow.__version__)\n")
  result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=120)
  assert result.returncode == 0, result.stderr
  assert "absl::InitializeLog" not in result.stderr and "oneDNN" not in result.stderr, (
      result.stderr)
  assert result.stdout.startswith("imported 2.")
