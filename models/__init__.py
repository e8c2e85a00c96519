"""IRA-CNN (torch side): model, saliency, data, training, evaluation and ONNX export.

``models.load(path)`` rebuilds a trained model from a run directory or a checkpoint file
without pickle and returns it in eval mode.
"""

from models.checkpoint import load

__all__ = ["load"]
