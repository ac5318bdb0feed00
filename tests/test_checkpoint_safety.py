"""A checkpoint is a file a user may have received: loading one must never run code, and a damaged
one is one line and exit 2. Each payload is first shown to be armed (a plain pickle load runs it)."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from darec.analysis.common import load_model
from darec.checkpoint import load_checkpoint, load_model_checkpoint, save_checkpoint
from darec.cli import main
from darec.errors import DataError
from darec.train.config import TrainConfig
from darec.train.trainer import train

RUN_FLAGS = ["--preset", "dare", "--dim", "4", "--epochs", "1", "--batch-size", "512", "--eval-every", "1000",
             "--device", "cpu", "--no-progress"]


class _Shell:
    """Unpickling this runs `touch MARKER` in a shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Open:
    """Unpickling this creates MARKER through builtins.open, no shell involved."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _zip_payload(path: Path, marker: Path) -> None:
    torch.save({"model_config": {}, "model": _Shell(marker)}, path)   # torch's own zip format


def _zip_open_payload(path: Path, marker: Path) -> None:
    torch.save({"model": _Open(marker), "config": {}}, path)


def _raw_pickle_payload(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"model": _Shell(marker)}, protocol=2))  # the legacy, non-zip format


PAYLOADS = [_zip_payload, _zip_open_payload, _raw_pickle_payload]


def _plant(tmp_path: Path, make, name: str = "checkpoint.pt") -> tuple[Path, Path]:
    """Write the payload and prove it is armed: a plain pickle load (torch's for its zip) creates the marker."""
    marker, path = tmp_path / "PWNED", tmp_path / name
    make(path, marker)
    if zipfile.is_zipfile(path):
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists(), "the payload must be live for this test to mean anything"
    marker.unlink()
    return path, marker


@pytest.fixture(scope="module")
def interrupted_run(planted_dir, tmp_path_factory) -> Path:
    """A darec run folder stopped after one step: `darec train` with RUN_FLAGS resumes it."""
    out = tmp_path_factory.mktemp("runs") / "run"
    config = TrainConfig(preset="dare", model={"dim": 4}, epochs=1, batch_size=512, eval_every=1000, device="cpu")
    assert train(data=planted_dir, config=config, out_dir=out, max_steps=1, progress=False)["step"] == 1
    return out


def _run_copy(interrupted_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(interrupted_run, run)
    return run


def _one_error_line(err: str, command: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith(f"darec {command}: error:")]
    assert len(errors) == 1, err
    assert all(word in errors[0] for word in words), errors[0]
    return errors[0]


@pytest.mark.parametrize("make", PAYLOADS)
def test_payload_in_train_out_never_runs(make, interrupted_run, planted_dir, tmp_path, capsys):
    run = _run_copy(interrupted_run, tmp_path)
    (run / "checkpoint.pt").unlink()
    path, marker = _plant(run, make)

    rc = main(["train", "--data", str(planted_dir), "--out", str(run), *RUN_FLAGS])

    assert rc == 2 and not marker.exists()
    _one_error_line(capsys.readouterr().err, "train", "checkpoint.pt")
    assert not (run / "result.json").exists()  # refused before training went on


@pytest.mark.parametrize("make", PAYLOADS)
def test_payload_as_score_checkpoint_never_runs(make, planted_dir, tmp_path, capsys):
    path, marker = _plant(tmp_path, make, "best.pt")

    rc = main(["score", "--checkpoint", str(path), "--data", str(planted_dir), "--user", "0"])

    assert rc == 2 and not marker.exists()
    _one_error_line(capsys.readouterr().err, "score", "best.pt")


@pytest.mark.parametrize("make", PAYLOADS)
def test_payload_in_an_analysis_run_never_runs(make, tmp_path):
    run = tmp_path / "dare-d16-s1"
    run.mkdir()
    path, marker = _plant(run, make, "best.pt")
    with pytest.raises(DataError, match="best.pt"):
        load_model(run)
    assert not marker.exists()


def test_score_refuses_a_payload_end_to_end(planted_dir, tmp_path):
    """Through the installed entry point, in a fresh interpreter: exit 2, one line, nothing ran."""
    path, marker = _plant(tmp_path, _zip_payload, "best.pt")
    proc = subprocess.run([sys.executable, "-m", "darec", "score", "--checkpoint", str(path), "--data",
                           str(planted_dir), "--user", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and not marker.exists()
    line = _one_error_line(proc.stderr, "score", str(path))
    assert "posix.system" in line or "system" in line
    assert proc.stdout == ""


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(path.stat().st_size))


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _foreign_zip(path: Path) -> None:
    """A real zip that is not a torch file."""
    path.unlink()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("readme.txt", "hello")


@pytest.mark.parametrize("damage", [_truncated, _garbage, _zero_bytes, _foreign_zip])
def test_damaged_checkpoint_on_resume_is_one_line(damage, interrupted_run, planted_dir, tmp_path, capsys):
    run = _run_copy(interrupted_run, tmp_path)
    damage(run / "checkpoint.pt")
    damaged = (run / "checkpoint.pt").read_bytes()

    rc = main(["train", "--data", str(planted_dir), "--out", str(run), *RUN_FLAGS])

    assert rc == 2
    _one_error_line(capsys.readouterr().err, "train", "checkpoint", str(run / "checkpoint.pt"))
    assert (run / "checkpoint.pt").read_bytes() == damaged  # left for the user to inspect, not overwritten


def test_the_trainers_own_checkpoint_loads(interrupted_run):
    """The control for the damaged cases: what the trainer wrote loads back with weights_only (a value
    of another type, e.g. torch's TorchVersion, would make every resume fail). tests/train covers the
    resumed run's numbers."""
    ckpt = load_checkpoint(interrupted_run / "checkpoint.pt", keys=("config", "model", "optimizer", "state"))
    assert ckpt["state"]["step"] == 1


def test_round_trip_keeps_tensors_and_plain_values(tmp_path):
    obj = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 3, "name": "dare", "curve": [0.5, None],
           "nested": {"ok": True, "ids": (1, 2)}}
    save_checkpoint(tmp_path / "c.pt", obj)
    back = load_checkpoint(tmp_path / "c.pt", keys=("model", "step"))
    assert torch.equal(back["model"]["w"], obj["model"]["w"])
    assert {k: v for k, v in back.items() if k != "model"} == {k: v for k, v in obj.items() if k != "model"}
    with pytest.raises(DataError, match=r"lacks \['optimizer'\]"):
        load_checkpoint(tmp_path / "c.pt", keys=("model", "optimizer"))


def test_a_checkpoint_whose_model_does_not_fit_its_config_is_one_error(tmp_path):
    from darec.models import build_model, preset_config
    config = preset_config("dare", n_items=30, n_categories=4, max_len=10, dim=4, attention_dim=2)
    weights = build_model(config).state_dict()
    save_checkpoint(tmp_path / "edited.pt", {"model_config": {**config.to_dict(), "n_items": 31}, "model": weights})
    with pytest.raises(DataError, match="does not load.*edited.pt"):
        load_model_checkpoint(tmp_path / "edited.pt")
    save_checkpoint(tmp_path / "list.pt", {"model_config": [1, 2], "model": weights})
    with pytest.raises(DataError, match="does not load"):
        load_model_checkpoint(tmp_path / "list.pt")
