"""End to end: `darec analyze all` then `darec report` on a tiny planted dataset, through the CLI."""
from __future__ import annotations

import json

import pytest

from darec.analysis import analyze
from darec.cli import main
from darec.errors import ConfigError

KINDS = ("gradients", "attention", "retrieval", "discriminability", "convergence", "attention-size")


def test_analyze_all_then_report(tiny_planted_dir, tmp_path):
    out = tmp_path / "analyses"
    args = ["analyze", "all", "--data", str(tiny_planted_dir), "--out", str(out),
            "--presets", "dare", "twin", "twin_no_tr",
            "--dim", "4", "--sizes", "8", "4", "--epochs", "1", "--batch-size", "128", "--eval-every", "3",
            "--steps", "5", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    for kind in KINDS:
        result = json.loads((out / kind / f"{kind}.json").read_text())
        assert result["figures"], kind
        assert all((out / kind / name).is_file() for name in result["figures"])
    grads = json.loads((out / "gradients" / "gradients.json").read_text())["presets"]
    assert grads["dare"]["rows_touched_by_both_paths"] == 0 and not grads["dare"]["tables"]
    assert grads["twin"]["tables"]["shared.category"]["steps_with_cosine"] == 5
    sizes = json.loads((out / "attention-size" / "attention-size.json").read_text())["models"]
    # K_R fixed at the largest size, K_A shrinks below it (the paper's Fig. 11c-d)
    assert [r["attention_dim"] for r in sizes["dare"]] == [8, 4] and {r["dim"] for r in sizes["dare"]} == {8}
    assert all(r["search_seconds"] > 0 for rows in sizes.values() for r in rows)
    assert (out / "runs" / "dare-d8-a4-s1" / "result.json").is_file()
    disc = json.loads((out / "discriminability" / "discriminability.json").read_text())
    assert disc["features"] == "h" and disc["models"]["dare"]["features"] == "h = v_t*r"
    assert {m["feature_dim"] for m in disc["models"].values()} == {12}           # h is one token wide (3 x 4)
    # A second call reuses the finished runs instead of training again.
    stamp = (out / "runs" / "dare-d4-s1" / "result.json").stat().st_mtime_ns
    assert main(["analyze", "convergence", "--data", str(tiny_planted_dir), "--out", str(out),
                 "--presets", "dare", "twin", "--dim", "4", "--epochs", "1", "--batch-size", "128", "--eval-every", "3", "--threads", "1",
                 "--no-progress"]) == 0
    assert (out / "runs" / "dare-d4-s1" / "result.json").stat().st_mtime_ns == stamp

    table_dir = tmp_path / "table"
    table_dir.mkdir()
    (table_dir / "table.md").write_text("# Test AUC, mean (std)\n\n| Setup | dim = 4 |\n|---|---|\n| DARE | 0.7 |\n")
    (table_dir / "table.csv").write_text("preset,auc_mean\ndare,0.7\n")
    assert main(["report", str(out), "--table", str(table_dir)]) == 0
    report = (out / "report.md").read_text()
    assert "## Table 1" in report and "| DARE | 0.7 |" in report and "table.csv)" in report
    for kind in KINDS:
        assert f"({kind}/{kind}.json)" in report
    for name in json.loads((out / "attention" / "attention.json").read_text())["figures"]:
        assert f"(attention/{name})" in report


def test_report_and_analyze_errors_are_one_line(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "nothing to report" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="representation-dim"):
        analyze("attention-size", data=tmp_path, out=tmp_path / "o", representation_dim=0)
    with pytest.raises(ConfigError, match="cluster-features"):
        analyze("discriminability", data=tmp_path, out=tmp_path / "o", cluster_features="r")
    assert main(["analyze", "gradients", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a prepared dataset" in capsys.readouterr().err


def test_changed_budget_does_not_reuse_an_old_run(tiny_planted_dir, tmp_path, capsys):
    base = ["analyze", "convergence", "--data", str(tiny_planted_dir), "--out", str(tmp_path), "--presets", "dare",
            "--dim", "4", "--batch-size", "128", "--eval-every", "3", "--threads", "1", "--no-progress"]
    assert main(base + ["--epochs", "1"]) == 0
    assert main(base + ["--epochs", "2"]) == 2
    assert "another training configuration" in capsys.readouterr().err
