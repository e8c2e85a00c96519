"""The data the unknown score is fitted, calibrated and evaluated on: the runtime's slices of synthetic parts
(the daemon's own ROI cut) with the manifest's labels, and an ONNX graph run over them; UnknownError, the
package's one error."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from models.errors import ValveModelError
from service.sim.synth import read_manifest


class UnknownError(ValveModelError):
    """A problem the user can fix (no blocks found, no data, a class without slices); exit 2."""

    exit_code = 2


@dataclass
class PartSlices:
    """The runtime's slices of synthetic parts, with the manifest's labels."""

    slices: np.ndarray          # (P, 8, 1, S, S) uint8
    slice_labels: list[list[str]]
    part_class: list[str]
    subtype: list[str | None]
    files: list[str]


def load_parts(folder: str | Path, limit: int | None = None) -> PartSlices:
    """Cut every frame of a ``valve-inspect synth`` folder with service.roi.extract (the daemon's own ROI)."""
    from service.errors import NoPartError
    from service.roi import extract

    folder = Path(folder)
    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise UnknownError(f"{folder}: no manifest.jsonl. Fix: give a folder written by `valve-inspect synth --out`.")
    rows = read_manifest(manifest)[:limit]
    slices, labels, classes, subtypes, files = [], [], [], [], []
    for row in rows:
        img = cv2.imread(str(folder / row["file"]), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise UnknownError(f"{folder / row['file']}: cannot read the frame. Fix: regenerate the folder.")
        try:
            batch = extract(img)
        except NoPartError:
            continue  # the daemon answers NoPart; not a sample of either distribution
        slices.append(batch.slices)
        labels.append(list(row.get("slice_labels") or ["good"] * len(batch.slices)))
        classes.append(row["class"])
        subtypes.append(row.get("subtype"))
        files.append(row["file"])
    if not slices:
        raise UnknownError(f"{folder}: no frame with a valve. Fix: regenerate the folder.")
    return PartSlices(np.stack(slices), labels, classes, subtypes, files)


def _session(proto, threads: int = 0):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return ort.InferenceSession(proto.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])


def run_outputs(proto, parts: PartSlices, names: Sequence[str], batch: int = 8, threads: int = 0) -> dict:
    """Run the graph over every slice; returns {output name: (P * 8, ...)} float arrays."""
    sess = _session(proto, threads)
    x = parts.slices.reshape(-1, *parts.slices.shape[2:])
    out: dict[str, list] = {n: [] for n in names}
    for i in range(0, len(x), batch):
        for n, v in zip(names, sess.run(list(names), {sess.get_inputs()[0].name: x[i:i + batch]}), strict=True):
            out[n].append(v)
    return {n: np.concatenate(v) for n, v in out.items()}


def slice_label_index(parts: PartSlices, classes: Sequence[str]) -> np.ndarray:
    idx = {c: i for i, c in enumerate(classes)}
    flat = [lab for labs in parts.slice_labels for lab in labs]
    bad = sorted({lab for lab in flat if lab not in idx})
    if bad:
        raise UnknownError(f"slice labels {bad} are not classes of the model {list(classes)}: fit and calibration "
                           f"data must be the known classes only. Fix: synthesise them without novel types.")
    return np.asarray([idx[lab] for lab in flat])


def _positions(n_parts: int, n_slices: int) -> np.ndarray:
    return np.tile(np.arange(n_slices), n_parts)
