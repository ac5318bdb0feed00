"""One explicit training loop: forward -> loss -> backward -> step -> validate -> checkpoint.

The run directory holds `checkpoint.pt` (everything needed to resume exactly: model, optimizer,
step, position in the epoch, best-so-far, curve, RNG state), `best.pt` (best validation weights),
`curve.csv` and `result.json`. All are written atomically.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from darec.data.loader import BatchLoader
from darec.data.store import PreparedDataset
from darec.errors import ConfigError
from darec.io import atomic_file, write_json, write_text
from darec.models import TwoStageModel, build_model, preset_config
from darec.models.config import ModelConfig
from darec.train.config import TrainConfig
from darec.train.metrics import evaluate_predictions

__all__ = ["train", "train_step", "evaluate", "predict", "model_config_for", "resolve_device", "Optimizers",
           "RowSparseAdam", "regularised_weights"]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def model_config_for(dataset: PreparedDataset, config: TrainConfig) -> ModelConfig:
    max_len = config.max_len or dataset.max_len
    return preset_config(config.preset, n_items=dataset.n_items, n_categories=dataset.n_categories,
                         **{"max_len": max_len, **config.model})


class RowSparseAdam(torch.optim.Optimizer):
    """`torch.optim.SparseAdam`'s update (moments and weights change only on the rows a batch touched),
    computed on a dense (rows, d) block: one `unique` + `index_add_` per table instead of sparse-tensor
    arithmetic. Same numbers; measured ~2x faster per step on CPU (docs/performance.md)."""

    def __init__(self, params: list[torch.nn.Parameter], *, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if not param.grad.is_sparse:
                    raise ConfigError("RowSparseAdam needs sparse gradients (nn.Embedding(sparse=True))")
                state = self.state[param]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
                state["step"] += 1
                grad = param.grad
                rows, inverse = torch.unique(grad._indices()[0], return_inverse=True)       # (R,), (nnz,)
                g = grad._values().new_zeros(len(rows), param.shape[1]).index_add_(0, inverse, grad._values())
                m = state["exp_avg"].index_select(0, rows)                                 # (R, d)
                v = state["exp_avg_sq"].index_select(0, rows)                              # (R, d)
                m.add_((g - m).mul_(1 - beta1))
                v.add_((g * g - v).mul_(1 - beta2))
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                param.index_add_(0, rows, m.div_(v.sqrt_().add_(group["eps"])).mul_(-step_size))


class Optimizers:
    """Adam over everything, or (sparse_optimizer) row-sparse Adam over embedding rows touched by the
    batch plus Adam over the rest: far less memory traffic when the vocabulary is large."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, device: torch.device) -> None:
        fused = device.type == "cuda"
        if config.sparse_optimizer:
            embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
            for module in embeddings:
                module.sparse = True
            sparse_ids = {id(m.weight) for m in embeddings}
            dense = [p for p in model.parameters() if id(p) not in sparse_ids]
            self.all = [torch.optim.Adam(dense, lr=config.lr, fused=fused),
                        RowSparseAdam([m.weight for m in embeddings], lr=config.lr)]
        else:
            self.all = [torch.optim.Adam(model.parameters(), lr=config.lr, fused=fused)]

    def zero_grad(self) -> None:
        for opt in self.all:
            opt.zero_grad(set_to_none=True)

    def step(self) -> None:
        for opt in self.all:
            opt.step()

    def state_dict(self) -> list[dict[str, Any]]:
        return [opt.state_dict() for opt in self.all]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for opt, state in zip(self.all, states, strict=True):
            opt.load_state_dict(state)


def regularised_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The reference regularises every weight except biases and embedding tables."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return [p for name, p in model.named_parameters() if "bias" not in name and id(p) not in embedding_ids]


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict(model: TwoStageModel, loader: BatchLoader, *, device: torch.device,
            precision: str = "fp32") -> dict[str, np.ndarray]:
    """Main-head logits of a whole split in evaluation mode (BatchNorm uses running statistics)."""
    was_training = model.training
    model.eval()
    logits, labels, users, cats = [], [], [], []
    for batch in loader.batches(0):
        batch = batch.to(device, non_blocking=True)
        with _autocast(device, precision):
            out = model(batch)
        logits.append(out.logit.float())
        labels.append(batch.label)
        users.append(batch.user)
        cats.append(batch.target_category)
    model.train(was_training)
    cat = lambda xs: torch.cat(xs).cpu().numpy()  # noqa: E731
    return {"logits": cat(logits), "labels": cat(labels), "users": cat(users), "categories": cat(cats)}


def evaluate(model: TwoStageModel, loader: BatchLoader, *, device: torch.device,
             precision: str = "fp32") -> dict[str, float]:
    p = predict(model, loader, device=device, precision=precision)
    return evaluate_predictions(labels=p["labels"], logits=p["logits"], users=p["users"],
                                categories=p["categories"])


def train_step(forward: torch.nn.Module, batch: Any, *, optimizers: Optimizers, config: TrainConfig,
               l2_weights: list[torch.nn.Parameter], device: torch.device) -> torch.Tensor:
    """One optimisation step (forward, main + aux + L2 loss, backward, update); returns the detached loss.

    Shared by `train` and benchmarks/train_throughput.py, so the benchmark measures this exact path."""
    with _autocast(device, config.precision):
        out = forward(batch)
        loss = F.binary_cross_entropy_with_logits(out.logit.float(), batch.label)
        if out.aux_logit is not None:
            loss = loss + config.aux_weight * F.binary_cross_entropy_with_logits(
                out.aux_logit.float(), batch.label)
        if config.l2 > 0:
            loss = loss + config.l2 * torch.stack([w.pow(2).sum() for w in l2_weights]).sum()
    optimizers.zero_grad()
    loss.backward()
    optimizers.step()
    return loss.detach()


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save(path: Path, obj: Any) -> None:
    with atomic_file(path, "wb") as handle:
        torch.save(obj, handle)


def _steps(loader: BatchLoader, epochs: int, start_epoch: int, start_batch: int) -> Iterator[tuple[int, int, Any]]:
    for epoch in range(start_epoch, epochs):
        for i, batch in enumerate(loader.batches(epoch, start=start_batch if epoch == start_epoch else 0)):
            yield epoch, (start_batch if epoch == start_epoch else 0) + i, batch


def train(*, data: PreparedDataset | str | Path, config: TrainConfig, out_dir: str | Path,
          resume: bool = True, max_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one configuration, validate every `eval_every` steps, test the best checkpoint.

    `max_steps` stops early after saving a checkpoint (an interruption that `resume` picks up).
    Returns the result dict also written to `out_dir/result.json` (None-free only when finished).
    """
    dataset = data if isinstance(data, PreparedDataset) else PreparedDataset.open(data)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    model_config = model_config_for(dataset, config)
    max_len = model_config.max_len

    # CPU embedding backward accumulates in a thread-dependent order unless asked not to; on CUDA
    # some kernels have no deterministic variant, hence warn_only.
    torch.use_deterministic_algorithms(config.deterministic, warn_only=True)
    torch.manual_seed(config.seed)
    model = build_model(model_config).to(device)
    optimizers = Optimizers(model, config, device)
    forward = torch.compile(model) if config.compile else model
    l2_weights = regularised_weights(model)
    train_loader = BatchLoader(dataset, "train", batch_size=config.batch_size, shuffle=True,
                               seed=config.seed, max_len=max_len, device=device)
    val_loader = BatchLoader(dataset, "val", batch_size=config.eval_batch_size, shuffle=False,
                             seed=0, max_len=max_len, device=device)
    steps_per_epoch = len(train_loader)
    eval_every = config.eval_every or max(1, steps_per_epoch // 4)
    total_steps = steps_per_epoch * config.epochs

    state = {"step": 0, "epoch": 0, "batch": 0, "best_auc": -1.0, "best_step": 0, "curve": [],
             "train_time": 0.0, "samples": 0}
    ckpt_path = out_dir / "checkpoint.pt"
    if resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        if ckpt["config"] != config.to_dict():
            raise ConfigError(f"{ckpt_path} was written by another configuration; use a new --out "
                              "or --no-resume")
        model.load_state_dict(ckpt["model"])
        optimizers.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        _set_rng_state(ckpt["rng"])
        log.info("resumed %s at step %d", out_dir, state["step"])

    def checkpoint() -> None:
        _save(ckpt_path, {"config": config.to_dict(), "model_config": model_config.to_dict(),
                          "model": model.state_dict(), "optimizer": optimizers.state_dict(),
                          "state": state, "rng": _rng_state()})

    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], disable=not progress, leave=False,
               desc=f"{config.preset} d={model_config.dim} seed={config.seed}", unit="step")
    stopped_early = False
    try:
        window_loss, window_n, tick = 0.0, 0, time.perf_counter()
        for epoch, index, batch in _steps(train_loader, config.epochs, state["epoch"], state["batch"]):
            loss = train_step(forward, batch, optimizers=optimizers, config=config, l2_weights=l2_weights,
                              device=device)
            window_loss = window_loss + loss  # stays on the device: no sync per step
            window_n += 1
            state.update(step=state["step"] + 1, samples=state["samples"] + len(batch))
            state["epoch"], state["batch"] = (epoch, index + 1) if index + 1 < steps_per_epoch else (epoch + 1, 0)
            bar.update(1)
            if state["step"] % eval_every == 0 or state["step"] == total_steps:
                state["train_time"] += time.perf_counter() - tick
                metrics = evaluate(model, val_loader, device=device, precision=config.precision)
                point = {"step": state["step"], "epoch": epoch,
                         "train_loss": float(window_loss) / max(window_n, 1),
                         **{f"val_{k}": v for k, v in metrics.items() if k != "n"}}
                state["curve"].append(point)
                window_loss, window_n = 0.0, 0
                if metrics["auc"] > state["best_auc"]:
                    state["best_auc"], state["best_step"] = metrics["auc"], state["step"]
                    _save(out_dir / "best.pt", {"model_config": model_config.to_dict(),
                                                "model": model.state_dict(), "step": state["step"]})
                bar.set_postfix(val_auc=f"{metrics['auc']:.4f}")
                checkpoint()
                tick = time.perf_counter()
            if max_steps is not None and state["step"] >= max_steps and state["step"] < total_steps:
                state["train_time"] += time.perf_counter() - tick
                checkpoint()
                stopped_early = True
                break
    except KeyboardInterrupt:
        checkpoint()
        raise
    finally:
        bar.close()
    _write_curve(out_dir / "curve.csv", state["curve"])
    if stopped_early:
        return {"finished": False, "step": state["step"]}

    best = torch.load(out_dir / "best.pt", map_location=device, weights_only=False)
    model.load_state_dict(best["model"])
    test_loader = BatchLoader(dataset, "test", batch_size=config.eval_batch_size, shuffle=False,
                              seed=0, max_len=max_len, device=device)
    test = evaluate(model, test_loader, device=device, precision=config.precision)
    val_best = next(p for p in state["curve"] if p["step"] == state["best_step"])
    result = {
        "finished": True, "config": config.to_dict(), "model_config": model_config.to_dict(),
        "dataset": dataset.manifest.get("content_sha256"), "device": str(device),
        "best_step": state["best_step"], "steps": state["step"],
        "val": {k[4:]: v for k, v in val_best.items() if k.startswith("val_")},
        "test": test, "curve": state["curve"],
        "train_seconds": state["train_time"],
        "train_samples_per_s": state["samples"] / max(state["train_time"], 1e-9),
    }
    write_json(out_dir / "result.json", result)
    log.info("%s dim=%d seed=%d: val AUC %.4f (step %d), test AUC %.4f", config.preset, model_config.dim,
             config.seed, state["best_auc"], state["best_step"], test["auc"])
    return result


def _write_curve(path: Path, curve: list[dict[str, Any]]) -> None:
    if not curve:
        return
    keys = list(curve[0])
    lines = [",".join(keys)] + [",".join("" if p[k] is None else f"{p[k]}" for k in keys) for p in curve]
    write_text(path, "\n".join(lines) + "\n")
