"""The trainer's metrics.jsonl writer implements clu's MetricWriter interface (it runs inside a clu
MultiWriter next to TensorBoard's writer, so a missing method fails the first call through it)."""

import inspect
import json

from clu import metric_writers
import jax
import ml_collections
import pytest

from hybrid_jax import train_metrics


def test_jsonl_writer_has_every_abstract_method_of_clu_metric_writer():
  abstract = sorted(metric_writers.MetricWriter.__abstractmethods__)
  assert len(abstract) >= 10, abstract  # the interface as clu 0.0.12 has it
  missing = [name for name in abstract if not callable(getattr(train_metrics.JsonlWriter, name, None))]
  assert not missing, f"JsonlWriter lacks {missing}"
  for name in abstract:  # same parameters, so calls through MultiWriter bind the same way
    ours = list(inspect.signature(getattr(train_metrics.JsonlWriter, name)).parameters)
    theirs = list(inspect.signature(getattr(metric_writers.MetricWriter, name)).parameters)
    assert ours == theirs, (name, ours, theirs)


def test_multi_writer_with_tensorboard_writes_hparams_texts_and_scalars(tmp_path):
  config = ml_collections.ConfigDict({"train": {"learning_rate": 3e-5, "batch_size": 32},
                                      "mesh": (("data", -1),), "data": {"alpha": 0.5}})
  writer = metric_writers.MultiWriter([metric_writers.SummaryWriter(str(tmp_path)),
                                       train_metrics.JsonlWriter(str(tmp_path))])
  hparams = train_metrics.hparams_of(config)
  assert hparams == {"train.learning_rate": 3e-5, "train.batch_size": 32,
                     "mesh": "(('data', -1),)", "data.alpha": 0.5}
  writer.write_hparams(hparams)
  writer.write_texts(1, {"note": "hello"})
  writer.write_histograms(1, {"x": [1.0, 2.0]})
  writer.write_scalars(2, {"loss": 1.5})
  writer.flush()
  writer.close()
  lines = [json.loads(l) for l in (tmp_path / train_metrics.METRICS_FILE).read_text().splitlines()]
  assert lines == [{"step": 2, "loss": 1.5}]
  assert list(tmp_path.glob("events.out.tfevents.*"))


def test_throughput_counts_train_steps_only_and_prints_slow_steps_with_three_digits(monkeypatch):
  clock = iter([100.0, 130.0, 130.0])  # reporter built at 100 s, report at 130 s (then restart)
  monkeypatch.setattr(train_metrics.time, "time", lambda: next(clock))
  reporter = train_metrics.ThroughputReporter(start_step=0, num_steps=100, batch_size=32,
                                              flops_per_step=None, device=jax.devices()[0])
  reporter.exclude(17.0)  # e.g. the step-0 validation: 13 s of the 30 were train steps
  summary = {"loss": 2.0, "accuracy": 0.5, "learning_rate": 1e-4, "grad_norm": 1.0}
  line = reporter.report(3, summary)
  assert summary["steps_per_second"] == pytest.approx(3 / 13)
  assert summary["examples_per_second"] == pytest.approx(96 / 13)
  assert "| 0.231 steps/s, 7 ex/s" in line and "ETA 7m00s" in line, line
