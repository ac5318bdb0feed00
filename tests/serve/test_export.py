"""`darec export`: the artifact scores exactly like the eager Scorer (torch.export program and onnxruntime),
loads without darec's model or training code, and refuses what darec did not write: a changed file (its
checksum), and a forged program whose checksums were rewritten too (each forgery is first shown to be
armed: plain `torch.export.load` runs or imports what it names)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from darec.cli import main
from darec.data.protocol import ProtocolConfig
from darec.data.synthetic import SyntheticConfig, prepare_synthetic
from darec.errors import ConfigError, DataError
from darec.models import PRESETS, ModelConfig, build_model, preset_config
from darec.serve.export import BACKENDS, export_model, is_export_dir, load_exported
from darec.serve.history import History
from darec.serve.scorer import Scorer, ScorerModule

N_ITEMS, N_CATS, MAX_LEN, TOP_K = 60, 7, 30, 5


def _model(preset: str, **overrides):
    """A tiny model with random weights and non-trivial BatchNorm statistics (parity needs no training)."""
    torch.manual_seed(0)
    config = preset_config(preset, n_items=N_ITEMS, n_categories=N_CATS, max_len=MAX_LEN, top_k=TOP_K, dim=8,
                           init_std=0.2, hidden=(16, 8), aux_hidden=(8,), **overrides)
    if config.tables != "shared":
        config = config.replace(attention_dim=4)  # K_A != K_R, as DARE is meant to run
    model = build_model(config).eval()
    g = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=g) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=g) + 0.5)
    return model


def _served(preset: str) -> bool:
    """The Scorer's own rule (dot-product score, a serving search): the presets an export must cover."""
    try:
        ScorerModule(_model(preset))
    except ConfigError:
        return False
    return True


SERVED = [name for name in PRESETS if _served(name)]
MULTI_EMBEDDING = {"n_embedding_sets": 2}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(preset, overrides) -> (model, export folder), each exported once per module."""
    cache = {}

    def get(preset: str, **overrides):
        key = (preset, *sorted(overrides.items()))
        if key not in cache:
            model = _model(preset, **overrides)
            out = tmp_path_factory.mktemp("exports") / preset
            export_model(model, out, preset=preset, progress=False)
            cache[key] = model, out
        return cache[key]

    return get


def _batch(g: torch.Generator, u: int, n: int, c: int, *, explicit_positions: bool):
    """Left-padded histories: user 0 has none, user 1 fewer than K behaviours, the rest random lengths."""
    real = torch.randint(0, n + 1, (u,), generator=g)
    real[: min(u, 2)] = torch.tensor([0, min(n, TOP_K - 2)])[: min(u, 2)]
    mask = torch.arange(n).unsqueeze(0) >= (n - real).unsqueeze(1)                          # (U, N)
    items = torch.randint(1, N_ITEMS, (u, n), generator=g) * mask
    cats = torch.randint(1, 4, (u, n), generator=g) * mask  # few categories: hard search finds matches
    positions = None
    if explicit_positions:  # gaps between behaviours, most recent last (as a time-bucketed log would give)
        positions = torch.randint(1, 4, (u, n), generator=g).flip(1).cumsum(1).flip(1)
    history = History(items=items, categories=cats, mask=mask, positions=positions)
    return history, torch.randint(0, N_ITEMS, (u, c), generator=g), torch.randint(1, 4, (u, c), generator=g)


def test_served_presets_cover_dare_twin_and_the_searches():
    assert {"dare", "twin", "twin_hard", "eta", "sdim"} <= set(SERVED)
    assert "din" not in SERVED and "din_full" not in SERVED


@pytest.mark.slow
@pytest.mark.parametrize("preset, overrides", [*((name, {}) for name in SERVED), ("dare", MULTI_EMBEDDING)],
                         ids=[*SERVED, "dare-multi-embedding"])
def test_program_and_onnx_equal_the_eager_scorer(preset, overrides, exported):
    model, out = exported(preset, **overrides)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["onnx"]["exported"], manifest["onnx"]  # every served search exports to ONNX today
    scorer = Scorer(model)
    loaded = {backend: load_exported(out, backend=backend) for backend in BACKENDS}
    g = torch.Generator().manual_seed(sum(map(ord, preset)))
    # N from 1 (padded up to K inside) past max_len (positions clamp); U and C down to 1.
    for trial, (u, n, c) in enumerate([(1, 1, 1), (3, TOP_K, 4), (2, 17, 1), (5, 45, 9)]):
        history, items, cats = _batch(g, u, n, c, explicit_positions=trial % 2 == 1)
        expected = scorer.logits(history, items, cats)
        if u * c > 2:
            assert expected.std() > 1e-3  # not a comparison between constants
        for backend, exported_model in loaded.items():
            got = exported_model.logits(history, items, cats)
            assert got.shape == (u, c)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=lambda m: f"{backend} {u, n, c}: {m}")


def test_artifact_lists_every_file_with_its_checksum(exported):
    model, out = exported("dare")
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert on_disk == {*manifest["files"], "manifest.json"} == {"model.pt2", "model.onnx", "config.json",
                                                                 "manifest.json"}
    for name, entry in manifest["files"].items():
        data = (out / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "dare" and ModelConfig.from_dict(config["model_config"]) == model.config
    assert (config["n_items"], config["n_categories"], config["max_len"], config["top_k"]) == \
        (N_ITEMS, N_CATS, MAX_LEN, TOP_K)
    assert config["min_history"] == TOP_K and config["torch_version"] == str(torch.__version__)
    assert config["dataset"] == {"content_sha256": None, "ids": False}
    assert is_export_dir(out)


@pytest.mark.parametrize("name", ["model.pt2", "config.json", "model.onnx"])
def test_a_changed_byte_is_refused(exported, tmp_path, name, capsys):
    _, out = exported("twin")
    copy = tmp_path / "export"
    _copy_tree(out, copy)
    data = bytearray((copy / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    backend = "onnxruntime" if name == "model.onnx" else "torch"
    with pytest.raises(DataError, match=f"checksum mismatch: {name}"):
        load_exported(copy, backend=backend)
    assert main(["check-export", str(copy)]) == 2
    err = capsys.readouterr().err
    assert f"checksum mismatch: {name}" in err and len(err.strip().splitlines()) == 1


def _copy_tree(src: Path, dst: Path) -> None:
    for file in src.rglob("*"):
        if file.is_file():
            (dst / file.relative_to(src)).parent.mkdir(parents=True, exist_ok=True)
            (dst / file.relative_to(src)).write_bytes(file.read_bytes())


def _forge(export_dir: Path, target: Path, edit) -> Path:
    """A copy of the export whose model.pt2 has `edit(model_json, entries)` applied and whose manifest
    carries the new checksum: what someone who hands over a crafted artifact can do."""
    _copy_tree(export_dir, target)
    with zipfile.ZipFile(export_dir / "model.pt2") as archive:
        entries = {info.filename: archive.read(info.filename) for info in archive.infolist()}
    graph_name = next(name for name in entries if name.endswith("models/model.json"))
    doc = json.loads(entries[graph_name])
    edit(doc, entries)
    entries[graph_name] = json.dumps(doc).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    (target / "model.pt2").write_bytes(buffer.getvalue())
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"]["model.pt2"] = {"sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
                                      "size": len(buffer.getvalue())}
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def _edit_expr(marker: Path):
    """sympy evaluates a symbolic size string as Python: this one writes MARKER."""
    def edit(doc, entries):
        value = next(iter(doc["graph_module"]["graph"]["sym_int_values"].values()))
        value["as_expr"]["expr_str"] = f"Integer(open({str(marker)!r}, 'w').write('x'))"
    return edit


def _edit_spec(module: str):
    """The input spec may name an enum, whose module torch imports."""
    def edit(doc, entries):
        signature = doc["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["in_spec"])
        spec[1]["children_spec"][1]["context"] = json.dumps([{"__enum__": True, "fqn": f"{module}:X", "name": "A"}])
        signature["in_spec"] = json.dumps(spec)
    return edit


def _edit_guard(marker: Path):
    def edit(doc, entries):
        doc["guards_code"].append(f"open({str(marker)!r}, 'w').close() is None")
    return edit


def _edit_target(doc, entries):
    node = next(n for n in doc["graph_module"]["graph"]["nodes"] if n["target"].endswith("aten.topk.default"))
    node["target"] = "torch.os.system"  # any torch.* attribute resolves, os included


def _edit_pickled_weight(doc, entries):
    name = next(n for n in entries if n.endswith("model_weights_config.json"))
    config = json.loads(entries[name])
    next(iter(config["config"].values()))["use_pickle"] = True  # torch.load(weights_only=False) on its bytes
    entries[name] = json.dumps(config).encode()


def _edit_sample_inputs(doc, entries):
    name = next(n for n in entries if n.endswith("sample_inputs/model.pt"))
    buffer = io.BytesIO()
    torch.save(((torch.zeros(1),), {}), buffer)
    entries[name] = buffer.getvalue()


def _run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_forged_programs_are_armed_for_plain_torch_and_refused_by_darec(exported, tmp_path):
    _, out = exported("twin")
    marker, module = tmp_path / "ran", "tabnanny"  # a harmless stdlib module nothing here imports
    expr = _forge(out, tmp_path / "expr", _edit_expr(marker))
    spec = _forge(out, tmp_path / "spec", _edit_spec(module))
    armed = _run_python(f"""
        import sys, torch
        for forged in ({str(expr / "model.pt2")!r}, {str(spec / "model.pt2")!r}):
            try:
                torch.export.load(forged).module()
            except Exception:
                pass
        print({module!r} in sys.modules)
    """)
    assert marker.exists() and armed.strip() == "True"  # plain torch evaluated the string, imported the module
    marker.unlink()
    assert module not in sys.modules
    for forged in (expr, spec):
        with pytest.raises(DataError, match="refused to load the exported program"):
            load_exported(forged)
    assert not marker.exists() and module not in sys.modules


@pytest.mark.parametrize("edit, reason", [
    (_edit_target, "not on darec's allow-list"),
    (_edit_pickled_weight, "pickled"),
    (_edit_sample_inputs, "sample inputs"),
    (None, "guard expression"),
])
def test_other_forgeries_are_refused(exported, tmp_path, edit, reason):
    _, out = exported("twin")
    marker = tmp_path / "ran"
    forged = _forge(out, tmp_path / "forged", edit or _edit_guard(marker))
    with pytest.raises(DataError, match=reason):
        load_exported(forged)
    assert not marker.exists()


def test_onnx_reading_external_files_is_refused(exported, tmp_path):
    import onnx

    _, out = exported("twin")
    target = tmp_path / "external"
    _copy_tree(out, target)
    model = onnx.load_model(str(target / "model.onnx"))
    onnx.save_model(model, str(target / "model.onnx"), save_as_external_data=True, location="weights.bin",
                    size_threshold=0)
    manifest = json.loads((target / "manifest.json").read_text())
    data = (target / "model.onnx").read_bytes()
    manifest["files"]["model.onnx"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="external files"):
        load_exported(target, backend="onnxruntime")


def test_loader_needs_no_model_or_training_code(exported, tmp_path):
    model, out = exported("dare")
    history, items, cats = _batch(torch.Generator().manual_seed(3), 4, 12, 6, explicit_positions=False)
    np.savez(tmp_path / "inputs.npz", items=history.items.numpy(), categories=history.categories.numpy(),
             cand_items=items.numpy(), cand_categories=cats.numpy())
    _run_python(f"""
        import sys
        for name in ("darec.models", "darec.train", "darec.serve.scorer", "darec.data"):
            sys.modules[name] = None  # importing any of them now fails
        import numpy as np, torch
        from darec.serve.export import load_exported
        from darec.serve.history import History
        x = np.load({str(tmp_path / "inputs.npz")!r})
        history = History(torch.from_numpy(x["items"]), torch.from_numpy(x["categories"]))
        for backend in ("torch", "onnxruntime"):
            logits = load_exported({str(out)!r}, backend=backend).logits(
                history, torch.from_numpy(x["cand_items"]), torch.from_numpy(x["cand_categories"]))
            np.save({str(tmp_path)!r} + f"/{{backend}}.npy", logits.numpy())
        assert not any(m.startswith(("darec.models.", "darec.train.")) for m in sys.modules)
    """)
    expected = Scorer(model).logits(history, items, cats)
    for backend in BACKENDS:
        torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / f"{backend}.npy")), expected,
                                   rtol=0, atol=1e-5)


def test_ids_outside_the_tables_are_one_error(exported):
    _, out = exported("dare")
    model = load_exported(out)
    history = History(items=torch.ones(1, 8, dtype=torch.long), categories=torch.ones(1, 8, dtype=torch.long))
    with pytest.raises(DataError, match=r"candidate item ids must be in \[0, 60\), got \[60\]"):
        model.logits(history, torch.tensor([[3, N_ITEMS]]), torch.tensor([[1, 1]]))


def test_unservable_models_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot export this model"):
        export_model(_model("din"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_failed_onnx_export_is_a_note_not_a_crash(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no ONNX for this search")

    monkeypatch.setattr(torch.onnx, "export", fail)
    manifest = export_model(_model("eta"), tmp_path / "out", progress=False)
    assert manifest["onnx"] == {"exported": False, "reason": "ONNX export failed: no ONNX for this search"}
    assert not (tmp_path / "out" / "model.onnx").exists() and "model.onnx" not in manifest["files"]
    with pytest.raises(DataError, match="this export has no model.onnx: ONNX export failed"):
        load_exported(tmp_path / "out", backend="onnxruntime")
    assert load_exported(tmp_path / "out").backend == "torch"


def test_export_replaces_only_its_own_folders(tmp_path):
    model = _model("twin_hard")
    out = tmp_path / "out"
    export_model(model, out, onnx=False, progress=False)
    export_model(model, out, onnx=False, progress=False)  # darec's own export: replaced
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="exists"):
        export_model(model, out, onnx=False, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    export_model(model, out, onnx=False, overwrite=True, progress=False)
    assert not (out / "notes.txt").exists() and is_export_dir(out)


def test_cli_exports_a_trained_run_with_its_id_maps(tiny_planted_dir, tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--data", str(tiny_planted_dir), "--out", str(run), "--preset", "twin", "--dim", "4",
                 "--top-k", "5", "--epochs", "1", "--batch-size", "4096", "--device", "cpu", "--no-progress"]) == 0
    assert main(["export", str(run), "--out", str(out), "--data", str(tiny_planted_dir), "--no-progress"]) == 0
    config = json.loads((out / "config.json").read_text())
    result = json.loads((run / "result.json").read_text())
    assert config["preset"] == "twin" and config["dataset"] == {"content_sha256": result["dataset"], "ids": True}
    for name in ("users", "items", "categories"):
        assert (out / "ids" / f"{name}.parquet").read_bytes() == \
            (tiny_planted_dir / "ids" / f"{name}.parquet").read_bytes()
    capsys.readouterr()
    assert main(["check-export", str(out)]) == 0
    assert "torch and onnxruntime" in capsys.readouterr().out
    # A dataset other than the run's is refused, and so is writing over a folder darec did not write.
    other_data = tmp_path / "other_data"
    prepare_synthetic(SyntheticConfig(n_users=30, n_items=40, n_categories=6, mean_length=225, seed=7),
                      out=other_data, config=ProtocolConfig(max_len=20))
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--data", str(other_data), "--no-progress"]) == 2
    assert "not the dataset this run was trained on" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    assert main(["export", str(run), "--out", str(mine), "--no-progress"]) == 2
    assert "exists" in capsys.readouterr().err and os.listdir(mine) == ["keep.txt"]
