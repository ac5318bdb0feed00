"""Run configuration: preset + model overrides + optimisation settings, loadable from YAML."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from darec.errors import ConfigError, reject_unknown_keys

__all__ = ["TrainConfig", "load_run_config"]


@dataclass(frozen=True)
class TrainConfig:
    """Defaults reproduce the reference's training set-up (Adam 0.01, L2 1e-6, batch 2048, 2 epochs)."""

    preset: str = "dare"
    model: dict[str, Any] = field(default_factory=dict)   # ModelConfig overrides, e.g. {"dim": 64}
    lr: float = 0.01
    l2: float = 1e-6                  # weight * sum(w^2) over non-embedding, non-bias weights
    aux_weight: float = 1.0
    batch_size: int = 2048
    eval_batch_size: int = 4096
    epochs: int = 2
    eval_every: int | None = None     # steps between validations; None = 4 per epoch
    seed: int = 1
    max_len: int | None = None        # history length fed to the model; None = the dataset's
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    precision: str = "fp32"           # fp32 | bf16 (autocast)
    sparse_optimizer: bool = False    # row-sparse Adam on embedding tables (large vocabularies)
    compile: bool = False             # torch.compile the model
    deterministic: bool = True        # deterministic kernels: a resumed run equals an uninterrupted one

    def __post_init__(self) -> None:
        for name in ("lr", "batch_size", "eval_batch_size", "epochs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name} must be > 0, got {getattr(self, name)}")
        if self.l2 < 0 or self.aux_weight < 0:
            raise ConfigError("train.l2 and train.aux_weight must be >= 0")
        if self.eval_every is not None and self.eval_every < 1:
            raise ConfigError(f"train.eval_every must be >= 1, got {self.eval_every}")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be fp32 or bf16, got {self.precision!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> str:
        """Stable hash of everything that changes the result (cache key for `darec table`)."""
        blob = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        reject_unknown_keys(data, {f.name for f in dataclasses.fields(cls)}, section="train")
        return cls(**data)


def load_run_config(path: str | Path) -> TrainConfig:
    """Read a YAML run config: top-level train options, `preset`, and a `model:` mapping."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return TrainConfig.from_dict(data)
