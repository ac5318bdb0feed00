"""`darec prepare | synth | info` end to end, including the one-line error and exit code 2."""
from __future__ import annotations

from darec.cli import main


def test_prepare_movielens_and_info(tmp_path, capsys):
    out = tmp_path / "ml"
    assert main(["prepare", "--source", "movielens", "--out", str(out)]) == 0
    assert "7,239 samples" in capsys.readouterr().out
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "127 of 610" in text and "381 samples" in text


def test_prepare_bad_input_exits_2_with_location(tmp_path, capsys):
    bad = tmp_path / "ub.csv"
    bad.write_text("1,2,3,pv,100\n1,2,3,pv,oops\n")
    assert main(["prepare", "--source", "taobao", "--input", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "line 2" in err and "'oops'" in err and "timestamp" in err
    assert not (tmp_path / "o").exists()


def test_generic_columns_and_synth(tmp_path, capsys):
    log = tmp_path / "g.csv"
    log.write_text("u,i,c,t\n" + "".join(f"1,{k},1,{k}\n2,{k + 50},2,{k}\n" for k in range(1, 13)))
    args = ["prepare", "--source", "generic", "--input", str(log), "--out", str(tmp_path / "g"),
            "--columns", "user=u,item=i,category=c,timestamp=t", "--min-clicks", "10", "--n-train-targets", "2"]
    assert main(args) == 0
    assert main(["synth", "--out", str(tmp_path / "s"), "--users", "20"]) == 0
    assert "planted truth" in capsys.readouterr().out
    assert main(["info", str(tmp_path / "missing")]) == 2
