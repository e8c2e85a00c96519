"""The vision <-> PLC data block as ONE table, :data:`LAYOUT`, and the S7 addressing constants.

    DB100 (non-optimised, 50 bytes)      PLC -> vision 0..7 | vision status 8..11 | vision result 12..49

Packing (service.plc.codec), the link (service.plc.link), the table in docs/plc-interface.md and the TIA
Portal sources in deploy/plc/ are all derived from it; ``python tools/plc_artifacts.py --check`` (and the
tests) verify that the committed artifacts still agree, ``--write`` regenerates them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PLC_TO_VISION = "PLC->vision"
VISION_TO_PLC = "vision->PLC"

#: Bytes per S7 type (Bool: one bit of a byte).
S7_TYPE_SIZES: dict[str, int] = {"Bool": 1, "Byte": 1, "Int": 2, "UInt": 2, "Word": 2, "DInt": 4, "UDInt": 4,
                                 "DWord": 4, "Real": 4}


@dataclass(frozen=True)
class Field:
    """One member of the interface DB.

    Args:
        name: the member's name in the PLC (UDT "VisionInterface").
        offset: byte offset in the DB.
        bit: bit number for Bool, else None.
        s7type: Bool | Int | DInt | Real.
        direction: PLC_TO_VISION (the daemon only reads it) or VISION_TO_PLC (the daemon writes it).
        doc: one line for the docs table and the TIA comment.
    """

    name: str
    offset: int
    bit: int | None
    s7type: str
    direction: str
    doc: str

    @property
    def attr(self) -> str:
        """The Python attribute name: ``RejectEC`` -> ``reject_ec``.

        >>> Field("ScoreEC", 42, None, "Real", VISION_TO_PLC, "").attr
        'score_ec'
        """
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", self.name).lower()

    @property
    def address(self) -> str:
        """Offset as the PLC writes it: ``24.3`` for a Bool, ``26`` otherwise."""
        return f"{self.offset}.{self.bit}" if self.bit is not None else str(self.offset)

    def absolute(self, db: int) -> str:
        """The absolute S7 address, e.g. ``DB100.DBX24.3``, ``DB100.DBW2``, ``DB100.DBD4``.

        >>> LAYOUT[0].absolute(100), LAYOUT[1].absolute(100), LAYOUT[2].absolute(100)
        ('DB100.DBX0.0', 'DB100.DBW2', 'DB100.DBD4')
        """
        if self.s7type == "Bool":
            return f"DB{db}.DBX{self.offset}.{self.bit}"
        letter = {1: "B", 2: "W", 4: "D"}[self.size]
        return f"DB{db}.DB{letter}{self.offset}"

    @property
    def size(self) -> int:
        return S7_TYPE_SIZES[self.s7type]


_IN, _OUT = PLC_TO_VISION, VISION_TO_PLC

#: The interface, in address order. Everything else in this module and the artifacts derive from it.
LAYOUT: tuple[Field, ...] = (
    Field("Enable", 0, 0, "Bool", _IN, "Inspection enabled by the PLC"),
    Field("PlcHeartbeat", 2, None, "Int", _IN, "Incremented by the PLC at least once per second"),
    Field("PartId", 4, None, "DInt", _IN, "New non-zero id for each part, written before its trigger"),
    Field("VisionHeartbeat", 8, None, "Int", _OUT, "Incremented at least once per second while the vision loop is alive"),
    Field("Ready", 10, 0, "Bool", _OUT, "Vision ready to inspect (camera, model and link up; 0 on shutdown)"),
    Field("CameraOk", 10, 1, "Bool", _OUT, "Camera opened and grabbing"),
    Field("ModelOk", 10, 2, "Bool", _OUT, "ONNX model loaded and its hash/contract verified"),
    Field("GpuActive", 10, 3, "Bool", _OUT, "Inference runs on the GPU (0: CPU fallback)"),
    Field("Fault", 10, 4, "Bool", _OUT, "Vision fault, or PlcHeartbeat stale on the vision side"),
    Field("Simulated", 10, 5, "Bool", _OUT, "A simulator is part of the line (camera emulator or PLC simulator): results are not of real parts"),
    Field("ResultSeq", 12, None, "DInt", _OUT, "+1 per result; a change tells the PLC a new result is complete"),
    Field("ResultPartId", 16, None, "DInt", _OUT, "PartId this result belongs to"),
    Field("FrameId", 20, None, "DInt", _OUT, "Camera frame counter of the inspected frame"),
    Field("Accept", 24, 0, "Bool", _OUT, "Good part (never set together with any other verdict bit)"),
    Field("RejectDirt", 24, 1, "Bool", _OUT, "Rejected: dirt"),
    Field("RejectScratch", 24, 2, "Bool", _OUT, "Rejected: scratch"),
    Field("RejectEC", 24, 3, "Bool", _OUT, "Rejected: EC defect"),
    Field("RejectUnknown", 24, 4, "Bool", _OUT, "Rejected: a slice unlike every known class (unknown score >= threshold)"),
    Field("NoPart", 24, 5, "Bool", _OUT, "No inspectable valve in the frame (treat as reject)"),
    Field("NotInspected", 24, 6, "Bool", _OUT, "Inspection failed or timed out (treat as reject; never Accept)"),
    Field("DirtAreaPx", 26, None, "DInt", _OUT, "Segmented dirt pixels over the 8 slices"),
    Field("ScratchAreaPx", 30, None, "DInt", _OUT, "Segmented scratch pixels over the 8 slices"),
    Field("ScoreDirt", 34, None, "Real", _OUT, "Highest slice probability of dirt"),
    Field("ScoreScratch", 38, None, "Real", _OUT, "Highest slice probability of scratch"),
    Field("ScoreEC", 42, None, "Real", _OUT, "Highest slice probability of EC"),
    Field("InspectMs", 46, None, "Real", _OUT, "Frame arrival -> result write, ms"),
)

DEFAULT_DB = 100
DB_SIZE = 50
INPUT_START, INPUT_SIZE = 0, 8  # PLC -> vision, read every poll
STATUS_START, STATUS_SIZE = 8, 4  # VisionHeartbeat + status bits, one db_write
RESULT_START, RESULT_SIZE = 12, 38  # ResultSeq .. InspectMs, one db_write

FIELDS: dict[str, Field] = {f.name: f for f in LAYOUT}


def fields_in(start: int, size: int) -> tuple[Field, ...]:
    """The fields whose bytes lie in [start, start + size).

    >>> [f.name for f in fields_in(STATUS_START, STATUS_SIZE)]
    ['VisionHeartbeat', 'Ready', 'CameraOk', 'ModelOk', 'GpuActive', 'Fault', 'Simulated']
    """
    return tuple(f for f in LAYOUT if start <= f.offset and f.offset + f.size <= start + size)


#: ISO-on-TCP, the port of every S7 PLC (plc.port = 0 with mode = "client").
ISO_ON_TCP_PORT = 102
#: The in-process simulator's default port (plc.port = 0 with mode = "simulated"): no root needed to bind it.
SIMULATOR_PORT = 1102
#: S7 addressing bounds, one definition for the config section and the link.
RACK_RANGE = (0, 7)
SLOT_RANGE = (0, 31)
DB_RANGE = (1, 65535)


