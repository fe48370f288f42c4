"""What a training run logs: metrics.jsonl, the HParams record, interval means and throughput.

- `JsonlWriter`: scalars as JSON lines in <workdir>/metrics.jsonl, one of the writers of the clu
  MultiWriter (next to TensorBoard's); `logged_validation` reads the validation losses back.
- `hparams_of(config)`: the config flattened for TensorBoard's HParams tab.
- `reduce_metrics`: means of the per-step metrics over a log interval (per-type losses
  row-weighted).
- `ThroughputReporter`: steps/s and examples/s over the time spent in train steps only (validation
  and evaluation are excluded, so the figure is the step's), TFLOP/s per device and MFU from XLA's
  cost analysis and a table of peak bf16 FLOP/s per device kind ("n/a" on CPU), ETA, and the
  console line. clu's `periodic_actions.ReportProgress` also reports steps/s and an ETA, but over
  wall time (evaluation included) and through absl INFO logging (silenced here), with no FLOP
  figures, so it does not fit this line.
"""

from __future__ import annotations

import json
import time
from typing import Any

import jax
import numpy as np
from etils import epath

from hybrid_jax import config_lib
from hybrid_jax import losses

METRICS_FILE = "metrics.jsonl"
BATCH_TYPE_NAMES = losses.BATCH_TYPE_NAMES

# Dense bf16 peak FLOP/s of one JAX device, by a substring of `device.device_kind` (first match
# wins, so specific names come first). TPU v2/v3 expose each core as a device.
PEAK_FLOPS_PER_DEVICE = (
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("v5", 459e12),
    ("v6 lite", 918e12), ("v6e", 918e12), ("v4", 275e12), ("v3", 61.5e12), ("v2", 22.5e12),
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("V100", 125e12),
)

class JsonlWriter:
  """Scalars as JSON lines {"step": s, name: value, ...} in <workdir>/metrics.jsonl.

  Implements clu's MetricWriter interface (used inside a clu MultiWriter); not a subclass, so that
  importing this module does not import TensorFlow (clu's metric_writers does)."""

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.path = epath.Path(workdir) / METRICS_FILE
    if resume_step is not None and self.path.exists():
      # Lines past the checkpoint belong to a future that was lost; the resumed run rewrites them.
      # So does a last line cut by a kill during its write (it does not decode).
      text = self.path.read_bytes().decode("utf-8", errors="replace")
      kept = [line for line in text.splitlines()
              if _decodes(line) and json.loads(line).get("step", 0) <= resume_step]
      self.path.write_text("".join(line + "\n" for line in kept))
    self._lines: list[str] = []

  def write_scalars(self, step, scalars):
    record = {"step": int(step)}
    record.update({k: (float(v) if np.ndim(v) == 0 else np.asarray(v).tolist())
                   for k, v in scalars.items()})
    self._lines.append(json.dumps(record))
    self.flush()

  def flush(self):
    if self._lines:
      with self.path.open("a") as f:
        f.write("".join(line + "\n" for line in self._lines))
      self._lines = []

  def close(self):
    self.flush()

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass


  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass  # the run's hyperparameters are <workdir>/config.json already; metrics.jsonl is scalars


def _decodes(line: str) -> bool:
  """A whole JSON object: not blank, not cut short by a process killed while writing it."""
  try:
    return isinstance(json.loads(line), dict) if line.strip() else False
  except json.JSONDecodeError:
    return False


def logged_validation(workdir: str) -> dict[str, float]:
  """From <workdir>/metrics.jsonl: the first validation loss logged (as
  validation/loss_at_start) and the last one (validation/loss); {} when none was logged."""
  path = epath.Path(workdir) / METRICS_FILE
  found = {}
  if path.exists():
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
      record = json.loads(line) if _decodes(line) else {}
      if "validation/loss" in record:
        found.setdefault("validation/loss_at_start", record["validation/loss"])
        found["validation/loss"] = record["validation/loss"]
  return found


def hparams_of(config) -> dict[str, Any]:
  """The config flattened to {"train.learning_rate": 3e-05, ...} for TensorBoard's HParams tab
  (which takes scalars only: tuples and lists become their string form)."""
  flat = config_lib.flatten(config.to_dict() if hasattr(config, "to_dict") else dict(config))
  return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}


def per_type_losses(history: list[dict], prefix: str) -> dict[str, float]:
  """{prefix + batch type: loss} over host-side step metrics, row-weighted over the rows of each
  type (types with no rows are left out)."""
  sums = np.sum([h["loss_per_type_sum"] for h in history], axis=0)
  rows = np.sum([h["rows_per_type"] for h in history], axis=0)
  return {f"{prefix}{name}": float(sums[t] / rows[t])
          for t, name in enumerate(BATCH_TYPE_NAMES) if rows[t] > 0}


def reduce_metrics(history: list[dict]) -> dict[str, float]:
  """Means over the logged steps; per-type losses are row-weighted over the rows of that type."""
  history = jax.device_get(history)
  out = {}
  for key in ("loss", "accuracy", "grad_norm", "param_norm", "update_norm", "scale",
              "learning_rate"):
    out[key] = float(np.mean([h[key] for h in history]))
  out.update(per_type_losses(history, "loss/"))
  out["finite"] = bool(all(np.isfinite(h["loss"]) for h in history))
  return out


def format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def peak_flops_per_device(device) -> float | None:
  if device.platform == "cpu":
    return None
  kind = device.device_kind
  for needle, flops in PEAK_FLOPS_PER_DEVICE:
    if needle.lower() in kind.lower():
      return flops
  return None


def _significant(value: float) -> str:
  """Three significant digits, without exponents: 195, 2.94, 0.234, 0.0312 (slow CPU steps)."""
  return f"{value:.3g}" if value >= 1e-3 else f"{value:.2e}"


class ThroughputReporter:
  """Throughput and the console line of each log interval.

  Call `exclude(seconds)` for time spent outside train steps (validation, evaluation, saving), and
  `report(step, summary)` at each log step: it adds steps/s, examples/s, TFLOP/s per device and MFU
  to `summary` and returns the console line."""

  def __init__(self, start_step: int, num_steps: int, batch_size: int,
               flops_per_step: float | None, device=None):
    self.num_steps = num_steps
    self.batch_size = batch_size
    self.flops_per_step = flops_per_step
    device = jax.devices()[0] if device is None else device
    self.platform = device.platform
    self.peak_flops = peak_flops_per_device(device)
    self._last_step = start_step
    self._interval_started = time.time()
    self._excluded = 0.0

  def exclude(self, seconds: float) -> None:
    self._excluded += seconds

  def report(self, step: int, summary: dict[str, Any]) -> str:
    elapsed = max(time.time() - self._interval_started - self._excluded, 1e-9)
    steps_per_second = (step - self._last_step) / elapsed
    summary["steps_per_second"] = steps_per_second
    summary["examples_per_second"] = steps_per_second * self.batch_size
    tflops = None
    if self.flops_per_step:
      tflops = self.flops_per_step * steps_per_second / 1e12
      summary["tflops_per_device"] = tflops
      if self.peak_flops:
        summary["mfu"] = tflops * 1e12 / self.peak_flops
    self._last_step = step
    self._interval_started = time.time()
    self._excluded = 0.0
    per_type = ", ".join(f"{n} {summary[f'loss/{n}']:.3f}" for n in BATCH_TYPE_NAMES
                         if f"loss/{n}" in summary)
    eta = (self.num_steps - step) / max(steps_per_second, 1e-9)
    mfu = (f"MFU {100 * summary['mfu']:.1f}%" if "mfu" in summary
           else f"MFU n/a ({self.platform})")
    return (f"step {step}/{self.num_steps} | loss {summary['loss']:.4f}"
            + (f" ({per_type})" if per_type else "")
            + f" | acc {summary['accuracy']:.3f} | lr {summary['learning_rate']:.2e}"
            f" | grad {summary['grad_norm']:.3f} | {_significant(steps_per_second)} steps/s, "
            f"{summary['examples_per_second']:.0f} ex/s"
            + (f", {tflops:.3g} TFLOP/s/device" if tflops is not None else "")
            + f", {mfu} | ETA {format_seconds(eta)}")
