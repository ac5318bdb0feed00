"""Checkpoint files without pickle's code execution: every load is `weights_only=True`.

A checkpoint may come from anywhere (a colleague, a download), so loading one must never run code.
Only torch's zip format is accepted (what `save_checkpoint` writes), so a bare pickle never reaches an
unpickler; inside the zip, `torch.load(weights_only=True)` rebuilds only tensors, containers and plain
values and refuses any other global before it is imported or called (torch >= 2.6: older versions'
weights-only loader could be escaped, CVE-2025-32434). Truncated, foreign or tampered files become one
`DataError` line naming the file, not a traceback.

Multi-process runs write a folder through torch.distributed.checkpoint (DCP) instead: each rank writes its
own shards once, and a folder loads at any world size (sharded tables are re-sharded). DCP itself unpickles
its `.metadata` file and non-tensor entries with plain pickle; darec reads the metadata with an unpickler
that constructs only DCP's own metadata records and the entries with `weights_only=True`, the same guarantee
as a `.pt` checkpoint.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from darec.errors import DarecError, DataError
from darec.io import atomic_file

if TYPE_CHECKING:
    from darec.models.two_stage import TwoStageModel

__all__ = ["save_checkpoint", "load_checkpoint", "load_model_checkpoint", "save_distributed_checkpoint",
           "load_distributed_checkpoint", "is_distributed_checkpoint", "holds_sharded_tensors"]

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


# --- torch.distributed.checkpoint folders --------------------------------------------------------------

_DCP_METADATA = ".metadata"
_INT_KEY = "__int__:"  # DCP turns every mapping key into a string; int keys (optimizer states) keep a mark
_WHOLE = "__whole__"   # a tensor-free dict/list stored as one entry: DCP would drop empty ones ({} in a config)
# What DCP's `.metadata` pickle may name: its own records, torch's dtype/size/layout helpers, a path.
_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


def holds_sharded_tensors(obj: Any) -> bool:
    """Whether `obj` holds a tensor sharded over ranks (torchrec's tables), which only DCP can write."""
    return any(isinstance(v, torch.Tensor) and _is_sharded(v) for v in _flatten(obj).values())


def is_distributed_checkpoint(path: str | Path) -> bool:
    """A folder holding DCP's metadata file (what `save_distributed_checkpoint` writes)."""
    return (Path(path) / _DCP_METADATA).is_file()


def save_distributed_checkpoint(path: str | Path, obj: dict[str, Any]) -> None:
    """Write `obj` as a DCP folder at `path`, atomically; a collective when a process group is up.

    Every rank passes its own `obj`: replicated tensors (DDP) are written once, sharded ones (torchrec's
    `ShardedTensor`) by the ranks that hold them. Rank 0 writes into a temporary sibling folder and swaps it
    in after every rank has finished, so `path` always holds a whole checkpoint."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from darec.io import atomic_dir

    encoded = _encode_keys(_plain(obj, "checkpoint"))
    distributed = _process_group_up()
    rank = dist.get_rank() if distributed else 0
    with (atomic_dir(path, replaceable=is_distributed_checkpoint) if rank == 0
          else contextlib.nullcontext(None)) as tmp:
        where = [str(tmp) if tmp is not None else None]
        if distributed:
            dist.broadcast_object_list(where, src=0)
        with _quiet_single_process():
            dcp.save(encoded, storage_writer=dcp.FileSystemWriter(where[0]), no_dist=not distributed)
        if distributed:
            dist.barrier()
    if distributed:
        dist.barrier()  # nobody goes on (and possibly reads `path`) before the swap


def load_distributed_checkpoint(path: str | Path, *, live: dict[str, Any] | None = None,
                                keys: Iterable[str] = ()) -> dict[str, Any]:
    """Load a folder written by `save_distributed_checkpoint`, in one process or as a collective.

    Tensors come back whole on the CPU, except where `live` (same nesting as the checkpoint, e.g.
    `{"model": model.state_dict()}`) holds a sharded tensor: that one is filled in place with this rank's
    shards, whatever world size wrote the folder."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

    path = Path(path)
    if not is_distributed_checkpoint(path):
        raise DataError("not a distributed checkpoint folder (no .metadata)", path=path)
    reader_class, planner_class = _dcp_classes()
    reader = reader_class(path)
    try:
        metadata = reader.read_metadata()
    except Exception as err:  # noqa: BLE001 -- one untrusted file: every failure is the file's
        raise DataError(f"unreadable checkpoint metadata: {_first_line(err)}", path=path) from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.planner_data, dict):
        raise DataError("not a checkpoint written by darec (unexpected metadata)", path=path)
    sharded = {fqn: value for fqn, value in _flatten(_encode_keys(live or {})).items()
               if isinstance(value, torch.Tensor) and _is_sharded(value)}
    template: dict[str, Any] = {}
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            template[fqn] = sharded.get(fqn, torch.empty(item.size, dtype=item.properties.dtype))
        elif isinstance(item, BytesStorageMetadata):
            template[fqn] = None
    planner = planner_class()
    try:
        with _quiet_single_process():
            dcp.load(template, storage_reader=reader, planner=planner, no_dist=not _process_group_up())
    except Exception as err:  # noqa: BLE001
        raise DataError(f"unreadable distributed checkpoint (truncated, damaged or not darec's): "
                        f"{_first_line(err)}", path=path) from None
    obj: dict[str, Any] = {}
    for fqn, value in planner.loaded.items():
        _set_path(obj, tuple(metadata.planner_data.get(fqn, (fqn,))), value)
    obj = _decode_keys(obj)
    missing = [key for key in keys if key not in obj]
    if missing:
        raise DataError(f"not a darec checkpoint of this kind: lacks {missing} (has {sorted(obj)})", path=path)
    return obj


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns on every one-process save/load that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _process_group_up() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _is_sharded(tensor: torch.Tensor) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, (ShardedTensor, DTensor))


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _has_tensor(obj: Any) -> bool:
    if isinstance(obj, dict):
        return any(_has_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_has_tensor(v) for v in obj)
    return isinstance(obj, torch.Tensor)


def _encode_keys(obj: Any) -> Any:
    """What DCP stores faithfully: tensor-free containers whole (a tuple is one entry), int keys marked."""
    if isinstance(obj, (dict, list)) and not _has_tensor(obj):
        return (_WHOLE, obj)
    if isinstance(obj, dict):
        return type(obj)((f"{_INT_KEY}{k}" if type(k) is int else k, _encode_keys(v)) for k, v in obj.items())
    if type(obj) is list:
        return [_encode_keys(v) for v in obj]
    return obj


def _decode_keys(obj: Any) -> Any:
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == _WHOLE:
        return obj[1]
    if isinstance(obj, dict):
        return {int(k.removeprefix(_INT_KEY)) if isinstance(k, str) and k.startswith(_INT_KEY) else k:
                _decode_keys(v) for k, v in obj.items()}
    if type(obj) is list:
        return [_decode_keys(v) for v in obj]
    return obj


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """DCP's flat names ("model.head.0.weight", "optimizer.0.state.3.exp_avg") of every leaf."""
    if isinstance(obj, dict):
        items = obj.items()
    elif type(obj) is list:
        items = enumerate(obj)
    else:
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _set_path(root: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    """Put `value` at `path` (str: mapping key, int: list index), creating the containers on the way."""
    node: Any = root
    for key, nxt in zip(path[:-1], path[1:]):
        if isinstance(node, list):
            node.extend([None] * (key + 1 - len(node)))
            if node[key] is None:
                node[key] = [] if isinstance(nxt, int) else {}
            node = node[key]
        else:
            node = node.setdefault(key, [] if isinstance(nxt, int) else {})
    if isinstance(node, list):
        node.extend([None] * (path[-1] + 1 - len(node)))
    node[path[-1]] = value


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and nothing else: any other global is refused before it is imported."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _METADATA_GLOBALS.get(module, set())
        if name in allowed or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


@functools.cache
def _dcp_classes() -> tuple[type, type]:
    """DCP's reader and load planner made safe (defined on first use: DCP takes ~1 s to import)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(Path(self.path) / _DCP_METADATA, "rb") as handle:
                metadata = _MetadataUnpickler(handle).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        """Flat names in, flat names out (`loaded`); non-tensor entries load with `weights_only=True`."""

        def __init__(self) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

        def load_bytes(self, read_item: Any, value: Any) -> None:
            self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)

        @property
        def loaded(self) -> dict[str, Any]:
            return self.state_dict

    return SafeReader, SafeLoadPlanner
