"""train.report_to through accelerate's trackers, offline: TensorBoard event files under the run folder, a
W&B offline run and an MLflow file-store run that record the config and the losses, and a tracker that is not installed as one line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipeline.config.configlib import from_dict
from pipeline.config.kvmap import KVMapConfig
from tests.helpers_train import make_tiny_store, tiny_train_config
from trainer.train import run_training


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("trackers") / "tiny.zarr", num_train=16, num_eval=4)


def _run(tmp_path: Path, store: Path, report_to) -> Path:
    cfg = tiny_train_config(
        tmp_path, store, **{"train.steps": 3, "train.log_every": 1, "train.ckpt_every": 0}
    )
    cfg["train"]["report_to"] = report_to
    run_training(from_dict(KVMapConfig, cfg))
    return Path(cfg["run_dir"])


def test_tensorboard_writes_event_files_with_the_losses(tmp_path, store):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _run(tmp_path, store, ["tensorboard"])
    events = list((run / "tb").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "loss_ce" in acc.Tags()["scalars"] and len(acc.Scalars("loss_ce")) == 3


def test_wandb_offline_records_config_and_losses(tmp_path, store, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = _run(tmp_path, store, ["wandb"])
    (offline,) = (run / "wandb").glob("offline-run-*")
    # the run file (protobuf records, synced later with `wandb sync`) holds the config keys and the metrics;
    # wandb's service process may still be flushing it when finish() returns
    data, deadline = b"", time.monotonic() + 30
    while b"loss_ce" not in data and time.monotonic() < deadline:
        time.sleep(0.2)
        data = next(offline.glob("run-*.wandb")).read_bytes()
    assert b"lambda_kv" in data and b"train.steps" in data and b"loss_ce" in data


def test_mlflow_file_store_records_config_and_losses(tmp_path, store, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps file stores behind this switch
    run = _run(tmp_path, store, ["mlflow"])
    client = mlflow.tracking.MlflowClient(uri)
    (exp,) = [e for e in client.search_experiments() if e.name == run.name]
    (r,) = client.search_runs([exp.experiment_id])
    assert r.data.params["train.steps"] == "3" and "lambda_kv" in r.data.params
    assert len(client.get_metric_history(r.info.run_id, "loss_ce")) == 3


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, store, monkeypatch):
    import trainer.run.loop_utils as lu

    monkeypatch.setattr(lu, "get_available_trackers", lambda: ["tensorboard"])
    with pytest.raises(ValueError, match=r"train.report_to=\['mlflow'\]: \['mlflow'\] not installed"):
        _run(tmp_path, store, ["mlflow"])
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
