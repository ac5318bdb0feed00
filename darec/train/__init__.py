"""Training, evaluation metrics and the Table 1 runner."""
from darec.train.config import TrainConfig, load_run_config
from darec.train.metrics import auc, evaluate_predictions, group_auc, logloss
from darec.train.trainer import evaluate, predict, train

__all__ = ["TrainConfig", "load_run_config", "train", "evaluate", "predict", "auc", "group_auc", "logloss",
           "evaluate_predictions"]
