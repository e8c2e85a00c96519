"""valve-inspect runtime: grab -> ROI -> infer -> segment -> decide -> report.

This package must never import torch (tests/unit/service/test_no_torch.py proves it in a
subprocess). Everything here runs on numpy, OpenCV, ONNX Runtime, pypylon and python-snap7.
"""

__version__ = "0.1.0"
