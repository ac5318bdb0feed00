"""`darec export`: a trained model as a self-contained folder that scores without darec's training code.

Layout of an export folder:

    model.pt2      torch.export program of `ScorerModule` (what `Scorer.logits` computes, fused=False):
                   hist_items, hist_categories, hist_mask, hist_positions (U, N) and cand_items,
                   cand_categories (U, C), then for a model with side features one input per feature in
                   the model's order, hist_NAME (U, N) or user_NAME (U,), int64 codes or float32 values
                   (candidates' item features are looked up inside, from the item tables it holds)
                   -> logits (U, C). U >= 1, C >= 1 and N >= min_history (= top_k, the search keeps K
                   positions) are dynamic; `ExportedModel` left-pads shorter histories with masked slots,
                   which changes no logit.
    model.onnx     the same graph for onnxruntime, weights inside; absent when it does not export or does
                   not match the eager scorer (the manifest's "onnx" entry says why)
    config.json    preset, model config, vocabulary sizes, max_len, top_k, min_history, inputs (by name: shape,
                   dtype and, for a feature, its name, kind and vocabulary) and input_order (the program's
                   positional order), temperature, dataset hash, darec and torch versions
    ids/           the dataset's raw <-> internal id maps (darec.data.id_maps), when the dataset is known
    manifest.json  sha256 and size of every other file; marks the folder as an export darec wrote

`load_exported` verifies every checksum first, then hands torch only a program `check_program` accepted
(torch.export.load would otherwise unpickle and evaluate parts of a file from elsewhere; see
program_check.py), and imports nothing of darec.models or the training code.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import json
import logging
import shutil
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from darec import __version__
from darec.errors import ConfigError, DataError
from darec.io import atomic_dir, relative_files, write_json
from darec.serve.history import DEFAULT_MAX_SCORES, History, resolve_candidates, user_chunks
from darec.serve.program_check import INPUT_NAMES, check_input_names, check_program

if TYPE_CHECKING:
    from darec.models.config import ModelConfig
    from darec.models.two_stage import TwoStageModel
    from darec.serve.scorer import ScorerModule

__all__ = ["export_model", "export_run", "load_exported", "check_export", "is_export_dir", "ExportedModel",
           "Backend", "BACKENDS", "FORMAT_VERSION", "PARITY_ATOL"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST, CONFIG, PROGRAM, ONNX_MODEL = "manifest.json", "config.json", "model.pt2", "model.onnx"
Backend = Literal["torch", "onnxruntime"]
BACKENDS: tuple[Backend, ...] = ("torch", "onnxruntime")
# An export must reproduce the eager Scorer's logits on a check batch within this (absolute, plus the same
# relative to the logit): float32 kernels of torch and onnxruntime sum in different orders.
PARITY_ATOL = 1e-5
_HASH_CHUNK = 1 << 20
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # colour codes in torch's exporter messages
_DTYPES = {"int64": torch.int64, "float32": torch.float32}  # of a feature input: codes or numeric values
_KINDS = ("item", "context", "user")


# ---------------------------------------------------------------------------------------------- writing

def export_run(source: str | Path, out: str | Path, *, data: str | Path | None = None, onnx: bool = True,
               overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Export the model of a `darec train` run folder (its best.pt) or of a checkpoint file to `out`.

    `data`, the prepared dataset, adds its id maps; it must be the dataset the run recorded (by content
    hash); a model with item features (brand) needs it, for its item -> code tables. Returns the manifest
    written."""
    from darec.checkpoint import load_model_checkpoint

    checkpoint, record = _run_record(Path(source))
    model = load_model_checkpoint(checkpoint, device="cpu")
    dataset_hash, item_features = record.get("dataset"), None
    if data is not None:
        dataset_hash, item_features = _check_dataset(Path(data), model, recorded=dataset_hash)
    elif dataset_hash:
        log.info("no --data: the export scores internal ids; pass the run's dataset to include its id maps")
    return export_model(model, out, preset=record.get("preset"), temperature=record.get("temperature", 1.0),
                        dataset=None if data is None else Path(data), dataset_hash=dataset_hash,
                        item_features=item_features, onnx=onnx, overwrite=overwrite,
                        protect=[p for p in (Path(source), data) if p is not None], progress=progress)


def export_model(model: TwoStageModel, out: str | Path, *, preset: str | None = None, temperature: float = 1.0,
                 dataset: Path | None = None, dataset_hash: str | None = None,
                 item_features: Mapping[str, np.ndarray | torch.Tensor] | None = None, onnx: bool = True,
                 overwrite: bool = False, protect: Sequence[str | Path] = (), progress: bool = True
                 ) -> dict[str, Any]:
    """Write the export folder `out` for `model` in one atomic step; returns its manifest.

    `item_features`: the dataset's item -> code (or value) tables of the model's item features, which the
    program holds to look up its candidates' (`PreparedDataset.item_features`). The program (and the ONNX
    model) are checked against the eager scorer on a batch of other shapes than the traced one before
    anything is written."""
    from darec.serve.scorer import ScorerModule

    config = model.config
    missing = [name for name in config.item_features if name not in (item_features or {})]
    if missing:
        raise ConfigError(f"cannot export this model without its dataset: it reads item feature(s) {missing}, "
                          "whose item tables the export holds; give --data (export_model(item_features=...))")
    try:
        module = ScorerModule(copy.deepcopy(model).cpu().eval(), fused=False,  # the caller's model is left as is
                              item_features=item_features)
        signature = _signature(module)
    except ConfigError as err:
        raise ConfigError(f"cannot export this model: {err}") from None
    ids = _id_files(dataset) if dataset is not None else {}
    start = time.perf_counter()
    bar = tqdm(total=3, desc="export", unit="step", disable=not progress, leave=False)
    with atomic_dir(out, replaceable=is_export_dir, overwrite=overwrite, protect=protect) as tmp:
        bar.set_postfix_str("torch.export")
        program = _export_program(module, signature)
        bar.update()
        bar.set_postfix_str("onnx")
        onnx_note = (_export_onnx(program, module, signature, tmp / ONNX_MODEL) if onnx
                     else {"exported": False, "reason": "not requested (--no-onnx)"})
        bar.update()
        bar.set_postfix_str("write")
        program.example_inputs = None  # torch would pickle them; the loader refuses any pickle
        torch.export.save(program, tmp / PROGRAM)
        # never write what load refuses
        check_program((tmp / PROGRAM).read_bytes(), path=tmp / PROGRAM, inputs=_names(signature))
        write_json(tmp / CONFIG, {
            "format_version": FORMAT_VERSION, "preset": preset, "model_config": config.to_dict(),
            "search": config.search, "n_items": config.n_items, "n_categories": config.n_categories,
            "max_len": config.max_len, "top_k": config.top_k, "min_history": _min_history(config.top_k),
            "inputs": {spec["name"]: {k: v for k, v in spec.items() if k != "name"} for spec in signature["inputs"]},
            "input_order": list(_names(signature)),
            "output": {"name": "logits", "shape": "(U, C)", "dtype": "float32"},
            "temperature": temperature,  # divide the logits by it for the run's calibrated probabilities
            "dataset": {"content_sha256": dataset_hash, "ids": bool(ids)},
            "darec_version": __version__, "torch_version": str(torch.__version__)})
        for rel, src in ids.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        manifest = {"darec_export": FORMAT_VERSION, "darec_version": __version__,
                    "files": {rel: {"sha256": _sha256(tmp / rel), "size": (tmp / rel).stat().st_size}
                              for rel in sorted(relative_files(tmp))},
                    "onnx": onnx_note}
        write_json(tmp / MANIFEST, manifest)
        bar.update()
    bar.close()
    log.info("exported %s (%s) to %s in %.1f s%s", preset or "model", config.search, out,
             time.perf_counter() - start, "" if onnx_note["exported"] else f"; no ONNX: {onnx_note['reason']}")
    return manifest


def _min_history(top_k: int) -> int:
    """The shortest history an exported program takes: the search keeps top_k positions (torch.topk and
    ONNX TopK need k <= N); shorter histories are left-padded by `ExportedModel`."""
    return top_k


def _signature(module: ScorerModule) -> dict[str, Any]:
    """What the program takes: vocabulary sizes and its inputs in positional order, each with shape and dtype,
    a feature's also with its name, kind and vocabulary (codes must lie in [0, vocabulary))."""
    base = [{"name": name, "shape": "(U, C)" if name.startswith("cand") else "(U, N)",
             "dtype": "bool" if name == "hist_mask" else "int64"} for name in INPUT_NAMES]
    features = [{"name": name, "shape": "(U,)" if f.kind == "user" else "(U, N)",
                 "dtype": "float32" if f.numeric else "int64", "feature": f.name, "kind": f.kind,
                 "vocabulary": f.vocabulary} for name, f in module.feature_inputs]
    signature = {"n_items": module.config.n_items, "n_categories": module.config.n_categories,
                 "inputs": base + features}
    check_input_names(_names(signature), error=ConfigError)
    return signature


def _names(signature: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(spec["name"] for spec in signature["inputs"])


def _export_program(module: ScorerModule, signature: Mapping[str, Any]) -> torch.export.ExportedProgram:
    """torch.export with dynamic users, history length and candidates; checked against the eager module."""
    config = module.config
    dim = torch.export.Dim
    users, candidates = dim("users", min=1), dim("candidates", min=1)
    history = dim("history", min=_min_history(config.top_k))
    axes = {"(U,)": {0: users}, "(U, N)": {0: users, 1: history}, "(U, C)": {0: users, 1: candidates}}
    shapes = [axes[spec["shape"]] for spec in signature["inputs"]]
    if len(shapes) > len(INPUT_NAMES):  # forward's *features take one nested entry
        shapes = [*shapes[:len(INPUT_NAMES)], tuple(shapes[len(INPUT_NAMES):])]
    example = _example_inputs(signature, users=2, length=config.top_k + 5, candidates=3, seed=0)
    try:
        with torch.no_grad():
            program = torch.export.export(module, example, dynamic_shapes=tuple(shapes), strict=False)
    except Exception as err:  # noqa: BLE001 -- tracing failures come in many types; each is "cannot export"
        raise ConfigError(f"torch.export cannot trace search {config.search!r}: {_first_line(err)}") from None
    probe = _probe(module, signature)
    with torch.no_grad():
        gap = _gap(program.module()(*probe), module(*probe))
    if gap > 1.0:
        raise RuntimeError(f"the exported program differs from the eager scorer by {gap:.3g} (a darec bug)")
    return program


def _export_onnx(program: torch.export.ExportedProgram, module: ScorerModule, signature: Mapping[str, Any],
                 target: Path) -> dict[str, Any]:
    """Write the ONNX form when it exports and onnxruntime matches the eager scorer; else a note why not."""
    import onnxruntime

    probe = _probe(module, signature)
    names = _names(signature)
    try:
        with _quiet_onnx_exporter():
            onnx_program = torch.onnx.export(program, program.example_inputs[0], dynamo=True, verbose=False)
        for value, name in zip(onnx_program.model.graph.inputs, names, strict=True):
            value.name = name  # the program's names for its trailing feature inputs are features, features_1, ...
        onnx_program.save(target, external_data=False)
        session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        got = session.run(None, {name: t.numpy() for name, t in zip(names, probe, strict=True)})[0]
    except Exception as err:  # noqa: BLE001 -- any exporter failure is a note in the manifest, not a failed export
        target.unlink(missing_ok=True)
        return {"exported": False, "reason": f"ONNX export failed: {_first_line(err)}"}
    with torch.no_grad():
        gap = _gap(torch.from_numpy(got), module(*probe))
    if gap > 1.0:
        target.unlink()
        return {"exported": False, "reason": f"onnxruntime's logits differ from the eager scorer's by {gap:.3g} "
                                             f"times the tolerance {PARITY_ATOL:g} on the check batch"}
    return {"exported": True, "opset": _onnx_opset(target)}


@contextlib.contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """Silence what torch's ONNX exporter says about itself (missing torchvision ops, optimisation passes,
    its own deprecations): none of it concerns the user; a failure still raises."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _onnx_opset(path: Path) -> int | None:
    import onnx

    model = onnx.load_model(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _probe(module: ScorerModule, signature: Mapping[str, Any]) -> tuple[torch.Tensor, ...]:
    """A check batch of other sizes than the traced example (so dynamic shapes are exercised)."""
    return _example_inputs(signature, users=3, length=module.config.top_k + 9, candidates=4, seed=1)


def _gap(got: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest |got - expected| in units of PARITY_ATOL * (1 + |expected|): <= 1 passes, 0 is exact."""
    return float(((got - expected).abs() / (PARITY_ATOL * (1 + expected.abs()))).max())


def _example_inputs(signature: Mapping[str, Any], *, users: int, length: int, candidates: int,
                    seed: int) -> tuple[torch.Tensor, ...]:
    """Random inputs in the signature's order; user u has a different number of real (left-padded) behaviours."""
    g = torch.Generator().manual_seed(seed)
    n_items, n_categories = signature["n_items"], signature["n_categories"]
    real = torch.linspace(length, 1, users).long()                                   # full .. one behaviour
    mask = torch.arange(length) >= (length - real).unsqueeze(1)                     # (U, N)
    items = torch.randint(0, n_items, (users, length), generator=g) * mask
    cats = torch.randint(0, n_categories, (users, length), generator=g) * mask
    positions = torch.arange(length, 0, -1).expand(users, length).contiguous()
    base = (items, cats, mask, positions, torch.randint(0, n_items, (users, candidates), generator=g),
            torch.randint(0, n_categories, (users, candidates), generator=g))
    features = []
    for spec in signature["inputs"][len(INPUT_NAMES):]:
        shape = (users,) if spec["shape"] == "(U,)" else (users, length)
        value = (torch.randn(shape, generator=g) if spec["dtype"] == "float32"
                 else torch.randint(0, spec["vocabulary"], shape, generator=g))
        features.append(value if spec["shape"] == "(U,)" else value * mask)
    return base + tuple(features)


def _run_record(source: Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint, what the run recorded: preset, dataset hash, temperature) of a run folder or checkpoint."""
    from darec.train.trainer import RUN_MARKER

    if source.is_dir():
        if not (source / RUN_MARKER).is_file():
            raise DataError(f"not a darec run folder (no {RUN_MARKER}); give a run folder or a checkpoint file",
                            path=source)
        checkpoint = next((source / name for name in ("best.pt", "checkpoint.pt") if (source / name).is_file()), None)
        if checkpoint is None:
            raise DataError("the run has no checkpoint yet (no best.pt or checkpoint.pt)", path=source)
        if checkpoint.name != "best.pt":
            log.warning("%s has no best.pt yet: exporting the latest weights (checkpoint.pt)", source)
        run_dir = source
    elif source.is_file():
        checkpoint, run_dir = source, source.parent
    else:
        raise DataError("no such run folder or checkpoint file", path=source)
    record: dict[str, Any] = {}
    if (run_dir / RUN_MARKER).is_file():
        record["preset"] = (_read_json(run_dir / RUN_MARKER).get("config") or {}).get("preset")
    if (run_dir / "result.json").is_file():
        result = _read_json(run_dir / "result.json")
        record.update({key: result[key] for key in ("dataset", "temperature") if result.get(key) is not None})
    return checkpoint, record


def _check_dataset(data: Path, model: TwoStageModel, *, recorded: str | None
                   ) -> tuple[str | None, dict[str, np.ndarray]]:
    """The dataset's content hash and item feature tables, after checking it is the one the model was trained
    on."""
    from darec.data.store import PreparedDataset

    dataset = PreparedDataset.open(data)
    for what in ("n_items", "n_categories"):
        trained, here = getattr(model.config, what), getattr(dataset, what)
        if trained != here:
            raise ConfigError(f"the model was trained with {what}={trained}, dataset {data} has {here}: "
                              "give the dataset the model was trained on")
    content = dataset.manifest.get("content_sha256")
    if recorded and content != recorded:
        raise DataError(f"not the dataset this run was trained on (content hash {str(content)[:12]}..., the run "
                        f"recorded {recorded[:12]}...)", path=data)
    return content, dict(dataset.item_features)


def _id_files(dataset: Path) -> dict[str, Path]:
    """Relative path -> file of the dataset's id maps; {} (with a warning) for a dataset prepared without them."""
    from darec.data.id_maps import ID_FILES

    files = {rel: dataset / rel for rel in ID_FILES.values()}
    present = [rel for rel, file in files.items() if file.is_file()]
    if not present:
        log.warning("%s has no id maps (prepared before they existed): the export scores internal ids only",
                    dataset)
        return {}
    if len(present) != len(files):
        raise DataError(f"incomplete id maps: {sorted(set(files) - set(present))} missing", path=dataset)
    return files


# ---------------------------------------------------------------------------------------------- reading

class ExportedModel:
    """An export folder ready to score: the inputs and outputs of `Scorer.logits` / `Scorer.score`.

    `backend` "torch" runs model.pt2, "onnxruntime" runs model.onnx; both on CPU. Users are scored in
    chunks that keep the (U, C, N) score matrix under `max_scores` floats, as the Scorer does. A model with
    side features takes them where the Scorer does: `History.features` (U, N) and `History.user_features`
    (U,) by feature name (`features`: what this export reads; others are ignored, as the Scorer does)."""

    def __init__(self, *, path: Path, config: dict[str, Any], manifest: dict[str, Any], backend: Backend,
                 inputs: list[dict[str, Any]], run: Callable[..., torch.Tensor], max_scores: int) -> None:
        self.path, self.export_config, self.manifest, self.backend = path, config, manifest, backend
        self.inputs = inputs  # the program's inputs in positional order, each with its name, shape and dtype
        self._run, self.max_scores = run, max_scores
        self.device = torch.device("cpu")  # where it runs, as `Scorer.device` says

    @functools.cached_property
    def config(self) -> "ModelConfig":
        """The model's configuration, as `Scorer.config` (what `darec serve` reads of a model). Imported on
        first use: scoring alone needs nothing of darec.models."""
        from darec.models.config import ModelConfig

        return ModelConfig.from_dict(self.export_config["model_config"])

    @property
    def min_history(self) -> int:
        return int(self.export_config["min_history"])

    @property
    def features(self) -> dict[str, dict[str, Any]]:
        """The side-feature inputs by feature name: input name, kind, shape, dtype, vocabulary."""
        return {spec["feature"]: spec for spec in self.inputs[len(INPUT_NAMES):]}

    @property
    def ids_dir(self) -> Path | None:
        """The exported dataset's id maps folder `ids/`, or None (`darec.data.id_maps.IdMaps.open(self.path)`
        reads them: IdMaps opens the folder that holds `ids/`)."""
        return self.path / "ids" if self.export_config["dataset"]["ids"] else None

    @torch.inference_mode()
    def logits(self, history: History, cand_items: torch.Tensor, cand_categories: torch.Tensor) -> torch.Tensor:
        """Main-head logits (U, C), as `Scorer.logits`."""
        cpu = torch.device("cpu")
        h = self._with_features(history).resolved(cpu).left_padded_to(self.min_history)
        items, cats = resolve_candidates(h, cand_items, cand_categories, cpu)
        self._check_ids(h, items, cats)
        (u, c), n = items.shape, h.items.shape[1]
        if u == 0 or c == 0:  # the program takes U, C >= 1
            return torch.zeros(u, c)
        features = [(h.user_features if spec["kind"] == "user" else h.features)[name].to(_DTYPES[spec["dtype"]])
                    for name, spec in self.features.items()]
        return torch.cat([self._run(h.items[rows], h.categories[rows], h.mask[rows], h.positions[rows],
                                    items[rows], cats[rows], *(t[rows] for t in features))
                          for rows in user_chunks(u, c, n, self.max_scores)])

    def score(self, history: History, cand_items: torch.Tensor, cand_categories: torch.Tensor) -> torch.Tensor:
        """Click probabilities (U, C)."""
        return torch.sigmoid(self.logits(history, cand_items, cand_categories))

    def _with_features(self, history: History) -> History:
        """`history` with only the features this export reads, after checking each is there with its shape
        (that of the history's items, or one value per user) and kind of dtype; one DataError naming it."""
        items = torch.as_tensor(history.items)
        users = items.shape[0] if items.dim() == 2 else 1
        kept: dict[str, dict[str, torch.Tensor]] = {"hist": {}, "user": {}}
        for name, spec in self.features.items():
            user = spec["kind"] == "user"
            given = history.user_features if user else history.features
            where = f"{'user' if user else 'history'} feature {name!r} (input {spec['name']})"
            if name not in given:
                raise DataError(f"this export reads {where}, which the input does not carry (History."
                                f"{'user_features' if user else 'features'}; carried: {sorted(given) or 'none'})")
            value = torch.as_tensor(given[name])
            shape = (users,) if user else items.shape
            if value.shape != shape and not (user and value.shape == () and users == 1):
                raise DataError(f"{where} must have shape {tuple(shape)}, got {tuple(value.shape)}")
            numeric = spec["dtype"] == "float32"
            if value.dtype == torch.bool or value.is_floating_point() != numeric or value.is_complex():
                raise DataError(f"{where} must be {'float values' if numeric else 'integer codes'}, got {value.dtype}")
            kept["user" if user else "hist"][name] = value
        return History(items=history.items, categories=history.categories, mask=history.mask,
                       positions=history.positions, features=kept["hist"], user_features=kept["user"])

    def _check_ids(self, h: History, items: torch.Tensor, cats: torch.Tensor) -> None:
        """Ids and codes outside the embedding tables would fail inside the program; name them here instead."""
        n_items, n_cats = self.export_config["n_items"], self.export_config["n_categories"]
        codes = [(f"{'user' if spec['kind'] == 'user' else 'history'} feature {name!r}",
                  (h.user_features if spec["kind"] == "user" else h.features)[name], spec["vocabulary"])
                 for name, spec in self.features.items() if spec["dtype"] == "int64"]
        for what, ids, size in (("history item", h.items, n_items), ("history category", h.categories, n_cats),
                                ("candidate item", items, n_items), ("candidate category", cats, n_cats), *codes):
            bad = (ids < 0) | (ids >= size)
            if bad.any():
                raise DataError(f"{what} ids must be in [0, {size}), got {ids[bad][:5].tolist()}")
        if (h.positions < 0).any():
            raise DataError("history positions must be >= 0 (1 = most recent behaviour)")


def load_exported(path: str | Path, *, backend: Backend = "torch",
                  max_scores: int = DEFAULT_MAX_SCORES) -> ExportedModel:
    """Open an export folder: every file's checksum is verified before anything is parsed or run."""
    path = Path(path)
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    manifest = _read_manifest(path)
    model_file = PROGRAM if backend == "torch" else ONNX_MODEL
    if model_file not in manifest["files"]:
        note = manifest.get("onnx") or {}
        raise DataError(f"this export has no {model_file}"
                        + (f": {note['reason']}" if backend == "onnxruntime" and note.get("reason") else ""), path=path)
    contents = _verified_files(path, manifest, keep=(CONFIG, model_file))
    config = _parse_json(contents[CONFIG], path / CONFIG)
    inputs = _read_inputs(config, path / CONFIG)
    load = _torch_program if backend == "torch" else _onnx_session
    run = load(contents[model_file], path / model_file, tuple(spec["name"] for spec in inputs))
    return ExportedModel(path=path, config=config, manifest=manifest, backend=backend, inputs=inputs, run=run,
                         max_scores=max_scores)


def _read_inputs(config: dict[str, Any], file: Path) -> list[dict[str, Any]]:
    """The program's inputs in positional order (`input_order`; the six of INPUT_NAMES in an export written
    before side features), each with its name, after checking every entry is one the exporter writes."""
    inputs, order = config.get("inputs"), config.get("input_order", list(INPUT_NAMES))
    if not (isinstance(inputs, dict) and isinstance(order, list) and sorted(map(str, order)) == sorted(inputs)
            and all(isinstance(spec, dict) for spec in inputs.values())):
        raise DataError("config.json: inputs and input_order do not name the same inputs", path=file)
    check_input_names(tuple(order), error=DataError, path=file)
    specs = [{"name": name, **inputs[name]} for name in order]
    for spec in specs[len(INPUT_NAMES):]:
        if not (spec.get("dtype") in _DTYPES and spec.get("kind") in _KINDS
                and spec.get("shape") == ("(U,)" if spec["kind"] == "user" else "(U, N)")
                and isinstance(spec.get("feature"), str) and isinstance(spec.get("vocabulary"), int)):
            raise DataError(f"malformed input {spec['name']!r} in config.json", path=file)
    return specs


def check_export(path: str | Path) -> dict[str, Any]:
    """Load an export with every backend it has and score one random batch: the backends must agree.

    Returns what was checked (backends, batch shape, largest logit difference between backends)."""
    manifest = _read_manifest(Path(path))
    backends = [b for b in BACKENDS if (PROGRAM if b == "torch" else ONNX_MODEL) in manifest["files"]]
    models = [load_exported(path, backend=backend) for backend in backends]
    config, features = models[0].export_config, models[0].features
    signature = {"n_items": config["n_items"], "n_categories": config["n_categories"], "inputs": models[0].inputs}
    inputs = _example_inputs(signature, users=2, length=config["min_history"] + 3, candidates=5, seed=2)
    values = {name: value for name, value in zip(features, inputs[len(INPUT_NAMES):], strict=True)}
    history = History(items=inputs[0], categories=inputs[1], mask=inputs[2], positions=inputs[3],
                      features={n: v for n, v in values.items() if features[n]["kind"] != "user"},
                      user_features={n: v for n, v in values.items() if features[n]["kind"] == "user"})
    logits = [model.logits(history, inputs[4], inputs[5]) for model in models]
    gap = max((_gap(other, logits[0]) for other in logits[1:]), default=0.0)
    if gap > 1.0:
        raise DataError(f"the backends disagree: logits differ by {gap:.3g} times the tolerance {PARITY_ATOL:g}",
                        path=path)
    return {"backends": backends, "shape": list(logits[0].shape), "gap": gap, "onnx": manifest.get("onnx")}


def is_export_dir(path: Path) -> bool:
    """True when `path` holds an export manifest and nothing but the files it lists (so darec may replace it)."""
    try:
        manifest = _read_manifest(path)
    except DataError:
        return False
    return relative_files(path) <= {*manifest["files"], MANIFEST}


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise DataError(f"not a darec export (no {MANIFEST}); create one with `darec export`", path=path)
    manifest = _parse_json(file.read_bytes(), file)
    if not (isinstance(manifest.get("darec_export"), int) and isinstance(manifest.get("files"), dict)):
        raise DataError("not a darec export manifest (no darec_export / files)", path=file)
    if manifest["darec_export"] != FORMAT_VERSION:
        raise DataError(f"export format {manifest['darec_export']} is not {FORMAT_VERSION}; re-export with this "
                        "darec", path=file)
    return manifest


def _verified_files(root: Path, manifest: dict[str, Any], *, keep: Sequence[str]) -> dict[str, bytes]:
    """Check size and sha256 of every listed file; returns the bytes of those in `keep`, read once (the
    bytes that were hashed are the bytes that get parsed)."""
    kept = {}
    for rel, entry in manifest["files"].items():
        file = _inside(root, rel)
        if not isinstance(entry, dict):
            raise DataError(f"malformed manifest entry for {rel}", path=root / MANIFEST)
        if not file.is_file() or file.is_symlink():
            raise DataError(f"missing file: {rel} (or not a regular file)", path=root)
        if file.stat().st_size != entry.get("size"):
            raise DataError(f"checksum mismatch: {rel} (size {file.stat().st_size}, manifest {entry.get('size')})",
                            path=file)
        if rel in keep:
            kept[rel] = file.read_bytes()
            digest = hashlib.sha256(kept[rel]).hexdigest()
        else:
            digest = _sha256(file)
        if digest != entry.get("sha256"):
            raise DataError(f"checksum mismatch: {rel}", path=file)
    missing = [rel for rel in keep if rel not in kept]
    if missing:
        raise DataError(f"the export lists no {missing[0]}", path=root)
    return kept


def _inside(root: Path, rel: str) -> Path:
    """`root / rel` for a manifest entry that names a file under `root` (no absolute path, no '..')."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or ".." in parts or "\\" in rel:
        raise DataError(f"manifest names a file outside the export: {rel!r}", path=root / MANIFEST)
    return root.joinpath(*parts)


def _torch_program(data: bytes, file: Path, inputs: tuple[str, ...]) -> Callable[..., torch.Tensor]:
    check_program(data, path=file, inputs=inputs)
    try:
        module = torch.export.load(io.BytesIO(data)).module()
    except Exception as err:  # noqa: BLE001 -- bytes that passed the check but that torch cannot read: damaged
        raise DataError(f"unreadable exported program: {_first_line(err)}", path=file) from None
    # ExportedModel.logits hands over resolved (U, N) / (U, C) tensors with N >= min_history and U, C >= 1:
    # torch's per-call re-check of that (sympy, about 1 ms a call) is switched off.
    module.validate_inputs = False
    return module


def _onnx_session(data: bytes, file: Path, inputs: tuple[str, ...]) -> Callable[..., torch.Tensor]:
    """An onnxruntime session on the verified bytes; tensors stored outside the file are refused (they
    would be read from paths the model names)."""
    import onnx
    import onnxruntime

    try:
        model = onnx.load_model_from_string(data)
    except Exception as err:  # noqa: BLE001 -- protobuf decode errors have no common type
        raise DataError(f"unreadable ONNX model: {_first_line(err)}", path=file) from None
    if _has_external_data(model):
        raise DataError("refused to load the ONNX model: it reads tensors from external files", path=file)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # one CPU thread setting for the process, torch's
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    names = tuple(i.name for i in session.get_inputs())
    if names != inputs:
        raise DataError(f"the ONNX model's inputs are {list(names)}, expected {list(inputs)}", path=file)

    def run(*tensors: torch.Tensor) -> torch.Tensor:
        feed = {name: t.numpy() for name, t in zip(inputs, tensors, strict=True)}
        return torch.from_numpy(session.run(None, feed)[0])

    return run


def _has_external_data(model: Any) -> bool:
    """Whether any tensor of the model (initializers, attributes, subgraphs, functions) is stored outside it."""
    import onnx

    def tensors(nodes: Any) -> list[Any]:
        found = []
        for node in nodes:
            for attr in node.attribute:
                found += ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
                for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    found += graph_tensors(graph)
        return found

    def graph_tensors(graph: Any) -> list[Any]:
        return [*graph.initializer, *(s.values for s in graph.sparse_initializer), *tensors(graph.node)]

    everything = graph_tensors(model.graph) + [t for f in model.functions for t in tensors(f.node)]
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in everything)


# ---------------------------------------------------------------------------------------------- helpers

def _parse_json(data: bytes, file: Path) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as err:
        raise DataError(f"unreadable JSON: {err}", path=file) from None
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {type(value).__name__}", path=file)
    return value


def _read_json(file: Path) -> dict[str, Any]:
    return _parse_json(file.read_bytes(), file)


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(err: BaseException) -> str:
    text = _ANSI.sub("", str(err)).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__
