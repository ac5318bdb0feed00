"""One explicit training loop: forward -> loss -> backward -> step -> validate -> checkpoint -> stop early.

The run directory holds `run.json` (configuration and environment: what marks it as darec's),
`checkpoint.pt` (everything needed to resume exactly: model, optimizer, step, position in the epoch,
best-so-far, curve, RNG state), `best.pt` (the weights of the best validation metric), `curve.csv`,
`test_logits.npy` and `result.json`. All are written atomically; checkpoints load without pickle code.
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
from scipy.optimize import minimize_scalar
from tqdm.auto import tqdm

from darec.checkpoint import load_checkpoint, save_checkpoint
from darec.data.loader import BatchLoader, feature_fields
from darec.data.store import PreparedDataset
from darec.errors import ConfigError
from darec.io import write_json, write_text
from darec.models import PRESETS, TwoStageModel, build_model, preset_config
from darec.models.config import ModelConfig
from darec.models.table import RowGradients, Table
from darec.models.torchrec_tables import fused_parameter_ids, load_plain_state_dict, plain_state_dict
from darec.train import distributed
from darec.train.allocator import keep_freed_memory
from darec.train.config import TrainConfig
from darec.train.metrics import evaluate_predictions
from darec.train.ranking import LogitGradients, RankingLoss, ranking_loss
from darec.train.row_sparse import RowSparseAdam

__all__ = ["train", "train_step", "evaluate", "predict", "model_config_for", "resolve_device", "Optimizers",
           "RowSparseAdam", "regularised_weights", "learning_rate", "fit_temperature", "environment",
           "claim_run_dir", "RUN_MARKER", "TEST_LOGITS", "ranking_of", "groups_sets", "objective"]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def model_config_for(dataset: PreparedDataset, config: TrainConfig) -> ModelConfig:
    """The preset's config for `dataset`: its vocabularies, and the side features `config.features` selects."""
    max_len = config.max_len or dataset.max_len
    features = feature_fields(dataset, config.features)
    return preset_config(config.preset, n_items=dataset.n_items, n_categories=dataset.n_categories,
                         **{"max_len": max_len, "features": features, **config.model})


class Optimizers:
    """Adam over everything, or (sparse_optimizer) row-sparse Adam over embedding rows touched by the
    batch plus Adam over the rest: far less memory traffic when the vocabulary is large."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, device: torch.device) -> None:
        fused = device.type == "cuda"
        in_backward = fused_parameter_ids(model)  # torchrec tables: fbgemm updates them inside backward
        if in_backward:
            self.all = [torch.optim.Adam([p for p in model.parameters() if id(p) not in in_backward], lr=config.lr,
                                         fused=fused), model.fused_optimizer]
        elif config.sparse_optimizer:
            embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
            # Rows go straight to the optimiser unless something reads .grad: DDP's all-reduce, clipping.
            collect = config.grad_clip is None and distributed.current().world_size == 1
            collectors = {}
            for module in embeddings:
                if collect and isinstance(module, Table):
                    module.collector = collectors[module.weight] = RowGradients()
                else:
                    module.sparse = True
            sparse_ids = {id(m.weight) for m in embeddings}
            dense = [p for p in model.parameters() if id(p) not in sparse_ids]
            self.all = [torch.optim.Adam(dense, lr=config.lr, fused=fused),
                        RowSparseAdam([m.weight for m in embeddings], lr=config.lr, collectors=collectors)]
        else:
            self.all = [torch.optim.Adam(model.parameters(), lr=config.lr, fused=fused)]

    def zero_grad(self) -> None:
        for opt in self.all:
            opt.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for opt in self.all:
            for group in opt.param_groups:
                group["lr"] = lr

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """Scale every gradient (dense, and the row-sparse ones of embeddings) so their global norm is at
        most `max_norm`; returns the norm before clipping."""
        params = [p for opt in self.all for g in opt.param_groups for p in g["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                p.grad = p.grad.coalesce()  # duplicate rows summed before the norm
        norm = torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(p.grad._values() if p.grad.is_sparse else p.grad) for p in params]))
        scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(scale)
        return float(norm)

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
    embedding_ids |= fused_parameter_ids(model)
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
    local = {"logits": cat(logits), "labels": cat(labels), "users": cat(users), "categories": cat(cats)}
    return distributed.gather_predictions(local, loader, distributed.current())  # all ranks' rows


def evaluate(model: TwoStageModel, loader: BatchLoader, *, device: torch.device,
             precision: str = "fp32") -> dict[str, float]:
    p = predict(model, loader, device=device, precision=precision)
    return evaluate_predictions(labels=p["labels"], logits=p["logits"], users=p["users"],
                                categories=p["categories"])


def ranking_of(config: TrainConfig) -> tuple[RankingLoss, float]:
    """The ranking term and its weight: the config's, or the preset's when the config says null."""
    kind = config.ranking_loss
    if kind is None:
        kind = PRESETS[config.preset].train.get("ranking_loss", "none") if config.preset in PRESETS else "none"
    return kind, (config.ranking_weight if kind != "none" else 0.0)


def groups_sets(config: TrainConfig, model: TwoStageModel) -> bool:
    """Whether training batches hold whole candidate sets (`batching`, or what the model and loss need)."""
    if config.batching is not None:
        return config.batching == "sets"
    return model.uses_candidate_sets or ranking_of(config)[1] > 0


def objective(out: Any, batch: Any, *, config: TrainConfig, l2_weights: list[torch.nn.Parameter]) -> torch.Tensor:
    """BCE of the main head + aux_weight * BCE of the aux head + the ranking term (if any) + L2."""
    loss = F.binary_cross_entropy_with_logits(out.logit.float(), batch.label)
    if out.aux_logit is not None:
        loss = loss + config.aux_weight * F.binary_cross_entropy_with_logits(
            out.aux_logit.float(), batch.label)
    kind, weight = ranking_of(config)
    if weight > 0:
        loss = loss + weight * ranking_loss(kind, out.logit.float(), batch.label, *batch.set_ids())
    if config.l2 > 0:
        loss = loss + config.l2 * torch.stack([w.pow(2).sum() for w in l2_weights]).sum()
    return loss


def train_step(forward: torch.nn.Module, batch: Any, *, optimizers: Optimizers, config: TrainConfig,
               l2_weights: list[torch.nn.Parameter], device: torch.device,
               probe: LogitGradients | None = None) -> torch.Tensor:
    """One optimisation step (forward, `objective`, backward, clip, update); returns the detached loss.
    `probe` records the gradient of the loss at the main head's logits.

    Shared by `train` and benchmarks/train_throughput.py, so the benchmark measures this exact path."""
    with _autocast(device, config.precision):
        out = forward(batch)
        if probe is not None:
            out.logit.retain_grad()
        loss = objective(out, batch, config=config, l2_weights=l2_weights)
    optimizers.zero_grad()
    loss.backward()
    if probe is not None:
        probe.add(out.logit.grad, batch.label)
    if config.grad_clip is not None:
        optimizers.clip_grad_norm(config.grad_clip)
    optimizers.step()
    return loss.detach()


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to zero at `total_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        progress = (step - config.warmup_steps) / max(total_steps - config.warmup_steps, 1)
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the logloss of logits / T (Guo et al., 2017); AUC is unchanged by it."""
    z, y = np.asarray(logits, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    nll = lambda log_t: float(np.mean(np.logaddexp(0.0, z / np.exp(log_t)) - y * z / np.exp(log_t)))  # noqa: E731
    return float(np.exp(minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded").x))


def environment(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """What besides the configuration decides a run's numbers: CPU kernels reduce in a thread-dependent
    order, so the same seed gives bit-identical results only for the same threads, torch and device."""
    env = {"threads": torch.get_num_threads(), "torch": str(torch.__version__), "device": str(device),
           "deterministic": config.deterministic}
    world_size = distributed.current().world_size
    return env if world_size == 1 else {**env, "world_size": world_size}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _steps(loader: BatchLoader, epochs: int, start_epoch: int, start_batch: int) -> Iterator[tuple[int, int, Any]]:
    for epoch in range(start_epoch, epochs):
        for i, batch in enumerate(loader.batches(epoch, start=start_batch if epoch == start_epoch else 0)):
            yield epoch, (start_batch if epoch == start_epoch else 0) + i, batch


RUN_MARKER = "run.json"        # what makes a folder a darec run folder (config and environment)
TEST_LOGITS = "test_logits.npy"  # float32 main-head logits of the test split, in split order (for tables)


def claim_run_dir(out_dir: Path, identity: dict[str, Any]) -> None:
    """Create `out_dir` or reuse it only if darec wrote it: a folder holding anything else is refused,
    so a run never overwrites a user's file that happens to be called result.json."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"run folder {out_dir} is a file; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / RUN_MARKER).is_file():
        names = sorted(p.name for p in out_dir.iterdir())[:3]
        raise ConfigError(f"run folder {out_dir} holds files darec did not write ({', '.join(names)}); "
                          "choose a new or empty --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / RUN_MARKER, identity)


class _Selection:
    """Best-so-far bookkeeping on the validation metric that picks the tested checkpoint."""

    def __init__(self, metric: str, state: dict[str, Any]) -> None:
        self.metric, self.state = metric, state
        self.sign = 1.0 if metric == "auc" else -1.0  # larger is better after the sign

    def update(self, metrics: dict[str, float], step: int) -> bool:
        """Record a validation; True when it is the new best."""
        value = self.sign * metrics[self.metric]
        if self.state["best_value"] is None or value > self.state["best_value"]:
            self.state.update(best_value=value, best_step=step, evals_since_best=0)
            return True
        self.state["evals_since_best"] += 1
        return False


def train(*, data: PreparedDataset | str | Path, config: TrainConfig, out_dir: str | Path,
          resume: bool = True, max_steps: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one configuration, validate every `eval_every` steps, stop when the validation metric has not
    improved for `patience` validations, test the best checkpoint (temperature-scaled if asked).

    `max_steps` stops after saving a checkpoint (an interruption that `resume` picks up).
    Returns the result dict also written to `out_dir/result.json` (None-free only when finished).
    """
    dataset = data if isinstance(data, PreparedDataset) else PreparedDataset.open(data)
    out_dir = Path(out_dir)
    device = resolve_device(config.device)
    cluster = distributed.setup(device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    env = environment(config, device)  # the same on every rank
    device = cluster.device(device)
    cluster.on_main(lambda: claim_run_dir(out_dir, {"darec_run": 1, "config": config.to_dict(), "environment": env}))
    model_config = model_config_for(dataset, config)
    max_len = model_config.max_len
    read = [f.name for f in model_config.features]  # the loaders gather only what the model reads

    # CPU embedding backward accumulates in a thread-dependent order unless asked not to; on CUDA
    # some kernels have no deterministic variant, hence warn_only.
    torch.use_deterministic_algorithms(config.deterministic, warn_only=True)
    torch.manual_seed(config.seed)
    keep_freed_memory()
    model = build_model(model_config).to(device)
    if config.embedding_backend == "torchrec":
        model = distributed.shard_tables(model, config, device, cluster)
    optimizers = Optimizers(model, config, device)
    forward = distributed.wrap(model, device, cluster)
    forward = torch.compile(forward) if config.compile else forward
    l2_weights = regularised_weights(model)
    train_loader = BatchLoader(dataset, "train", batch_size=config.batch_size, shuffle=True,
                               seed=config.seed, max_len=max_len, device=device,
                               group_sets=groups_sets(config, model), shard=cluster.shard, features=read)
    val_loader = BatchLoader(dataset, "val", batch_size=config.eval_batch_size, shuffle=False,
                             seed=0, max_len=max_len, device=device, group_sets=model.uses_candidate_sets,
                             shard=cluster.shard, features=read)
    probe = LogitGradients() if config.record_logit_gradients else None
    steps_per_epoch = len(train_loader)
    eval_every = config.eval_every or max(1, steps_per_epoch // 4)
    total_steps = steps_per_epoch * config.epochs

    state = {"step": 0, "epoch": 0, "batch": 0, "best_value": None, "best_step": 0, "evals_since_best": 0,
             "early_stopped": False, "curve": [], "train_time": 0.0, "samples": 0}
    saved = distributed.load_run_checkpoint(
        out_dir, map_location=device, keys=("config", "environment", "model", "optimizer", "state", "rng"),
        live={"model": model.state_dict(), "optimizer": optimizers.state_dict()}) if resume else None
    if saved is not None:
        ckpt_path, ckpt = saved
        if ckpt["config"] != config.to_dict() or not distributed.resumable(ckpt["environment"], env):
            raise ConfigError(f"{ckpt_path} was written by another configuration or environment (threads, torch, "
                              "device); use a new --out or --no-resume")
        model.load_state_dict(ckpt["model"])
        optimizers.load_state_dict(ckpt["optimizer"])
        state = ckpt["state"]
        _set_rng_state(ckpt["rng"])
        log.info("resumed %s at step %d", out_dir, state["step"])
    selection = _Selection(config.select_metric, state)

    def checkpoint() -> None:
        distributed.save_run_checkpoint(out_dir, {
            "config": config.to_dict(), "environment": env, "model_config": model_config.to_dict(),
            "model": model.state_dict(), "optimizer": optimizers.state_dict(), "state": state,
            "rng": _rng_state()}, cluster)

    model.train()
    bar = tqdm(total=total_steps, initial=state["step"], disable=not progress or not cluster.is_main, leave=False,
               desc=f"{config.preset} d={model_config.dim} seed={config.seed}", unit="step")
    interrupted = False
    try:
        window_loss, window_n, tick = 0.0, 0, time.perf_counter()
        steps = () if state["early_stopped"] else _steps(train_loader, config.epochs, state["epoch"], state["batch"])
        for epoch, index, batch in steps:
            optimizers.set_lr(learning_rate(config, state["step"], total_steps))
            loss = train_step(forward, batch, optimizers=optimizers, config=config, l2_weights=l2_weights,
                              device=device, probe=probe)
            window_loss = window_loss + loss  # stays on the device: no sync per step
            window_n += 1
            state.update(step=state["step"] + 1, samples=state["samples"] + cluster.rows(len(batch)))
            state["epoch"], state["batch"] = (epoch, index + 1) if index + 1 < steps_per_epoch else (epoch + 1, 0)
            bar.update(1)
            if state["step"] % eval_every == 0 or state["step"] == total_steps:
                state["train_time"] += time.perf_counter() - tick
                metrics = evaluate(model, val_loader, device=device, precision=config.precision)
                state["curve"].append({"step": state["step"], "epoch": epoch,
                                       "train_loss": cluster.mean(window_loss) / max(window_n, 1),
                                       **{f"val_{k}": v for k, v in metrics.items() if k != "n"},
                                       **(probe.flush() if probe is not None else {})})
                window_loss, window_n = 0.0, 0
                if selection.update(metrics, state["step"]):
                    weights = plain_state_dict(model)  # sharded tables are gathered: every rank takes part
                    if cluster.is_main:
                        save_checkpoint(out_dir / "best.pt", {"model_config": model_config.to_dict(),
                                                              "model": weights, "step": state["step"]})
                bar.set_postfix(val_auc=f"{metrics['auc']:.4f}", val_logloss=f"{metrics['logloss']:.4f}")
                state["early_stopped"] = (config.patience is not None
                                          and state["evals_since_best"] >= config.patience)
                checkpoint()
                tick = time.perf_counter()
                if state["early_stopped"]:
                    log.info("early stop at step %d: validation %s has not improved for %d validations",
                             state["step"], config.select_metric, config.patience)
                    break
            if max_steps is not None and state["step"] >= max_steps and state["step"] < total_steps:
                state["train_time"] += time.perf_counter() - tick
                checkpoint()
                interrupted = True
                break
    except KeyboardInterrupt:
        checkpoint()
        raise
    finally:
        bar.close()
    if cluster.is_main:
        _write_curve(out_dir / "curve.csv", state["curve"])
    if interrupted:
        return {"finished": False, "step": state["step"]}
    return _finish(model, dataset, config, model_config, state, env, out_dir, device)


def _finish(model: TwoStageModel, dataset: PreparedDataset, config: TrainConfig, model_config: ModelConfig,
            state: dict[str, Any], env: dict[str, Any], out_dir: Path, device: torch.device) -> dict[str, Any]:
    """Reload the best checkpoint, fit the temperature on validation if asked, test, write result.json."""
    cluster = distributed.current()
    cluster.barrier()  # best.pt is written by rank 0
    best = load_checkpoint(out_dir / "best.pt", map_location=device, keys=("model",))
    load_plain_state_dict(model, best["model"])
    loaders = {split: BatchLoader(dataset, split, batch_size=config.eval_batch_size, shuffle=False, seed=0,
                                  max_len=model_config.max_len, device=device, group_sets=model.uses_candidate_sets,
                                  shard=cluster.shard, features=[f.name for f in model_config.features])
               for split in ("val", "test")}
    preds = {split: predict(model, loader, device=device, precision=config.precision)
             for split, loader in loaders.items()}
    temperature = fit_temperature(preds["val"]["logits"], preds["val"]["labels"]) if config.temperature_scaling else 1.0
    scores = {}
    for split, p in preds.items():
        p["logits"] = (p["logits"] / temperature).astype(np.float32)
        scores[split] = evaluate_predictions(labels=p["labels"], logits=p["logits"], users=p["users"],
                                             categories=p["categories"])
    if cluster.is_main:
        np.save(out_dir / TEST_LOGITS, preds["test"]["logits"], allow_pickle=False)
    result = {
        "finished": True, "config": config.to_dict(), "model_config": model_config.to_dict(),
        "dataset": dataset.manifest.get("content_sha256"), "environment": env, "device": env["device"],
        "best_step": state["best_step"], "steps": state["step"], "early_stopped": state["early_stopped"],
        "select_metric": config.select_metric, "temperature": temperature,
        "val": scores["val"], "test": scores["test"], "curve": state["curve"],
        "train_seconds": state["train_time"],
        "train_samples_per_s": state["samples"] / max(state["train_time"], 1e-9),
    }
    if cluster.is_main:
        write_json(out_dir / "result.json", result)
    log.info("%s dim=%d seed=%d: best validation %s at step %d; test AUC %.4f, logloss %.4f", config.preset,
             model_config.dim, config.seed, config.select_metric, state["best_step"], scores["test"]["auc"],
             scores["test"]["logloss"])
    return result


def _write_curve(path: Path, curve: list[dict[str, Any]]) -> None:
    if not curve:
        return
    keys = list(curve[0])
    lines = [",".join(keys)] + [",".join("" if p[k] is None else f"{p[k]}" for k in keys) for p in curve]
    write_text(path, "\n".join(lines) + "\n")
