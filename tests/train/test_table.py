"""`darec table`: the CSV a reviewer reads, the cache, and bold only where the paired test says so."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from darec.cli import main
from darec.data.store import PreparedDataset
from darec.train.metrics import auc
from darec.train.table import Evidence, markdown_table, summarise, TableSpec

COLUMNS = ["preset", "dim", "seeds", "auc_mean", "auc_std", "auc_ci_low", "auc_ci_high", "auc_new_mean",
           "gauc_mean", "logloss_mean", "p_vs_twin"]


def test_table_writes_every_column_and_reuses_finished_runs(planted_dir, tmp_path, capsys):
    args = ["table", "--data", str(planted_dir), "--out", str(tmp_path), "--presets", "twin", "dare",
            "--dims", "4", "--seeds", "1", "2", "--epochs", "1", "--batch-size", "512", "--threads", "1",
            "--no-progress"]
    assert main(args) == 0
    rows = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert [r["preset"] for r in rows] == ["twin", "dare"] and set(COLUMNS) <= set(rows[0])
    twin, dare = rows
    assert twin["p_vs_twin"] == "" and 0 < float(dare["p_vs_twin"]) <= 1
    for row in rows:
        assert float(row["auc_ci_low"]) <= float(row["auc_mean"]) <= float(row["auc_ci_high"])
    assert "new-item AUC" in (tmp_path / "table.md").read_text()
    capsys.readouterr()
    assert main(args) == 0
    assert "training" not in capsys.readouterr().err  # every run cached


def _evidence(n_users=200, per_user=12, seed=0):
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), per_user)
    labels = (np.arange(len(users)) % 3 == 0).astype(np.int64)
    flags = (labels == 1) & (rng.random(len(users)) < 0.5)
    return Evidence(labels=labels, users=users, in_history=flags, constant_logloss=0.6365,
                        shortcut_auc=auc(labels, flags.astype(float))), rng


def _runs(tmp_path, evidence, rng, gaps):
    runs = []
    for preset, gap in gaps.items():
        for seed in (1, 2, 3):
            folder = tmp_path / f"{preset}{seed}"
            folder.mkdir()
            logits = evidence.labels * gap + rng.normal(size=len(evidence.labels))
            np.save(folder / "test_logits.npy", logits.astype(np.float32))
            test = {"auc": auc(evidence.labels, logits), "gauc": 0.5, "logloss": 0.6, "accuracy": 0.7,
                    "category_auc": 0.5}
            runs.append({"preset": preset, "dim": 16, "seed": seed, "run_dir": str(folder), "test": test})
    return runs


def test_bold_only_where_the_row_is_significantly_above_twin(tmp_path):
    evidence, rng = _evidence()
    runs = _runs(tmp_path, evidence, rng, {"twin": 1.0, "dare": 1.6, "din": 1.0})
    spec = TableSpec(presets=("twin", "dare", "din"), dims=(16,), seeds=(1, 2, 3))
    rows = summarise(runs, spec, evidence, n_replicates=300)
    by = {r["preset"]: r for r in rows}
    assert by["dare"]["p_vs_twin"] < 0.05 and by["din"]["p_vs_twin"] > 0.05
    text = markdown_table(rows, spec, {"source": "test"}, evidence, {"threads": 1, "torch": "x", "device": "cpu"})
    lines = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "**" in lines["DARE"] and "**" not in lines["DIN (2018)"] and "**" not in lines["TWIN (2023)"]


def test_new_item_auc_ignores_the_positives_a_reclick_flag_gives_away(tmp_path):
    """A model that scores only the re-click flag has AUC > 0.5 overall, exactly 0.5 on new items."""
    evidence, rng = _evidence()
    folder = tmp_path / "twin1"
    folder.mkdir()
    np.save(folder / "test_logits.npy", evidence.in_history.astype(np.float32))
    runs = [{"preset": "twin", "dim": 16, "seed": 1, "run_dir": str(folder),
             "test": {"auc": evidence.shortcut_auc, "gauc": 0.5, "logloss": 0.6, "accuracy": 0.7, "category_auc": 0.5}}]
    row = summarise(runs, TableSpec(presets=("twin",), dims=(16,), seeds=(1,)), evidence, n_replicates=50)[0]
    assert row["auc_mean"] > 0.6 and row["auc_new_mean"] == pytest.approx(0.5)
    assert row["auc_std"] is None  # one seed has no spread to report, not a spread of 0
