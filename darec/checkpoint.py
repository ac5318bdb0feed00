"""Checkpoint files without pickle's code execution: every load is `weights_only=True`.

A checkpoint may come from anywhere (a colleague, a download), so loading one must never run code.
Only torch's zip format is accepted (what `save_checkpoint` writes), so a bare pickle never reaches an
unpickler; inside the zip, `torch.load(weights_only=True)` rebuilds only tensors, containers and plain
values and refuses any other global before it is imported or called (torch >= 2.6: older versions'
weights-only loader could be escaped, CVE-2025-32434). Truncated, foreign or tampered files become one
`DataError` line naming the file, not a traceback.
"""
from __future__ import annotations

import copy
import re
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from darec.errors import DarecError, DataError
from darec.io import atomic_file

if TYPE_CHECKING:
    from darec.models.two_stage import TwoStageModel

__all__ = ["save_checkpoint", "load_checkpoint", "load_model_checkpoint"]

_ZIP_MAGIC = b"PK\x03\x04"
# torch names the refused global in its message, e.g. "unsupported GLOBAL posix.system whose module ..."
_REFUSED_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")
# lines of torch's weights-only error that say nothing about this file
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def save_checkpoint(path: str | Path, obj: dict[str, Any]) -> None:
    """Atomically write `obj` (tensors, dicts, lists, tuples, numbers, strings, None) to `path`.

    What is written must load back with `weights_only=True`: subclasses of str/int/float (torch's
    `TorchVersion` is a str) are stored as their base type, and any other type is a TypeError here,
    at save time, instead of a checkpoint that refuses to resume."""
    plain = _plain(obj, "checkpoint")
    with atomic_file(path, "wb") as handle:
        torch.save(plain, handle)


def load_checkpoint(path: str | Path, *, map_location: Any = "cpu", keys: Iterable[str] = ()) -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`; refuses anything that is not plain data.

    `keys` are the entries the caller needs: a checkpoint lacking one is refused here, by name,
    rather than failing later with a KeyError."""
    path = Path(path)
    if not path.is_file():
        raise DataError("checkpoint is a directory, expected a file" if path.is_dir() else "checkpoint not found",
                        path=path)
    with path.open("rb") as handle:
        magic = handle.read(len(_ZIP_MAGIC))
    if magic != _ZIP_MAGIC:
        raise DataError("not a checkpoint written by darec (expected torch's zip format)"
                        + ("; the file is empty" if not magic else ""), path=path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 -- one call on one untrusted file: every failure is the file's
        raise _load_error(err, path) from None
    if not isinstance(obj, dict):
        raise DataError(f"not a darec checkpoint: holds a {type(obj).__name__}, expected a mapping", path=path)
    missing = [key for key in keys if key not in obj]
    if missing:
        raise DataError(f"not a darec checkpoint of this kind: lacks {missing} (has {sorted(map(str, obj))})",
                        path=path)
    return obj


def load_model_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> "TwoStageModel":
    """The model in a trainer checkpoint (`best.pt` or `checkpoint.pt`), in evaluation mode.

    A checkpoint whose config or weights do not fit together (edited, or from another darec version)
    is reported as a bad file, not as a model-building traceback."""
    from darec.models.config import ModelConfig
    from darec.models.two_stage import build_model

    ckpt = load_checkpoint(path, map_location=device, keys=("model_config", "model"))
    try:
        model = build_model(ModelConfig.from_dict(ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (DarecError, TypeError, ValueError, KeyError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"checkpoint's model does not load: {first}", path=path) from None
    return model.to(device).eval()


_LEAVES = (torch.Tensor, torch.Size, torch.device, torch.dtype)
_SCALARS = (bool, int, float, str)  # bool first: it is an int


def _plain(obj: Any, where: str) -> Any:
    """A copy of the containers of `obj` holding only types `weights_only` loads (tensors are shared)."""
    if obj is None or type(obj) in _SCALARS or isinstance(obj, _LEAVES):
        return obj
    for base in _SCALARS:
        if isinstance(obj, base):
            return base(obj)
    if type(obj) in (dict, OrderedDict):
        out = copy.copy(obj)  # keeps an OrderedDict's type and a state_dict's `_metadata`
        out.clear()
        for key, value in obj.items():
            out[_plain(key, where)] = _plain(value, f"{where}[{key!r}]")
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_plain(value, f"{where}[{i}]") for i, value in enumerate(obj))
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint holds only "
                    "tensors, dicts, lists, tuples, numbers, strings and None (what weights_only loads)")


def _load_error(err: Exception, path: Path) -> DataError:
    """One line for a failed `torch.load`: a refused global is named; anything else is a damaged file."""
    text = str(err)
    refused = _REFUSED_GLOBAL.search(text)
    if refused:
        return DataError(f"refused to load checkpoint: it asks to import or call {refused.group(1)!r}, "
                         "which a darec checkpoint never does (only tensors and plain data are loaded)", path=path)
    reasons = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith(_TORCH_BOILERPLATE)]
    reason = reasons[0].split(". ")[0] if reasons else type(err).__name__
    return DataError(f"unreadable checkpoint (truncated, damaged or not written by darec): {reason}", path=path)
