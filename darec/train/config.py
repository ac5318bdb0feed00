"""Run configuration: preset + model overrides + optimisation settings, loadable from YAML.

Validated by pydantic, so a wrong type (`lr: fast`, `batch_size: 1.5`, `model: 3`) is one line naming the
key, the value and what was expected. Every field's description doubles as its `--help` text.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from darec.errors import ConfigError

__all__ = ["TrainConfig", "load_run_config", "validation_message", "check_device_name"]

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(value: str) -> str:
    """The device names darec runs on (availability is checked when the device is resolved); the one rule
    behind every `--device` flag and the `device` option."""
    if not _DEVICE.match(value):
        raise ValueError("expected auto, cpu, mps, cuda or cuda:N")
    return value


def validation_message(err: ValidationError, *, section: str) -> str:
    """One line per bad field: `train.lr: Input should be a valid number (got 'fast')`."""
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in (section, *e["loc"]))
        got = f" (got {e['input']!r})" if e["type"] != "extra_forbidden" else ""
        msg = "unknown option" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        parts.append(f"{key}: {msg}{got}")
    return "; ".join(parts)


class TrainConfig(BaseModel):
    """Defaults: the reference's optimiser (Adam 0.01, L2 1e-6, batch 2048, 2 epochs) with early stopping
    on validation logloss, so an overconfident late checkpoint is never the one tested."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    preset: str = Field("dare", description="model preset (see `darec presets`)")
    model: dict[str, Any] = Field(default_factory=dict, description="ModelConfig overrides, e.g. {dim: 64}")
    lr: float = Field(0.01, gt=0, description="learning rate")
    l2: float = Field(1e-6, ge=0, description="weight * sum(w^2) over non-embedding, non-bias weights")
    aux_weight: float = Field(1.0, ge=0, description="weight of the auxiliary head's loss")
    ranking_loss: Literal["none", "pairwise", "listwise"] | None = Field(
        None, description="ranking term added to BCE within each candidate set (a positive and its negatives of "
                          "the same cut): pairwise -log sigmoid(s+ - s-), listwise softmax cross-entropy; null: the "
                          "preset's (listwise for the ifa presets, none otherwise)")
    ranking_weight: float = Field(1.0, ge=0, description="weight of the ranking term (when there is one)")
    batching: Literal["rows", "sets"] | None = Field(
        None, description="rows: samples shuffled one by one; sets: whole candidate sets per batch; null: sets "
                          "when the model or a ranking loss needs them, rows otherwise")
    record_logit_gradients: bool = Field(
        False, description="record the mean |d loss / d logit| of positive and negative training rows (scaled by "
                           "the batch size) in the learning curve")
    batch_size: int = Field(2048, gt=0, description="training batch size")
    eval_batch_size: int = Field(4096, gt=0, description="evaluation batch size")
    epochs: int = Field(2, gt=0, description="maximum number of epochs")
    eval_every: int | None = Field(None, ge=1, description="steps between validations (null: 4 per epoch)")
    select_metric: Literal["logloss", "auc"] = Field(
        "logloss", description="validation metric that picks the tested checkpoint and drives early stopping")
    patience: int | None = Field(4, ge=1, description="stop after this many validations without improvement "
                                                      "(null: never stop early)")
    temperature_scaling: bool = Field(False, description="fit a logit temperature on validation after training")
    lr_schedule: Literal["constant", "cosine"] = Field("constant", description="learning-rate schedule after warm-up")
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up steps")
    grad_clip: float | None = Field(None, gt=0, description="clip the global gradient norm to this value")
    seed: int = Field(1, description="initialisation and shuffling seed")
    max_len: int | None = Field(None, ge=1, description="history length fed to the model (null: the dataset's)")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="fp32, or bf16 autocast")
    sparse_optimizer: bool = Field(True, description="row-sparse Adam on embedding rows a batch touched "
                                                     "(same AUC as dense Adam, far faster on large vocabularies)")
    threads: int | None = Field(None, ge=1, description="CPU threads (null: torch's); recorded, part of the "
                                                        "run's identity: results are bit-identical per thread count")
    compile: bool = Field(False, description="torch.compile the model")
    embedding_backend: Literal["plain", "torchrec"] = Field(
        "plain", description="plain: nn.Embedding tables (row-sparse or dense Adam; what the analyses need); "
                             "torchrec: tables sharded over processes by torchrec, updated by fbgemm's fused optimiser "
                             "in backward (optional dependency, docs/scale.md)")
    embedding_optimizer: Literal["adam", "rowwise_adagrad"] = Field(
        "adam", description="fused optimiser of torchrec tables (fbgemm: adam on CUDA only, rowwise_adagrad anywhere)")
    deterministic: bool = Field(True, description="deterministic kernels: a resumed run equals an uninterrupted one")
    features: Literal["all", "none"] | tuple[str, ...] = Field(
        "all", description="side features the model reads (docs/features.md): all (every one the dataset has), none "
                           "(item and category only: the paper's model), or names, NAME,NAME on the command line")

    @field_validator("features", mode="before")
    @classmethod
    def _feature_names(cls, value: Any) -> Any:
        """`brand,shop` (the command line's form) -> ("brand", "shop"); all / none stay as they are."""
        if isinstance(value, str) and value not in ("all", "none"):
            value = value.split(",")
        if isinstance(value, (list, tuple)):
            names = tuple(str(v).strip() for v in value)
            if not names or not all(names):
                raise ValueError("expected all, none or feature names separated by commas")
            return names
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        return check_device_name(value)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise ConfigError(validation_message(err, section="train")) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def key(self) -> str:
        """Stable hash of everything in the configuration (part of `darec table`'s cache key)."""
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig(**{**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return cls(**data)


def load_run_config(path: str | Path) -> TrainConfig:
    """Read a YAML run config: top-level train options, `preset`, and a `model:` mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"config {path} is a directory, expected a YAML file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config {path}: not UTF-8 text (byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"config {path}: cannot read: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level, got {type(data).__name__}")
    try:
        return TrainConfig.from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
