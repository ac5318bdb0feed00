"""What darec lets `torch.export.load` read: the only `.pt2` archives it deserializes are ones shaped like
its own exports.

Why a check at all: in torch 2.13, `torch.export.load` is not safe on a file from elsewhere. It unpickles
(`torch.load(weights_only=False)`, `pickle.loads`) weights and constants flagged `use_pickle`, custom and
opaque objects, and sample inputs that fail a weights-only load; it `sympify`s the symbolic-shape strings
(sympy evaluates them as Python); it `exec`s the guard strings when the program becomes a module; it
imports the module named by an enum in the input spec; and a graph node may name any `torch.*` attribute
as the function it calls. A checksum list cannot help against a forged artifact (its author rewrites the
list too), so `check_program` reads the archive itself, from the very bytes torch is then given, and
accepts only what darec's exporter writes:

* the archive entries of one program: raw tensor payloads and JSON, no pickled, custom or opaque object,
  no compiled (AOTInductor) code, no extra files, no tensor constants; empty sample inputs (darec exports
  none);
* graph calls to an allow-list of ATen tensor operators and shape arithmetic;
* symbolic-shape and guard strings of a fixed grammar (sizes, integers, arithmetic, comparisons, min/max);
* the input spec of `ScorerModule.forward` (its six tensors, then one per side feature: `inputs`, the names
  config.json lists, themselves checked by `check_input_names`) and its single-tensor output spec;
* every other string only under a field known to be stored as data (names, stack traces, versions).

Anything else is refused with one `DataError` line; darec's own exports are checked by this same function
before they are written, so a torch upgrade that changes the format fails at export, not at load.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from darec.errors import DataError

__all__ = ["check_program", "check_input_names", "ALLOWED_ATEN_OPS", "INPUT_NAMES"]

# The inputs of every exported scorer; a model with side features has one more per feature after them.
INPUT_NAMES = ("hist_items", "hist_categories", "hist_mask", "hist_positions", "cand_items", "cand_categories")
_FEATURE_INPUT = re.compile(r"(?!.*__)(?:hist|user)_[A-Za-z_]\w{0,99}")  # hist_NAME (U, N), user_NAME (U,)

# ATen operators an exported darec scorer may call: tensor arithmetic, indexing and shape ops only (no
# file, storage or process access). `darec export` refuses a program calling anything else.
ALLOWED_ATEN_OPS = frozenset({
    "_assert_scalar", "_assert_tensor_metadata", "abs", "add", "addmm", "alias", "all", "amax", "amin", "any",
    "arange", "argmax", "argmin", "argsort", "baddbmm", "batch_norm", "bitwise_and", "bitwise_left_shift",
    "bitwise_not", "bitwise_or", "bitwise_right_shift", "bitwise_xor", "bmm", "cat", "ceil", "chunk", "clamp",
    "clamp_max", "clamp_min", "clone", "contiguous", "cos", "cumsum", "detach", "div", "dropout", "einsum", "elu",
    "embedding", "embedding_bag", "eq", "erf", "exp", "expand", "expand_as", "flatten", "flip", "floor",
    "floor_divide", "fmod", "full", "full_like", "gather", "ge", "gelu", "group_norm", "gt", "hardtanh", "index",
    "index_select", "isinf", "isnan", "layer_norm", "le", "leaky_relu", "linalg_vector_norm", "linear", "log",
    "log1p", "log_softmax", "logical_and", "logical_not", "logical_or", "logsumexp", "lt", "masked_fill",
    "matmul", "max", "maximum", "mean", "min", "minimum", "mm", "mul", "nan_to_num", "narrow", "ne", "neg",
    "new_ones", "new_zeros", "norm", "ones", "ones_like", "permute", "pow", "prelu", "reciprocal", "relu",
    "remainder", "repeat", "repeat_interleave", "reshape", "round", "rsqrt", "rsub", "scatter", "scatter_",
    "scatter_add", "select", "sigmoid", "sign", "silu", "sin", "slice", "softmax", "softplus", "sort", "split",
    "split_with_sizes", "sqrt", "square", "squeeze", "stack", "sub", "sum", "sym_constrain_range_for_size",
    "sym_size", "t", "tanh", "to", "topk", "transpose", "tril", "triu", "unbind", "unflatten", "unsqueeze",
    "view", "where", "zeros", "zeros_like",
})
_ALLOWED_CALLS = frozenset({f"_operator.{name}" for name in (
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "eq", "ne", "lt", "le", "gt",
    "ge", "and_", "or_")} | {"torch.sym_min", "torch.sym_max", "torch.sym_not", "torch.sym_float", "torch.sym_int"})
_ATEN_CALL = re.compile(r"torch\.ops\.aten\.(\w+)\.(\w+)")

# Archive entries of one program named `model`, under the archive's single top-level folder.
_ENTRY = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id"
                    r"|models/model\.json|data/sample_inputs/model\.pt|data/weights/model_weights_config\.json"
                    r"|data/weights/weight_\d+|data/constants/model_constants_config\.json")
_WEIGHT_FILE = re.compile(r"weight_\d+")

# Grammar of sympy's srepr strings (`expr_str`): constructors, assumption keywords, symbol names, integers.
_SYMPY_WORDS = frozenset({
    "Symbol", "Integer", "Add", "Mul", "Min", "Max", "Pow", "Mod", "FloorDiv", "PythonMod", "CeilToInt",
    "FloorToInt", "CleanDiv", "CeilDiv", "TruncToInt", "IntTrueDiv", "Identity", "positive", "nonnegative",
    "negative", "integer", "real", "finite", "True", "False"})
_SYMPY_TOKEN = re.compile(r"\s*(?:(?P<word>[A-Za-z_]\w*)|'s\d{1,6}'|-?\d{1,19}|[(),=])")
# Grammar of guard code: input sizes, integers, arithmetic, comparisons, min/max, and/or/not. Feature inputs
# (forward's *features) are named L['features'][i].
_GUARD_TOKEN = re.compile(r"\s*(?:L\['(?P<input>\w+)'\](?P<index>\[\d{1,4}\])?\.size\(\)\[\d\]|\d{1,19}"
                          r"|(?:min|max|and|or|not)\b"
                          r"|==|!=|<=|>=|//|[-+*%<>(),])")
_NAME = re.compile(r"(?!.*__)[A-Za-z_][\w.]*")   # identifiers and dotted paths, never a dunder
_SYMBOL = re.compile(r"s\d{1,6}")                 # backed size symbols (darec programs have no data-dependent size)
_FREE_TEXT = frozenset({"stack_trace", "nn_module_stack", "torch_fn"})  # metadata torch stores, never evaluates
_NAME_FIELDS = frozenset({"name", "as_name", "parameter_name", "buffer_name", "forward_arg_names", "fqn"})
_STRING_RULES = {
    "as_string": re.compile(r"[\w,.\-> ]*"),       # operator string arguments (einsum equations)
    "as_float": re.compile(r"-?Infinity|NaN"),
    "type": re.compile(r"cpu|cuda|meta"),          # device types
    "verifiers": re.compile(r"[A-Z_]+"),
    "torch_version": re.compile(r"[\w.+\-]+"),
}


def check_input_names(names: tuple[str, ...], *, error: type[Exception] = DataError, path: Path | None = None
                      ) -> None:
    """`error` unless `names` are INPUT_NAMES then distinct `hist_NAME` / `user_NAME` identifiers: names
    guard strings may mention and ONNX inputs may carry (a feature name that is not an identifier cannot
    be an input name)."""
    features = names[len(INPUT_NAMES):]
    bad = next((name for name in features if not (isinstance(name, str) and _FEATURE_INPUT.fullmatch(name))), None)
    if names[:len(INPUT_NAMES)] != INPUT_NAMES or bad is not None or len(set(names)) != len(names):
        reason = (f"input {bad!r} is not hist_NAME or user_NAME with NAME an identifier" if bad is not None
                  else f"inputs must be {list(INPUT_NAMES)} then distinct feature inputs, got {list(names)}")
        raise error(reason) if path is None else error(reason, path=path)


def check_program(data: bytes, *, path: Path, inputs: tuple[str, ...] = INPUT_NAMES) -> None:
    """DataError unless `data` (a .pt2 archive) holds only what darec's exporter writes (see module doc) for a
    program with `inputs` (positional, as `check_input_names` accepts them)."""
    check_input_names(inputs, path=path)
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise DataError(f"not a torch.export program archive: {err}", path=path) from None
    entries = _entries(names, path)
    _check_weights(_json(archive, entries["data/weights/model_weights_config.json"], path), entries, path)
    if _json(archive, entries["data/constants/model_constants_config.json"], path) != {"config": {}}:
        _refuse("the program carries constants (darec's exports hold only weights)", path)
    if archive.getinfo(entries["data/sample_inputs/model.pt"]).file_size != 0:
        _refuse("the program carries pickled sample inputs (darec's exports hold none)", path)
    _check_graph(_json(archive, entries["models/model.json"], path), inputs, path)


def _refuse(reason: str, path: Path) -> None:
    raise DataError(f"refused to load the exported program: {reason}", path=path)


def _entries(names: list[str], path: Path) -> dict[str, str]:
    """Relative entry name -> archive name, after checking the layout (one folder, known entries, no repeats)."""
    if len(set(names)) != len(names):
        _refuse("the archive repeats an entry", path)
    roots = {name.split("/", 1)[0] for name in names}
    if len(roots) != 1 or any("/" not in name for name in names):
        _refuse("expected one top-level folder in the archive", path)
    root = roots.pop() + "/"
    entries = {name[len(root):]: name for name in names}
    unknown = sorted(rel for rel in entries if not _ENTRY.fullmatch(rel))
    if unknown:
        _refuse(f"unexpected archive entry {unknown[0]!r} (only weights and the graph's JSON are allowed)", path)
    missing = [rel for rel in ("models/model.json", "data/weights/model_weights_config.json",
                               "data/constants/model_constants_config.json", "data/sample_inputs/model.pt")
               if rel not in entries]
    if missing:
        _refuse(f"archive entry {missing[0]!r} is missing", path)
    return entries


def _json(archive: zipfile.ZipFile, name: str, path: Path) -> Any:
    try:
        return json.loads(archive.read(name))
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise DataError(f"unreadable archive entry {name!r}: {err}", path=path) from None


def _check_weights(config: Any, entries: dict[str, str], path: Path) -> None:
    """Every weight is a raw tensor payload stored in the archive: none is pickled."""
    weights = config.get("config") if isinstance(config, dict) else None
    if not isinstance(weights, dict):
        _refuse("malformed weights config", path)
    for fqn, meta in weights.items():
        if not (isinstance(meta, dict) and meta.get("use_pickle") is False
                and _WEIGHT_FILE.fullmatch(str(meta.get("path_name")))
                and f"data/weights/{meta['path_name']}" in entries and _NAME.fullmatch(fqn)):
            _refuse(f"weight {fqn!r} is not a raw tensor payload of the archive (pickled or missing)", path)


def _check_graph(program: Any, inputs: tuple[str, ...], path: Path) -> None:
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        _refuse("malformed program JSON", path)
    for key in program.get("range_constraints") or {}:
        if not _SYMBOL.fullmatch(key):
            _refuse(f"unexpected size symbol {key!r}", path)
    if (program["graph_module"].get("graph") or {}).get("custom_obj_values"):
        _refuse("the program holds custom objects", path)
    in_spec, out_spec = _expected_specs(len(inputs))
    guard_inputs = (*INPUT_NAMES, *(f"features[{i}]" for i in range(len(inputs) - len(INPUT_NAMES))))
    for key, value in _strings(program):
        if key == "target":
            if not (value in _ALLOWED_CALLS or ((m := _ATEN_CALL.fullmatch(value)) and m[1] in ALLOWED_ATEN_OPS)):
                _refuse(f"the graph calls {value!r}, which is not on darec's allow-list of tensor operators", path)
        elif key == "expr_str":
            _check_tokens(value, _SYMPY_TOKEN, "symbolic size", path)
        elif key == "guards_code":
            _check_tokens(value, _GUARD_TOKEN, "guard", path, guard_inputs)
        elif key in ("in_spec", "out_spec"):
            if value != (in_spec if key == "in_spec" else out_spec):
                _refuse(f"unexpected {key} (not the scorer's {len(inputs)} tensors in, one tensor out)", path)
        elif key in _NAME_FIELDS:
            if value and not _NAME.fullmatch(value):
                _refuse(f"unexpected {key} {value[:60]!r}", path)
        elif key not in _FREE_TEXT and not (key in _STRING_RULES and _STRING_RULES[key].fullmatch(value)):
            _refuse(f"unexpected string in field {key!r}: {value[:60]!r}", path)


def _strings(obj: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(field, value) of every string in a JSON document, dictionary keys included (as field '<key>')."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield "name", k
            yield from _strings(v, k)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v, key)
    elif isinstance(obj, str):
        yield key, obj


def _check_tokens(text: str, token: re.Pattern, what: str, path: Path, inputs: tuple[str, ...] = ()) -> None:
    """`text` must be a sequence of `token`s whose words and input names are the allowed ones."""
    pos = 0
    while pos < len(text.rstrip()):
        match = token.match(text, pos)
        word = match and match.groupdict().get("word")
        name = match and match.groupdict().get("input")
        name = name and name + (match["index"] or "")
        if not match or match.end() == pos or (word and word not in _SYMPY_WORDS) or (name and name not in inputs):
            _refuse(f"unexpected {what} expression {text[:80]!r}", path)
        pos = match.end()


def _expected_specs(n_inputs: int) -> tuple[str, str]:
    """The pytree specs torch writes for `ScorerModule.forward(*n_inputs tensors) -> tensor`."""
    from torch.utils import _pytree as pytree

    return (pytree.treespec_dumps(pytree.tree_structure((tuple(range(n_inputs)), {}))),
            pytree.treespec_dumps(pytree.tree_structure(0)))
