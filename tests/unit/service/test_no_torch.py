"""The runtime package must never import torch."""

import subprocess
import sys

SCRIPT = r"""
import importlib, pkgutil, sys
import service
failed = []
for info in pkgutil.walk_packages(service.__path__, prefix="service."):
    try:
        importlib.import_module(info.name)
    except ImportError as exc:  # an optional native dependency missing is not our concern here
        failed.append((info.name, repr(exc)))
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
print("IMPORTED", len([m for m in sys.modules if m.startswith("service")]))
print("TORCH", loaded[:5])
print("FAILED", failed)
sys.exit(1 if loaded else 0)
"""


def test_importing_every_service_module_loads_no_torch():
    """Importing each module of the service package in a fresh interpreter leaves torch unloaded."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "TORCH []" in proc.stdout
    assert "FAILED []" in proc.stdout, proc.stdout
