"""Training, evaluation metrics and checkpoints."""

from usn_offline.train.checkpoint import CheckpointInfo, load_checkpoint, save_checkpoint
from usn_offline.train.loop import TrainConfig, TrainResult, train_model
from usn_offline.train.metrics import EvaluationResult, evaluate_model, evaluation_table

__all__ = ["CheckpointInfo", "EvaluationResult", "TrainConfig", "TrainResult", "evaluate_model",
           "evaluation_table", "load_checkpoint", "save_checkpoint", "train_model"]
