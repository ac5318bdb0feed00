"""Bad input to `train`, `table`, `score`, `analyze` and `report`: exit 2, one line naming the culprit, no
traceback, and nothing outside darec's own output changed. Every case fails before training starts."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from darec.checkpoint import save_checkpoint
from darec.cli import main
from darec.data.store import PreparedDataset
from darec.errors import ConfigError
from darec.models import build_model, preset_config
from tests.helpers import changes_outside, tree_snapshot

# Put before a case's own flags (the last occurrence wins), so a case that wrongly trains stays short.
FAST = {"train": ["--dim", "4", "--epochs", "1", "--batch-size", "4096", "--no-progress"],
        "table": ["--presets", "dare", "--dims", "4", "--seeds", "1", "--epochs", "1", "--batch-size", "4096",
                  "--no-progress"]}


@pytest.fixture(scope="module")
def checkpoints(planted_dir, tmp_path_factory) -> dict[str, Path]:
    """A DARE checkpoint for the planted data and one trained on a vocabulary of another size."""
    dataset = PreparedDataset.open(planted_dir)
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name, extra_items in (("ckpt", 0), ("ckpt_wrong", 5)):  # n_wrong in the cases
        config = preset_config("dare", n_items=dataset.n_items + extra_items, n_categories=dataset.n_categories,
                               max_len=50, dim=4, attention_dim=2)
        paths[name] = folder / f"{name}.pt"
        save_checkpoint(paths[name], {"model_config": config.to_dict(), "model": build_model(config).state_dict()})
    return paths


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """A user's folder: a precious file, a folder, a YAML whose `model:` is a number, random bytes."""
    (tmp_path / "afile").write_text("precious\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "adir" / "notes.txt").write_text("keep me\n")
    (tmp_path / "model3.yaml").write_text("model: 3\n")
    (tmp_path / "garbage.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of `darec ARGV` run in this process (argparse errors exit via SystemExit)."""
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as stop:
        rc = stop.code
    return rc, capsys.readouterr().err


# (id, argv and words with placeholders (see `fill`), words the message must contain, output path)
CASES = [
    # train
    ("train-data-missing", "train --data {tmp}/nope --out {tmp}/run", ["nope", "not a prepared dataset"], "run"),
    ("train-data-is-file", "train --data {tmp}/afile --out {tmp}/run", ["afile"], "run"),
    ("train-out-is-file", "train --data {data} --out {tmp}/afile", ["afile", "is a file"], None),
    ("train-out-under-file", "train --data {data} --out {tmp}/afile/run", ["afile/run", "regular file"], None),
    ("train-out-user-folder", "train --data {data} --out {tmp}/adir", ["adir", "notes.txt"], None),
    ("train-out-in-proc", "train --data {data} --out /proc/darec-test-run", ["/proc/darec-test-run"], None),
    ("train-out-in-sys", "train --data {data} --out /sys/darec-test-run", ["/sys/darec-test-run"], None),
    ("train-preset", "train --data {data} --preset dare2 --out {tmp}/run", ["dare2", "preset"], "run"),
    ("train-dim-zero", "train --data {data} --dim 0 --out {tmp}/run", ["dim", "0"], "run"),
    ("train-epochs-negative", "train --data {data} --epochs -1 --out {tmp}/run", ["epochs", "-1"], "run"),
    ("train-epochs-text", "train --data {data} --epochs many --out {tmp}/run", ["epochs", "many"], "run"),
    ("train-batch-zero", "train --data {data} --batch-size 0 --out {tmp}/run", ["batch_size", "0"], "run"),
    ("train-top-k-zero", "train --data {data} --top-k 0 --out {tmp}/run", ["top_k", "0"], "run"),
    ("train-max-len-zero", "train --data {data} --max-len 0 --out {tmp}/run", ["max_len", "0"], "run"),
    ("train-set-no-equals", "train --data {data} --set lr --out {tmp}/run", ["--set", "'lr'"], "run"),
    ("train-set-unknown", "train --data {data} --set speed=3 --out {tmp}/run", ["speed"], "run"),
    ("train-set-unknown-model", "train --data {data} --set model.width=3 --out {tmp}/run", ["width"], "run"),
    ("train-config-missing", "train --data {data} --config {tmp}/nope.yaml --out {tmp}/run", ["nope.yaml"], "run"),
    pytest.param("train-set-lr-text", "train --data {data} --set lr=fast --out {tmp}/run", ["lr", "fast"], "run"),
    pytest.param("train-set-batch-float", "train --data {data} --set batch_size=1.5 --out {tmp}/run",
                 ["batch_size", "1.5"], "run"),
    pytest.param("train-set-dim-text", "train --data {data} --set model.dim=big --out {tmp}/run",
                 ["dim", "big"], "run"),
    pytest.param("train-yaml-model-number", "train --data {data} --config {tmp}/model3.yaml --out {tmp}/run",
                 ["model", "3"], "run"),
    pytest.param("train-config-folder", "train --data {data} --config {tmp}/adir --out {tmp}/run", ["adir"], "run"),
    pytest.param("train-device-gpu0", "train --data {data} --device gpu0 --out {tmp}/run", ["gpu0"], "run"),
    # table
    ("table-preset", "table --data {data} --presets dare2 --out {tmp}/tab", ["dare2"], "tab"),
    ("table-dims-zero", "table --data {data} --dims 0 --out {tmp}/tab", ["dim", "0"], "tab"),
    ("table-seeds-text", "table --data {data} --seeds one --out {tmp}/tab", ["seeds", "one"], "tab"),
    ("table-data-missing", "table --data {tmp}/nope --out {tmp}/tab", ["nope"], "tab"),
    ("table-out-under-file", "table --data {data} --out {tmp}/afile/tab", ["afile/tab", "regular file"], None),
    ("table-out-in-proc", "table --data {data} --out /proc/darec-test-table", ["/proc/darec-test-table"], None),
    # score
    ("score-top-negative", "score --checkpoint {ckpt} --data {data} --user 1 --top -2", ["--top", "-2"], None),
    ("score-top-zero", "score --checkpoint {ckpt} --data {data} --user 1 --top 0", ["--top", "0"], None),
    ("score-user-negative", "score --checkpoint {ckpt} --data {data} --user -1", ["--user", "-1"], None),
    ("score-user-unknown", "score --checkpoint {ckpt} --data {data} --user 99999", ["--user", "99999"], None),
    ("score-user-text", "score --checkpoint {ckpt} --data {data} --user alice", ["--user", "alice"], None),
    ("score-user-missing", "score --checkpoint {ckpt} --data {data}", ["--user"], None),
    ("score-data-missing-flag", "score --checkpoint {ckpt} --user 1", ["--data"], None),
    ("score-data-missing", "score --checkpoint {ckpt} --data {tmp}/nope --user 1", ["nope"], None),
    ("score-n-items-mismatch", "score --checkpoint {ckpt_wrong} --data {data} --user 1",
     ["n_items={n_wrong}", "has {n_items}", "ckpt_wrong.pt"], None),
    ("score-checkpoint-missing", "score --checkpoint {tmp}/nope.pt --data {data} --user 1", ["nope.pt"], None),
    ("score-checkpoint-folder", "score --checkpoint {tmp}/adir --data {data} --user 1", ["adir", "directory"], None),
    ("score-checkpoint-garbage", "score --checkpoint {tmp}/garbage.pt --data {data} --user 1", ["garbage.pt"], None),
    ("score-checkpoint-text", "score --checkpoint {tmp}/afile --data {data} --user 1", ["afile"], None),
    ("score-n-candidates-zero", "score --checkpoint {ckpt} --data {data} --user 1 --n-candidates 0",
     ["--n-candidates", "0"], None),
    ("score-n-candidates-too-many", "score --checkpoint {ckpt} --data {data} --user 1 --n-candidates 99999",
     ["--n-candidates", "99999"], None),
    ("score-candidate-zero", "score --checkpoint {ckpt} --data {data} --user 1 --candidates 0 5", ["candidate", "0"],
     None),
    ("score-candidate-unknown", "score --checkpoint {ckpt} --data {data} --user 1 --candidates 5 99999",
     ["candidate", "99999"], None),
    ("score-max-len-zero", "score --checkpoint {ckpt} --data {data} --user 1 --max-len 0", ["--max-len", "0"], None),
    ("score-seed-negative", "score --checkpoint {ckpt} --data {data} --user 1 --seed -1", ["--seed", "-1"], None),
    ("score-device", "score --checkpoint {ckpt} --data {data} --user 1 --device gpu0", ["--device", "gpu0"], None),
    ("score-json-under-file", "score --checkpoint {ckpt} --data {data} --user 1 --json {tmp}/afile/s.json",
     ["afile/s.json"], None),
    # analyze and report
    ("analyze-kind", "analyze everything --data {data} --out {tmp}/an", ["everything"], "an"),
    ("analyze-data-missing", "analyze gradients --data {tmp}/nope --out {tmp}/an", ["nope"], "an"),
    ("analyze-steps-zero", "analyze gradients --data {data} --out {tmp}/an --steps 0", ["--steps", "0"], "an"),
    ("analyze-dim-negative", "analyze gradients --data {data} --out {tmp}/an --dim -4", ["--dim", "-4"], "an"),
    ("analyze-sizes-zero", "analyze attention-size --data {data} --out {tmp}/an --sizes 8 0", ["--sizes", "0"], "an"),
    ("analyze-epochs-zero", "analyze gradients --data {data} --out {tmp}/an --epochs 0", ["--epochs", "0"], "an"),
    ("analyze-batch-negative", "analyze gradients --data {data} --out {tmp}/an --batch-size -3",
     ["--batch-size", "-3"], "an"),
    ("analyze-eval-every-zero", "analyze convergence --data {data} --out {tmp}/an --eval-every 0",
     ["--eval-every", "0"], "an"),
    ("analyze-threads-zero", "analyze gradients --data {data} --out {tmp}/an --threads 0", ["--threads", "0"], "an"),
    ("analyze-seed-negative", "analyze gradients --data {data} --out {tmp}/an --seed -2", ["--seed", "-2"], "an"),
    ("analyze-device", "analyze gradients --data {data} --out {tmp}/an --device gpu0", ["gpu0"], "an"),
    ("analyze-out-under-file", "analyze gradients --data {data} --out {tmp}/afile/an --steps 1",
     ["afile/an", "regular file"], None),
    ("report-nothing", "report {tmp}/adir", ["nothing to report", "adir"], None),
]


@pytest.mark.parametrize(("case", "argv", "words", "output"), CASES, ids=[
    c.values[0] if hasattr(c, "values") else c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, argv, words, output, work, planted_dir, checkpoints, capsys):
    dataset = PreparedDataset.open(planted_dir)
    fill = {"data": planted_dir, "tmp": work, **checkpoints, "n_users": dataset.n_users, "n_items": dataset.n_items,
            "n_wrong": dataset.n_items + 5}
    command, *rest = [part.format(**fill) for part in argv.split()]
    args = [command, *FAST.get(command, []), *rest]
    before = tree_snapshot(work, planted_dir, *checkpoints.values())

    rc, err = run_cli(args, capsys)

    assert rc == 2, (args, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1, err
    for word in words:
        assert word.format(**fill) in errors[0], (word, errors[0])
    allowed = [work / output] if output else []
    assert changes_outside(before, tree_snapshot(work, planted_dir, *checkpoints.values()), allowed) == []
    assert (work / "afile").read_text() == "precious\n" and (work / "adir" / "notes.txt").read_text() == "keep me\n"


def _half_train(d: Path) -> None:
    path = d / "train.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty_val(d: Path) -> None:
    (d / "val.npy").write_bytes(b"")


def _no_test(d: Path) -> None:
    (d / "test.npy").unlink()


def _manifest_edit(**changes):
    def edit(d: Path) -> None:
        import json
        manifest = json.loads((d / "manifest.json").read_text())
        manifest.update(changes)
        (d / "manifest.json").write_text(json.dumps(manifest))
    return edit


def _manifest_list(d: Path) -> None:
    (d / "manifest.json").write_text("[1, 2, 3]\n")


def _manifest_without_protocol(d: Path) -> None:
    import json
    manifest = json.loads((d / "manifest.json").read_text())
    del manifest["protocol"]
    (d / "manifest.json").write_text(json.dumps(manifest))


DAMAGES = [
    pytest.param(_half_train, ["train.npy"], id="half-size-train"),
    pytest.param(_empty_val, ["val.npy"], id="zero-byte-val"),
    pytest.param(_no_test, ["test.npy"], id="deleted-test"),
    pytest.param(_manifest_edit(n_items=50), ["manifest"], id="wrong-n-items"),
    pytest.param(_manifest_list, ["manifest.json"], id="manifest-is-list"),
    pytest.param(_manifest_without_protocol, ["protocol"], id="manifest-without-protocol"),
]


@pytest.mark.parametrize(("damage", "words"), DAMAGES)
@pytest.mark.parametrize("command", ["train", "score"])
def test_damaged_dataset_is_refused_before_training(command, damage, words, work, planted_dir, checkpoints, capsys):
    data = work / "data"
    shutil.copytree(planted_dir, data)
    damage(data)
    if command == "train":
        args = ["train", *FAST["train"], "--data", str(data), "--out", str(work / "run")]
    else:
        args = ["score", "--checkpoint", str(checkpoints["ckpt"]), "--data", str(data), "--user", "1"]
    before = tree_snapshot(work)

    rc, err = run_cli(args, capsys)

    assert rc == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert all(word in errors[0] for word in words), errors[0]
    assert not (work / "run" / "checkpoint.pt").exists()  # refused before the first step
    assert changes_outside(before, tree_snapshot(work), [work / "run"]) == []


def test_a_real_bug_keeps_its_traceback(monkeypatch, work, planted_dir, checkpoints):
    """Only OS errors about a path become one line: an OSError without one (a bug) still raises."""
    import darec.cli.serve as serve

    def broken(**_):
        raise OSError("internal failure with no path")
    monkeypatch.setattr(serve, "score_user", broken)
    with pytest.raises(OSError, match="internal failure"):
        main(["score", "--checkpoint", str(checkpoints["ckpt"]), "--data", str(planted_dir), "--user", "1"])
    monkeypatch.setattr(serve, "score_user", lambda **_: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["score", "--checkpoint", str(checkpoints["ckpt"]), "--data", str(planted_dir), "--user", "1"])


def test_max_len_is_not_replaced_by_the_default(planted_dir, checkpoints):
    """`--max-len N` scores with exactly N behaviours (0 used to mean "the model's default")."""
    from darec.cli.serve import score_user
    result = score_user(checkpoint=checkpoints["ckpt"], data=planted_dir, user=1, n_candidates=3, max_len=7)
    assert result["max_len"] == 7 and result["history_length"] == 7
    with pytest.raises(ConfigError, match="--max-len must be >= 1, got 0"):
        score_user(checkpoint=checkpoints["ckpt"], data=planted_dir, user=1, n_candidates=3, max_len=0)
