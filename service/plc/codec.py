"""Pure packing and unpacking of the interface DB's regions (no I/O), following :data:`LAYOUT`.

    PLC -> vision 0..7: PlcInputs (pack_inputs / unpack_inputs)
    vision status 8..11: VisionHeartbeat + VisionStatus (pack_status / unpack_status)
    vision result 12..49: a Verdict in (pack_result), PlcResult out (unpack_result)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, make_dataclass
from dataclasses import field as dataclass_field
from typing import Any

from snap7 import util as s7util

from service.plc.layout import (
    INPUT_SIZE,
    INPUT_START,
    RESULT_SIZE,
    RESULT_START,
    STATUS_SIZE,
    STATUS_START,
    fields_in,
)
from service.records import Verdict, defect_names, outcome_consistent, outcome_label


@dataclass(frozen=True)
class PlcInputs:
    """Bytes 0..7, written by the PLC."""

    enable: bool = False
    plc_heartbeat: int = 0
    part_id: int = 0


@dataclass(frozen=True)
class VisionStatus:
    """The status bits at 10.0..10.5 (the heartbeat is separate)."""

    ready: bool = False
    camera_ok: bool = False
    model_ok: bool = False
    gpu_active: bool = False
    fault: bool = False
    simulated: bool = False


class _ResultOutcome:
    """What a PlcResult says about the part, from its verdict bits (the rules of service.records)."""

    @property
    def defects(self) -> tuple[str, ...]:
        return defect_names(self)

    @property
    def consistent(self) -> bool:
        """Exactly one of accept / reject(s) / no_part / not_inspected, as docs/plc-interface.md requires."""
        return outcome_consistent(self)

    @property
    def label(self) -> str:
        """accept | reject | no_part | not_inspected | invalid (bits inconsistent)."""
        return outcome_label(self) if self.consistent else "invalid"


#: Python type and zero of each S7 type in LAYOUT.
_PY_TYPES: dict[str, tuple[type, Any]] = {"Bool": (bool, False), "Int": (int, 0), "DInt": (int, 0),
                                           "Real": (float, 0.0)}

PlcResult = make_dataclass(
    "PlcResult",
    [(f.attr, _PY_TYPES[f.s7type][0], dataclass_field(default=_PY_TYPES[f.s7type][1]))
     for f in fields_in(RESULT_START, RESULT_SIZE)],
    bases=(_ResultOutcome,), frozen=True)
PlcResult.__module__ = __name__  # make_dataclass's module= needs Python 3.12
PlcResult.__doc__ = """Bytes 12..49 as the PLC sees them (the simulator's and the tests' view of a written result).

One field per LAYOUT member of the result region, in address order (result_seq, result_part_id, frame_id,
accept, reject_dirt, ..., inspect_ms), each defaulting to zero; defects / consistent / label as a Verdict's.

>>> PlcResult(result_seq=3, reject_dirt=True, reject_ec=True).label, PlcResult(accept=True, no_part=True).label
('reject', 'invalid')
"""


def wrap_int(n: int) -> int:
    """Wrap to an S7 Int (16-bit two's complement), as the PLC's INC does.

    >>> wrap_int(32767 + 1), wrap_int(-1), wrap_int(70000)
    (-32768, -1, 4464)
    """
    return ((int(n) + 0x8000) & 0xFFFF) - 0x8000


def wrap_dint(n: int) -> int:
    """Wrap to an S7 DInt (32-bit two's complement).

    >>> wrap_dint(2**31), wrap_dint(2**32 + 5)
    (-2147483648, 5)
    """
    return ((int(n) + 0x80000000) & 0xFFFFFFFF) - 0x80000000


_F32_MAX = 3.4028234663852886e38


def _real(x: float) -> float:
    x = float(x)
    if math.isfinite(x) and abs(x) > _F32_MAX:
        return math.copysign(_F32_MAX, x)
    return x


def _pack(values: Mapping[str, Any], start: int, size: int) -> bytearray:
    buf = bytearray(size)
    for f in fields_in(start, size):
        v, o = values[f.attr], f.offset - start
        if f.s7type == "Bool":
            s7util.set_bool(buf, o, f.bit, bool(v))
        elif f.s7type == "Int":
            s7util.set_int(buf, o, wrap_int(v))
        elif f.s7type == "DInt":
            s7util.set_dint(buf, o, wrap_dint(v))
        elif f.s7type == "Real":
            s7util.set_real(buf, o, _real(v))
        else:  # pragma: no cover - LAYOUT only uses the four types above
            raise ValueError(f"{f.name}: no packer for S7 type {f.s7type}")
    return buf


def _unpack(buf: bytes | bytearray, start: int, size: int, base: int, what: str) -> dict[str, Any]:
    lo = start - base
    if lo < 0 or len(buf) < lo + size:
        raise ValueError(f"{what}: need DB bytes {start}..{start + size - 1}, got {len(buf)} bytes starting at "
                         f"DB byte {base}; pass the buffer read from DB offset {start} (base={start}) or the whole DB "
                         f"(base=0)")
    view = bytearray(buf[lo:lo + size])
    out: dict[str, Any] = {}
    for f in fields_in(start, size):
        o = f.offset - start
        if f.s7type == "Bool":
            out[f.attr] = bool(s7util.get_bool(view, o, f.bit))
        elif f.s7type == "Int":
            out[f.attr] = int(s7util.get_int(view, o))
        elif f.s7type == "DInt":
            out[f.attr] = int(s7util.get_dint(view, o))
        elif f.s7type == "Real":
            out[f.attr] = float(s7util.get_real(view, o))
    return out


def pack_inputs(inputs: PlcInputs) -> bytearray:
    """PlcInputs -> the 8 bytes at DB offset 0 (the PLC's side; used by the simulator and the tests).

    >>> bytes(pack_inputs(PlcInputs(enable=True, plc_heartbeat=7, part_id=258)))
    b'\\x01\\x00\\x00\\x07\\x00\\x00\\x01\\x02'
    """
    return _pack({"enable": inputs.enable, "plc_heartbeat": inputs.plc_heartbeat, "part_id": inputs.part_id},
                 INPUT_START, INPUT_SIZE)


def unpack_inputs(data: bytes | bytearray, base: int = INPUT_START) -> PlcInputs:
    """The bytes read from DB offset ``base`` (0: the 8-byte poll or the whole DB) -> PlcInputs.

    >>> unpack_inputs(bytes([1, 0, 0, 7, 0, 0, 1, 2]))
    PlcInputs(enable=True, plc_heartbeat=7, part_id=258)
    """
    return PlcInputs(**_unpack(data, INPUT_START, INPUT_SIZE, base, "unpack_inputs"))


def pack_status(heartbeat: int, status: VisionStatus) -> bytearray:
    """VisionHeartbeat + status bits -> the 4 bytes at DB offset 8 (one db_write).

    >>> bytes(pack_status(3, VisionStatus(ready=True, fault=True)))
    b'\\x00\\x03\\x11\\x00'
    """
    values = {"vision_heartbeat": heartbeat, **{f.name: getattr(status, f.name) for f in fields(VisionStatus)}}
    return _pack(values, STATUS_START, STATUS_SIZE)


def unpack_status(data: bytes | bytearray, base: int = STATUS_START) -> tuple[int, VisionStatus]:
    """The bytes from DB offset ``base`` (8: the 4 status bytes; 0: the whole DB) -> (heartbeat, status)."""
    d = _unpack(data, STATUS_START, STATUS_SIZE, base, "unpack_status")
    hb = d.pop("vision_heartbeat")
    return hb, VisionStatus(**d)


def pack_result(verdict: Verdict, seq: int, inspect_ms: float | None = None) -> bytearray:
    """A Verdict and its ResultSeq -> the 38 bytes at DB offset 12 (one db_write).

    ``inspect_ms`` overrides ``verdict.inspect_ms`` (the link measures frame arrival -> write).
    Areas saturate at 0..2**31-1; counters and ids wrap like S7 DInts.

    >>> buf = pack_result(Verdict(part_id=5, frame_id=9, accept=True), seq=1)
    >>> len(buf), buf[24 - RESULT_START], buf[:8].hex()
    (38, 1, '0000000100000005')
    """
    if not outcome_consistent(verdict):  # a record changed behind Verdict's check
        raise ValueError(f"part {verdict.part_id}: a result is exactly one of accept, reject, no_part, "
                         f"not_inspected (got {verdict!r}); build it with service.records.Verdict")
    area_max = 2**31 - 1
    values: dict[str, Any] = {f.attr: getattr(verdict, f.attr, None) for f in fields_in(RESULT_START, RESULT_SIZE)}
    values.update(
        result_seq=seq,
        result_part_id=verdict.part_id,
        dirt_area_px=min(max(int(verdict.dirt_area_px), 0), area_max),
        scratch_area_px=min(max(int(verdict.scratch_area_px), 0), area_max),
        inspect_ms=verdict.inspect_ms if inspect_ms is None else inspect_ms,
    )
    return _pack(values, RESULT_START, RESULT_SIZE)


def unpack_result(data: bytes | bytearray, base: int = RESULT_START) -> PlcResult:
    """The bytes from DB offset ``base`` (12: the 38 result bytes; 0: the whole DB) -> PlcResult."""
    return PlcResult(**_unpack(data, RESULT_START, RESULT_SIZE, base, "unpack_result"))
