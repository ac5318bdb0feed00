"""What every analysis shares: the run budget, trained (or reused) models, test-set passes, figure output.

Trained models live in `RUNS/<preset>-d<K_R>[-a<K_A>][-f<features>]-s<seed>/` (the trainer's layout: best.pt,
result.json, curve.csv; `-f` names the side features when they are not the default `all`). A finished run is
reused only when its `result.json` was written by the same training configuration, so a changed budget never
silently mixes with an old one.

Notation: B batch, L history length, E head-input width.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from darec.checkpoint import load_model_checkpoint  # noqa: E402
from darec.data.batch import Batch  # noqa: E402
from darec.data.loader import BatchLoader  # noqa: E402
from darec.data.store import PreparedDataset  # noqa: E402
from darec.errors import ConfigError, DataError  # noqa: E402
from darec.io import atomic_file, write_json  # noqa: E402
from darec.models import TwoStageModel  # noqa: E402
from darec.train.config import TrainConfig  # noqa: E402

__all__ = ["AnalysisContext", "RunHandle", "run_name", "trained_run", "load_model", "test_batches",
           "save_figure", "write_analysis", "search_scores", "history_scores", "raw_ids", "ANALYSIS_TRAIN"]

log = logging.getLogger(__name__)

# Small-scale budget (minutes on a 2-core CPU): the paper's optimiser, a smaller batch so short datasets
# still take enough steps, and validation every 10 steps so convergence curves have points to show.
ANALYSIS_TRAIN = TrainConfig(batch_size=256, eval_batch_size=4096, epochs=2, eval_every=10, lr=0.01)


@dataclass(frozen=True)
class AnalysisContext:
    """Inputs of one `darec analyze` call. `presets=None` means each analysis' own default list."""

    data_dir: Path
    out_dir: Path
    runs_dir: Path
    train: TrainConfig = ANALYSIS_TRAIN
    dim: int = 16
    presets: tuple[str, ...] | None = None
    steps: int = 100                   # gradient analysis: training steps observed
    sizes: tuple[int, ...] = (128, 64, 32, 16)
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dataset(self) -> PreparedDataset:
        return PreparedDataset.open(self.data_dir)

    @property
    def seed(self) -> int:
        return self.train.seed

    def presets_or(self, default: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(self.presets) if self.presets else default

    def kind_dir(self, kind: str) -> Path:
        path = self.out_dir / kind
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class RunHandle:
    """A finished training run: where it is and what the trainer reported."""

    preset: str
    dim: int
    attention_dim: int | None
    run_dir: Path
    result: dict[str, Any]


def run_name(preset: str, *, dim: int, attention_dim: int | None, seed: int,
             features: str | tuple[str, ...] = "all") -> str:
    """`<preset>-d<K_R>-s<seed>`, with `-a<K_A>` when the attention dim differs from K_R and `-f<features>`
    (none, or the names joined by +) when the models read other side features than `all`, so runs with
    and without features live side by side."""
    extra = "" if attention_dim in (None, dim) else f"-a{attention_dim}"
    if features != "all":
        extra += f"-f{features if isinstance(features, str) else '+'.join(features)}"
    return f"{preset}-d{dim}{extra}-s{seed}"


def trained_run(ctx: AnalysisContext, preset: str, *, dim: int | None = None,
                attention_dim: int | None = None) -> RunHandle:
    """Train `preset` with the context's budget, or reuse the finished run of the same configuration.

    Raises ConfigError when the run directory holds a finished run of another configuration."""
    from darec.train.trainer import train

    dim = ctx.dim if dim is None else dim
    attention_dim = None if attention_dim in (None, dim) else attention_dim
    model = {"dim": dim} if attention_dim is None else {"dim": dim, "attention_dim": attention_dim}
    config = ctx.train.replace(preset=preset, model=model)
    run_dir = ctx.runs_dir / run_name(preset, dim=dim, attention_dim=attention_dim, seed=config.seed,
                                      features=config.features)
    result_path = run_dir / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    if result is not None and result.get("finished"):
        if result.get("config") != json.loads(json.dumps(config.to_dict())):
            raise ConfigError(f"{run_dir} holds a run of another training configuration; pass another "
                              "--runs directory or delete it")
        log.info("reusing %s", run_dir)
    else:
        log.info("training %s into %s", preset, run_dir)
        result = train(data=ctx.data_dir, config=config, out_dir=run_dir, progress=ctx.progress)
    return RunHandle(preset=preset, dim=dim, attention_dim=attention_dim, run_dir=run_dir, result=result)


def load_model(run_dir: Path, device: str | torch.device = "cpu") -> TwoStageModel:
    """The best-validation weights of a run, in evaluation mode."""
    path = Path(run_dir) / "best.pt"
    if not path.is_file():
        raise ConfigError(f"no best.pt in {run_dir}; train the run first")
    return load_model_checkpoint(path, device=device)


def test_batches(dataset: PreparedDataset, model: TwoStageModel, *, split: str = "test",
                 batch_size: int = 1024) -> Iterator[Batch]:
    """The split in file order, with the history length and the side features the model was trained on."""
    loader = BatchLoader(dataset, split, batch_size=batch_size, shuffle=False, max_len=model.config.max_len,
                         group_sets=model.uses_candidate_sets,  # a set model (IFA) sees whole candidate sets
                         features=[f.name for f in model.config.features])
    return loader.batches(0)


@torch.no_grad()
def search_scores(model: TwoStageModel, batch: Batch) -> torch.Tensor:
    """The model's own search scores over the whole history, (B, L); padded positions hold -inf.

    Uses the scores the search reports in `Interest.scores`, so item embeddings, projections, the
    model's scaling and its position bias are all included."""
    was_training = model.training
    model.eval()
    scores = model(batch).interest.scores
    model.train(was_training)
    if scores is None:
        raise ConfigError(f"search {model.config.search!r} reports no per-position scores")
    return scores.float().masked_fill(~batch.mask, float("-inf"))                  # (B, L)


def history_scores(dataset: PreparedDataset, model: TwoStageModel, *, split: str = "test") -> np.ndarray:
    """(B, L) search scores of every sample of the split, in file order; -inf at padding."""
    return np.concatenate([search_scores(model, batch).numpy() for batch in test_batches(dataset, model, split=split)])


def raw_ids(dataset: PreparedDataset, kind: str, ids: Any) -> list | None:
    """The raw ids (as in the input log) of internal `ids`, for outputs a reader matches against the log;
    None for a dataset prepared before darec saved id maps."""
    try:
        maps = dataset.id_maps()
    except DataError:
        return None
    return maps.decode(kind, np.asarray(ids)).to_list()


def save_figure(fig: plt.Figure, path: Path, *, tight: bool = True) -> Path:
    """PNG, written atomically; the figure is closed. `tight=False` skips tight_layout (slow on big grids)."""
    if tight:
        fig.tight_layout()
    with atomic_file(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return path


def write_analysis(ctx: AnalysisContext, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    """`OUT/<kind>/<kind>.json` with the numbers, the figures' names and the budget that produced them."""
    directory = ctx.kind_dir(kind)
    figures = sorted(p.name for p in directory.glob("*.png"))
    full = {"kind": kind, "data": str(ctx.data_dir), "dataset_sha256": ctx.dataset.manifest.get("content_sha256"),
            "train": ctx.train.to_dict(), "dim": ctx.dim, "figures": figures, **payload}
    write_json(directory / f"{kind}.json", _finite(full))
    return full


def _finite(obj: Any) -> Any:
    """JSON has no NaN: undefined numbers become null."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _finite(obj.tolist())
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
