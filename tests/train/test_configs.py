"""Every shipped YAML config loads and builds its model; every preset builds on a tiny vocabulary."""
from __future__ import annotations

from pathlib import Path

import pytest

from darec.cli import main
from darec.errors import ConfigError
from darec.models import build_model, preset_config
from darec.train.config import TrainConfig, load_run_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "darec" / "configs").glob("*.yaml"))  # run configs; schemas/ holds feature schemas


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads_and_builds(path):
    config = load_run_config(path)
    build_model(preset_config(config.preset, n_items=20, n_categories=5, **config.model))


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 3


def test_unknown_option_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: 0.1\nlearning_rate: 0.2\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_cli_reports_bad_override_without_traceback(capsys, tmp_path):
    code = main(["train", "--data", str(tmp_path), "--set", "model.not_a_field=3"])
    assert code == 2
    assert "not_a_field" in capsys.readouterr().err


def test_shipped_config_by_name_from_any_folder(tmp_path, monkeypatch):
    """`--config paper` names the packaged file, wherever the command runs; a local file of that name
    wins, and an unknown name is one argparse line (exit 2)."""
    from darec.cli.arg_types import config_file

    monkeypatch.chdir(tmp_path)
    assert config_file("paper").resolve() == (CONFIGS[0].parent / "paper.yaml").resolve()
    (tmp_path / "paper").write_text("lr: 0.5\n")
    assert config_file("paper") == Path("paper")
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tmp_path), "--config", "no_such_config"])
    assert exit_info.value.code == 2


def test_version_is_reported(capsys):
    from darec import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"darec {__version__}"


def test_command_line_starts_without_torch():
    """`darec --help` and a bad argument answer without importing torch or scipy (seconds of start-up):
    every subcommand imports its heavy libraries in its handler, not when it registers."""
    import subprocess
    import sys

    probe = ("import sys; from darec.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'scipy', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
