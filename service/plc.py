"""The S7-1500 link: the vision <-> PLC data block, its packing, and the thread that owns the Snap7 client.

The interface is ONE table, :data:`LAYOUT`. Packing (:func:`pack_result`, :func:`pack_status`,
:func:`pack_inputs`), unpacking (:func:`unpack_inputs`, :func:`unpack_status`, :func:`unpack_result`),
the table in docs/plc-interface.md and the TIA Portal sources in deploy/plc/ are all derived from it;
``python -m service.plc --check`` (and the tests) verify that the committed artifacts still agree,
``python -m service.plc --write`` regenerates them.

    DB100 (non-optimised, 50 bytes)      PLC -> vision 0..7 | vision status 8..11 | vision result 12..49

:class:`PlcLink` is the runtime side: one owner thread for the (not thread-safe) Snap7 client that
polls bytes 0..7, announces each new PartId once, writes VisionHeartbeat + status at least once per
second and every published result with one ``db_write``; it reconnects with exponential back-off.
Link-loss policy (docs/plc-interface.md, "Link loss"): a result is written only on the same
connection on which its PartId was announced; everything else is dropped and counted, never replayed.
"""

from __future__ import annotations

import argparse
import collections
import math
import queue
import re
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from snap7 import util as s7util

from service.errors import ConfigError, PlcLinkError
from service.logs import get_logger
from service.records import Verdict, defect_names

log = get_logger(__name__)

# --------------------------------------------------------------------------------------------------
# The interface table
# --------------------------------------------------------------------------------------------------

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
    Field("RejectUnknown", 24, 4, "Bool", _OUT, "Rejected: unknown defect (reserved)"),
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

UDT_NAME = "VisionInterface"
DB_NAME = "Vision"

FIELDS: dict[str, Field] = {f.name: f for f in LAYOUT}


def fields_in(start: int, size: int) -> tuple[Field, ...]:
    """The fields whose bytes lie in [start, start + size).

    >>> [f.name for f in fields_in(STATUS_START, STATUS_SIZE)]
    ['VisionHeartbeat', 'Ready', 'CameraOk', 'ModelOk', 'GpuActive', 'Fault', 'Simulated']
    """
    return tuple(f for f in LAYOUT if start <= f.offset and f.offset + f.size <= start + size)


# --------------------------------------------------------------------------------------------------
# Records and packing
# --------------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class PlcResult:
    """Bytes 12..49 as the PLC sees them (the simulator's and the tests' view of a written result)."""

    result_seq: int = 0
    result_part_id: int = 0
    frame_id: int = 0
    accept: bool = False
    reject_dirt: bool = False
    reject_scratch: bool = False
    reject_ec: bool = False
    reject_unknown: bool = False
    no_part: bool = False
    not_inspected: bool = False
    dirt_area_px: int = 0
    scratch_area_px: int = 0
    score_dirt: float = 0.0
    score_scratch: float = 0.0
    score_ec: float = 0.0
    inspect_ms: float = 0.0

    @property
    def defects(self) -> tuple[str, ...]:
        return defect_names(self)

    @property
    def consistent(self) -> bool:
        """Exactly one of accept / reject(s) / no_part / not_inspected, as docs/plc-interface.md requires."""
        return sum([self.accept, bool(self.defects), self.no_part, self.not_inspected]) == 1

    @property
    def label(self) -> str:
        """accept | reject | no_part | not_inspected | invalid (bits inconsistent)."""
        if not self.consistent:
            return "invalid"
        if self.accept:
            return "accept"
        if self.no_part:
            return "no_part"
        if self.not_inspected:
            return "not_inspected"
        return "reject"


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


def _verdict_bits_ok(v: Verdict) -> bool:
    rejected = v.reject_dirt or v.reject_scratch or v.reject_ec or v.reject_unknown
    return sum([bool(v.accept), bool(rejected), bool(v.no_part), bool(v.not_inspected)]) == 1


def pack_result(verdict: Verdict, seq: int, inspect_ms: float | None = None) -> bytearray:
    """A Verdict and its ResultSeq -> the 38 bytes at DB offset 12 (one db_write).

    ``inspect_ms`` overrides ``verdict.inspect_ms`` (the link measures frame arrival -> write).
    Areas saturate at 0..2**31-1; counters and ids wrap like S7 DInts.

    >>> buf = pack_result(Verdict(part_id=5, frame_id=9, accept=True), seq=1)
    >>> len(buf), buf[24 - RESULT_START], buf[:8].hex()
    (38, 1, '0000000100000005')
    """
    if not _verdict_bits_ok(verdict):
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


# --------------------------------------------------------------------------------------------------
# Artifacts generated from the table: docs table, TIA Portal sources
# --------------------------------------------------------------------------------------------------

DOCS_BEGIN = "<!-- BEGIN LAYOUT: generated from service/plc.py LAYOUT by `python -m service.plc --write` -->"
DOCS_END = "<!-- END LAYOUT -->"
REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS_PATH = Path("docs/plc-interface.md")
UDT_PATH = Path("deploy/plc/VisionInterface.udt")
DB_PATH = Path("deploy/plc/DB100_Vision.db")


def classic_layout(decls: Iterable[tuple[str, str]]) -> tuple[list[tuple[str, int, int | None]], int]:
    """Addresses of a flat STRUCT in a non-optimised ("standard") block, as TIA Portal assigns them.

    Consecutive Bools share a byte (bits 0..7); any other type starts at the next byte, and types of
    two bytes or more at the next even byte; the struct is padded to an even length.

    >>> classic_layout([("a", "Bool"), ("b", "Int"), ("c", "Bool"), ("d", "Bool"), ("e", "Real")])
    ([('a', 0, 0), ('b', 2, None), ('c', 4, 0), ('d', 4, 1), ('e', 6, None)], 10)
    """
    out: list[tuple[str, int, int | None]] = []
    byte, bit = 0, 0
    for name, typ in decls:
        if typ not in S7_TYPE_SIZES:
            raise ValueError(f"{name}: S7 type {typ!r} is not one of {sorted(S7_TYPE_SIZES)}")
        if typ == "Bool":
            out.append((name, byte, bit))
            bit += 1
            if bit == 8:
                byte, bit = byte + 1, 0
            continue
        if bit:
            byte, bit = byte + 1, 0
        size = S7_TYPE_SIZES[typ]
        if size > 1 and byte % 2:
            byte += 1
        out.append((name, byte, None))
        byte += size
    if bit:
        byte += 1
    if byte % 2:
        byte += 1
    return out, byte


def parse_udt_source(text: str) -> list[tuple[str, str]]:
    """The ``Name : Type;`` members between STRUCT and END_STRUCT of a TIA UDT source."""
    m = re.search(r"^\s*STRUCT\s*$(.*?)^\s*END_STRUCT;", text, re.S | re.M)
    if not m:
        raise ValueError("no STRUCT ... END_STRUCT; block in the UDT source")
    body = re.sub(r"//[^\n]*", "", m.group(1))
    return re.findall(r"^\s*(\w+)\s*:\s*(\w+)\s*;", body, re.M)


def layout_markdown(db: int = DEFAULT_DB) -> str:
    """The docs table (between DOCS_BEGIN and DOCS_END in docs/plc-interface.md)."""
    lines = [
        f"| Offset | Absolute (DB{db}) | Name | S7 type | Direction | Meaning |",
        "|---:|---|---|---|---|---|",
    ]
    for f in LAYOUT:
        lines.append(f"| {f.address} | {f.absolute(db)} | {f.name} | {f.s7type} | {f.direction} | {f.doc} |")
    return "\n".join(lines)


_GENERATED = "// Generated from service/plc.py LAYOUT by `python -m service.plc --write`; do not edit by hand."


def tia_udt_source() -> str:
    """deploy/plc/VisionInterface.udt: the PLC data type, importable as a TIA Portal external source."""
    width = max(len(f.name) for f in LAYOUT)
    lines = [
        _GENERATED,
        f"// valve-inspect vision <-> PLC interface, {DB_SIZE} bytes in a DB with standard (non-optimised) access.",
        "// Offsets: docs/plc-interface.md. Changing this type changes the byte layout the vision side expects.",
        f'TYPE "{UDT_NAME}"',
        "VERSION : 0.1",
        "   STRUCT",
    ]
    for f in LAYOUT:
        decl = f"{f.name} : {f.s7type};"
        lines.append(f"      {decl.ljust(width + 9)}// {f.address:>4}  {f.direction}: {f.doc}")
    lines += ["   END_STRUCT;", "", "END_TYPE", ""]
    return "\n".join(lines)


def tia_db_source() -> str:
    """deploy/plc/DB100_Vision.db: the global DB of type "VisionInterface", standard access, non-retain."""
    lines = [
        _GENERATED,
        f'// Global DB "{DB_NAME}" of type "{UDT_NAME}". After "Generate blocks from source" set its number to',
        f"// {DEFAULT_DB} (Properties > General > Number, manual), or give the daemon the number TIA assigned.",
        f'DATA_BLOCK "{DB_NAME}"',
        "{ S7_Optimized_Access := 'FALSE' }",
        "VERSION : 0.1",
        "NON_RETAIN",
        f'"{UDT_NAME}"',
        "",
        "BEGIN",
        "",
        "END_DATA_BLOCK",
        "",
    ]
    return "\n".join(lines)


def _replace_docs_block(text: str) -> str:
    if DOCS_BEGIN not in text or DOCS_END not in text:
        raise ValueError(f"{DOCS_PATH}: the markers {DOCS_BEGIN!r} and {DOCS_END!r} are missing; put them around "
                         f"the layout table")
    head, rest = text.split(DOCS_BEGIN, 1)
    _, tail = rest.split(DOCS_END, 1)
    return f"{head}{DOCS_BEGIN}\n{layout_markdown()}\n{DOCS_END}{tail}"


def artifact_problems(root: Path = REPO_ROOT) -> list[str]:
    """What in docs/ and deploy/plc/ disagrees with LAYOUT (empty when everything agrees)."""
    problems: list[str] = []
    placed, size = classic_layout((f.name, f.s7type) for f in LAYOUT)
    expected = [(f.name, f.offset, f.bit) for f in LAYOUT]
    if placed != expected or size != DB_SIZE:
        problems.append(f"LAYOUT offsets are not what TIA assigns in a non-optimised DB: TIA {placed} ({size} bytes), "
                        f"LAYOUT {expected} ({DB_SIZE} bytes)")
    for path, want in ((UDT_PATH, tia_udt_source()), (DB_PATH, tia_db_source())):
        p = root / path
        if not p.exists():
            problems.append(f"{path} is missing; run `python -m service.plc --write`")
        elif p.read_text(encoding="utf-8") != want:
            problems.append(f"{path} differs from LAYOUT; run `python -m service.plc --write` and review the diff")
    udt = root / UDT_PATH
    if udt.exists():
        decls = parse_udt_source(udt.read_text(encoding="utf-8"))
        if decls != [(f.name, f.s7type) for f in LAYOUT]:
            problems.append(f"{UDT_PATH} declares {decls}, LAYOUT has {[(f.name, f.s7type) for f in LAYOUT]}")
    docs = root / DOCS_PATH
    if not docs.exists():
        problems.append(f"{DOCS_PATH} is missing")
    else:
        text = docs.read_text(encoding="utf-8")
        try:
            if _replace_docs_block(text) != text:
                problems.append(f"{DOCS_PATH}: the layout table differs from LAYOUT; run `python -m service.plc --write`")
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def write_artifacts(root: Path = REPO_ROOT) -> list[Path]:
    """Regenerate the TIA sources and the docs table from LAYOUT; returns the files written."""
    written = []
    for path, text in ((UDT_PATH, tia_udt_source()), (DB_PATH, tia_db_source())):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text, encoding="utf-8")
        written.append(root / path)
    docs = root / DOCS_PATH
    docs.write_text(_replace_docs_block(docs.read_text(encoding="utf-8")), encoding="utf-8")
    written.append(docs)
    return written


# --------------------------------------------------------------------------------------------------
# The link
# --------------------------------------------------------------------------------------------------


#: ISO-on-TCP, the port of every S7 PLC (plc.port = 0 with mode = "client").
ISO_ON_TCP_PORT = 102
#: The in-process simulator's default port (plc.port = 0 with mode = "simulated"): no root needed to bind it.
SIMULATOR_PORT = 1102
#: S7 addressing bounds, one definition for the config section and the link.
RACK_RANGE = (0, 7)
SLOT_RANGE = (0, 31)
DB_RANGE = (1, 65535)


@dataclass(frozen=True)
class PlcLinkConfig:
    """Explicit link parameters (the config system maps its [plc] table onto these).

    Args:
        host: the PLC's IP address.
        rack, slot: S7-1500: 0 / 1.
        port: ISO-on-TCP port (102 on a real PLC; the simulator defaults to 1102).
        db: the interface DB's number.
        poll_interval_s: how often bytes 0..7 are read; keep it well below the part period.
        status_interval_s: VisionHeartbeat + status are written at this period (<= 1 s).
        plc_heartbeat_timeout_s: PlcHeartbeat unchanged this long -> Fault (cleared when it moves).
        reconnect_min_s, reconnect_max_s: exponential back-off between connection attempts.
        io_timeout_s: socket timeout for reads and writes once connected.
        min_result_interval_s: minimum spacing of result writes, so that a PLC scanning ResultSeq once
            per cycle never misses one (keep it above two PLC cycle times).
        result_queue_max: results waiting to be written; beyond this the oldest is dropped.
        event_queue_max: events waiting for the app; beyond this the oldest is dropped.
        app_watchdog_s: when set, VisionHeartbeat only increments while the app has called touch(),
            publish() or set_status() within this time (so a hung inspection loop stops the heartbeat).
    """

    host: str
    rack: int = 0
    slot: int = 1
    port: int = ISO_ON_TCP_PORT
    db: int = DEFAULT_DB
    poll_interval_s: float = 0.010
    status_interval_s: float = 0.25
    plc_heartbeat_timeout_s: float = 3.0
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 10.0
    io_timeout_s: float = 2.0
    min_result_interval_s: float = 0.02
    result_queue_max: int = 64
    event_queue_max: int = 1024
    app_watchdog_s: float | None = None

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"plc.{key} = {getattr(self, key)!r}: {why}")

        if not self.host:
            raise ConfigError("plc.host is empty: set it to the PLC's IP address, e.g. 192.168.0.1")
        (r0, r1), (s0, s1), (d0, d1) = RACK_RANGE, SLOT_RANGE, DB_RANGE
        if not r0 <= self.rack <= r1 or not s0 <= self.slot <= s1:
            raise ConfigError(f"plc.rack/slot = {self.rack}/{self.slot}: rack must be {r0}..{r1} and slot "
                              f"{s0}..{s1} (S7-1500: rack 0, slot 1)")
        if not 1 <= self.port <= 65535:
            raise bad("port", f"must be 1..65535 (a real PLC listens on {ISO_ON_TCP_PORT})")
        if not d0 <= self.db <= d1:
            raise bad("db", f"must be a DB number {d0}..{d1} (default {DEFAULT_DB})")
        for key in ("poll_interval_s", "status_interval_s", "plc_heartbeat_timeout_s", "reconnect_min_s",
                    "io_timeout_s"):
            if not getattr(self, key) > 0:
                raise bad(key, "must be > 0 seconds")
        if self.status_interval_s > 1.0:
            raise bad("status_interval_s", "must be <= 1.0 s: the PLC expects VisionHeartbeat to move every second")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise bad("reconnect_max_s", f"must be >= reconnect_min_s ({self.reconnect_min_s})")
        if self.min_result_interval_s < 0:
            raise bad("min_result_interval_s", "must be >= 0 seconds")
        if self.result_queue_max < 1 or self.event_queue_max < 1:
            raise ConfigError("plc.result_queue_max and plc.event_queue_max must be >= 1")
        if self.app_watchdog_s is not None and not self.app_watchdog_s > 0:
            raise bad("app_watchdog_s", "must be > 0 seconds, or unset to tie the heartbeat to the link thread")

    @classmethod
    def from_settings(cls, plc: Any) -> PlcLinkConfig:
        """The link's parameters from the [plc] section (service.config.PlcSettings; its port is resolved).

        VisionHeartbeat is tied to the app's loop (app_watchdog_s), never shorter than 2 s.
        """
        return cls(host=plc.host, rack=plc.rack, slot=plc.slot, port=plc.port, db=plc.db,
                   poll_interval_s=plc.poll_ms / 1000.0, plc_heartbeat_timeout_s=plc.heartbeat_timeout_s,
                   reconnect_min_s=plc.reconnect_min_s, reconnect_max_s=plc.reconnect_max_s,
                   app_watchdog_s=max(2.0, plc.heartbeat_timeout_s))


@dataclass(frozen=True)
class PlcEvent:
    """What the link tells the app.

    kind:
        ``part``: a new non-zero PartId (emitted once); ``at`` is its detection time (time.monotonic()).
        ``enable``: Enable changed (and its value right after each connect).
        ``link``: the connection went up (``connected=True``) or down.
    ``enable`` always carries the last Enable read.
    """

    kind: str
    at: float
    part_id: int = 0
    enable: bool = False
    connected: bool = False


@dataclass
class _Queued:
    verdict: Verdict
    arrival: float | None
    published: float


_RESOLVED = -1  # marks a PartId whose result was written (in _announced)
_ANNOUNCED_MAX = 4096


def _default_client_factory() -> Any:
    import snap7

    return snap7.client.Client()


class PlcLink:
    """The daemon's side of the S7 interface; one owner thread does all Snap7 I/O.

    Thread-safe API: start(), stop(timeout), publish(verdict, arrival=None), set_status(...), touch(),
    next_event(timeout) / the ``events`` queue, take_dropped_parts(), ``connected``, wait_connected(timeout),
    stats().

        link = PlcLink(host="192.168.0.1", db=100)   # or PlcLink(PlcLinkConfig(...))
        link.start()
        link.set_status(ready=True, camera_ok=True, model_ok=True, gpu_active=True)
        ev = link.next_event(timeout=0.1)            # PlcEvent(kind="part", part_id=..., at=...)
        link.publish(verdict, arrival=frame.arrival)
        link.stop()                                  # writes queued results, then Ready=0
    """

    def __init__(self, config: PlcLinkConfig | None = None, /, *,
                 client_factory: Callable[[], Any] | None = None, **kwargs: Any) -> None:
        if config is None:
            config = PlcLinkConfig(**kwargs)
        elif kwargs:
            config = replace(config, **kwargs)
        self.config = config
        self.events: queue.Queue[PlcEvent] = queue.Queue(maxsize=config.event_queue_max)
        self._client_factory = client_factory or _default_client_factory
        self._log = log.bind(component="plc", plc=f"{config.host}:{config.port}", db=config.db)

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop_evt = threading.Event()
        self._up_evt = threading.Event()
        self._thread: threading.Thread | None = None
        self._results: collections.deque[_Queued] = collections.deque()
        self._status = VisionStatus()
        self._status_dirty = True
        self._last_touch = time.monotonic()
        self._stopped = False

        # owner-thread state
        self._client: Any = None
        self._epoch = 0
        self._announced: collections.OrderedDict[int, int] = collections.OrderedDict()
        self._last_part_id: int | None = None
        self._enable: bool | None = None
        self._plc_hb: int | None = None
        self._plc_hb_changed = 0.0
        self._plc_stale = False
        self._app_silent = False
        self._vision_hb = 0
        self._result_seq = 0
        self._next_poll = 0.0
        self._next_status = 0.0
        self._last_result_write = -math.inf

        self._stats: dict[str, Any] = dict(
            connects=0, reconnects=0, connect_failures=0, read_failures=0, write_failures=0,
            parts_detected=0, parts_missed_on_reconnect=0, results_written=0, results_dropped=0,
            status_writes=0, events_dropped=0, part_events_dropped=0, last_error="", last_latency_ms=None,
            max_latency_ms=None,
        )
        self._dropped_parts: collections.deque[PlcEvent] = collections.deque(maxlen=_ANNOUNCED_MAX)
        self._dropped: collections.Counter[str] = collections.Counter()

    # ---------------------------------------------------------------- app API

    def start(self) -> PlcLink:
        """Start the owner thread (it connects in the background; see wait_connected())."""
        if self._thread is not None:
            raise RuntimeError("PlcLink.start() called twice; a stopped link cannot be restarted, create a new one")
        self._thread = threading.Thread(target=self._run, name="plc-link", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> bool:
        """Write the queued results and a final status with Ready=0, disconnect; True if done in time."""
        with self._lock:
            self._stopped = True
        self._stop_evt.set()
        self._wake.set()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._log.warning("plc_stop_timeout", timeout_s=timeout,
                              hint="the owner thread is blocked in a Snap7 call (connect timeout is 5 s)")
            return False
        return True

    def __enter__(self) -> PlcLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._up_evt.is_set()

    def wait_connected(self, timeout: float | None = None) -> bool:
        return self._up_evt.wait(timeout)

    def publish(self, verdict: Verdict, arrival: float | None = None) -> bool:
        """Queue one result for writing; False when it was dropped at once (link down, stopped, queue full).

        Args:
            verdict: the part's result; its part_id must be one this link announced on the current connection.
            arrival: time.monotonic() of the frame's arrival; when given, InspectMs is measured up to the write.
        """
        if not isinstance(verdict, Verdict):
            raise TypeError(f"publish() takes a service.records.Verdict, got {type(verdict).__name__}")
        now = time.monotonic()
        with self._lock:
            self._last_touch = now
            if self._stopped:
                reason = "stopped"
            elif not self._up_evt.is_set():
                reason = "link_down"
            else:
                reason = ""
                if len(self._results) >= self.config.result_queue_max:
                    old = self._results.popleft()
                    self._drop_locked(old.verdict, "queue_full")
                self._results.append(_Queued(verdict, arrival, now))
            if reason:
                self._drop_locked(verdict, reason)
        self._wake.set()
        return not reason

    def set_status(self, *, ready: bool | None = None, camera_ok: bool | None = None, model_ok: bool | None = None,
                   gpu_active: bool | None = None, fault: bool | None = None, simulated: bool | None = None) -> None:
        """Update status bits (None leaves a bit as it is); written at once. Fault is ORed with a stale PLC heartbeat."""
        changes = {k: bool(v) for k, v in dict(ready=ready, camera_ok=camera_ok, model_ok=model_ok,
                                                   gpu_active=gpu_active, fault=fault,
                                                   simulated=simulated).items() if v is not None}
        with self._lock:
            self._last_touch = time.monotonic()
            new = replace(self._status, **changes)
            if new != self._status:
                self._status = new
                self._status_dirty = True
        self._wake.set()

    @property
    def status(self) -> VisionStatus:
        """The status bits as written (app bits; Fault includes a stale PLC heartbeat)."""
        with self._lock:
            return replace(self._status, fault=self._status.fault or self._plc_stale)

    def touch(self) -> None:
        """Tell the link the app's loop is alive (only matters with app_watchdog_s)."""
        with self._lock:
            self._last_touch = time.monotonic()

    def next_event(self, timeout: float | None = None) -> PlcEvent | None:
        """The next PlcEvent, or None after ``timeout`` seconds."""
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def stats(self) -> dict[str, Any]:
        """Counters and state for metrics and logs (a copy)."""
        with self._lock:
            out = dict(self._stats)
            out.update(
                connected=self._up_evt.is_set(), dropped_by_reason=dict(self._dropped), queue_depth=len(self._results),
                result_seq=self._result_seq, vision_heartbeat=self._vision_hb, plc_heartbeat=self._plc_hb,
                plc_heartbeat_stale=self._plc_stale, enable=self._enable, last_part_id=self._last_part_id,
                epoch=self._epoch,
            )
        return out

    # ---------------------------------------------------------------- owner thread

    def _drop_locked(self, verdict: Verdict, reason: str) -> None:
        self._stats["results_dropped"] += 1
        self._dropped[reason] += 1
        self._log.warning("plc_result_dropped", part_id=verdict.part_id, verdict=verdict.label, reason=reason)

    def _drop(self, verdict: Verdict, reason: str) -> None:
        with self._lock:
            self._drop_locked(verdict, reason)

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._stats[key] += n

    def _emit(self, event: PlcEvent) -> None:
        """Queue an event for the app; when the queue is full the oldest event is dropped.

        A dropped ``part`` event is never silently lost: its PartId and detection time are kept
        (``take_dropped_parts()``), counted (``part_events_dropped``) and logged, so that the app can
        still answer the part (NotInspected "event_overflow") or count it as lost.
        """
        try:
            self.events.put_nowait(event)
        except queue.Full:
            try:
                old = self.events.get_nowait()
            except queue.Empty:
                old = None
            with self._lock:
                self._stats["events_dropped"] += 1
                if old is not None and old.kind == "part":
                    self._stats["part_events_dropped"] += 1
                    self._dropped_parts.append(old)
            self._log.warning("plc_event_queue_full", dropped="oldest", dropped_kind=getattr(old, "kind", None),
                              dropped_part_id=getattr(old, "part_id", None) or None,
                              hint="the app is not reading next_event()")
            try:
                self.events.put_nowait(event)
            except queue.Full:
                pass

    def take_dropped_parts(self) -> list[PlcEvent]:
        """The ``part`` events dropped from the full event queue since the last call (oldest first)."""
        with self._lock:
            out = list(self._dropped_parts)
            self._dropped_parts.clear()
        return out

    def _run(self) -> None:
        backoff = self.config.reconnect_min_s
        try:
            while not self._stop_evt.is_set():
                if self._client is None:
                    if self._connect():
                        backoff = self.config.reconnect_min_s
                    else:
                        self._stop_evt.wait(backoff)
                        backoff = min(backoff * 2, self.config.reconnect_max_s)
                        continue
                try:
                    timeout = self._service()
                except Exception as exc:  # noqa: BLE001 - any Snap7/socket error means the link is down
                    self._link_down(exc)
                    continue
                if timeout > 0:
                    self._wake.wait(timeout)
                self._wake.clear()
        finally:
            self._shutdown()

    def _connect(self) -> bool:
        cfg = self.config
        client = None
        try:
            client = self._client_factory()
            client.connect(cfg.host, cfg.rack, cfg.slot, cfg.port)
            _set_io_timeout(client, cfg.io_timeout_s)
            try:
                data = client.db_read(cfg.db, 0, DB_SIZE)
            except Exception as exc:  # noqa: BLE001
                raise PlcLinkError(
                    f"connected to {cfg.host}:{cfg.port} but cannot read DB{cfg.db} bytes 0..{DB_SIZE - 1}: {exc}. "
                    f"Check that DB{cfg.db} exists with >= {DB_SIZE} bytes (deploy/plc/DB100_Vision.db), that its "
                    f"'Optimized block access' is off, and that PUT/GET access is permitted in the CPU's protection "
                    f"settings (docs/plc-interface.md)") from exc
        except Exception as exc:  # noqa: BLE001
            with self._lock:
                self._stats["connect_failures"] += 1
                self._stats["last_error"] = str(exc)
            self._log.warning("plc_connect_failed", error=str(exc), rack=cfg.rack, slot=cfg.slot)
            _disconnect_quietly(client)
            return False

        now = time.monotonic()
        inputs = unpack_inputs(data, base=0)
        seq = int(s7util.get_dint(data, RESULT_START))
        vision_hb = int(s7util.get_int(data, STATUS_START))
        previous = self._last_part_id
        if previous is not None and inputs.part_id not in (0, previous):
            # The PLC announced at least one part while we were away; its own watchdog handles it.
            self._count("parts_missed_on_reconnect")
            self._log.warning("plc_parts_missed_while_down", last_seen=previous, current=inputs.part_id)
        with self._lock:
            self._client = client
            self._epoch += 1
            self._stats["connects"] += 1
            if self._stats["connects"] > 1:
                self._stats["reconnects"] += 1
            self._result_seq = seq
            self._vision_hb = vision_hb
            self._plc_hb = inputs.plc_heartbeat
            self._plc_hb_changed = now
            self._enable = inputs.enable
            self._status_dirty = True
            if inputs.part_id:
                self._last_part_id = inputs.part_id  # baseline: a PartId already there is not announced
            self._next_poll = now + cfg.poll_interval_s
            self._next_status = now
            self._up_evt.set()
        self._log.info("plc_link_up", epoch=self._epoch, result_seq=seq, part_id=inputs.part_id,
                       enable=inputs.enable)
        self._emit(PlcEvent("link", now, enable=inputs.enable, connected=True))
        self._emit(PlcEvent("enable", now, enable=inputs.enable))
        return True

    def _link_down(self, exc: BaseException) -> None:
        client, self._client = self._client, None
        _disconnect_quietly(client)
        with self._lock:
            self._stats["last_error"] = str(exc)
            self._up_evt.clear()
            queued = list(self._results)
            self._results.clear()
            for q in queued:
                self._drop_locked(q.verdict, "link_down")
        self._log.warning("plc_link_down", error=str(exc), error_type=type(exc).__name__, dropped=len(queued))
        self._emit(PlcEvent("link", time.monotonic(), enable=bool(self._enable), connected=False))

    def _service(self) -> float:
        """One pass: poll, results, status. Returns the seconds until the next deadline."""
        cfg = self.config
        now = time.monotonic()
        if now >= self._next_poll:
            self._poll()
            now = time.monotonic()
            self._next_poll = max(self._next_poll + cfg.poll_interval_s, now + cfg.poll_interval_s / 2)
        while self._results and now - self._last_result_write >= cfg.min_result_interval_s:
            with self._lock:
                item = self._results.popleft() if self._results else None
            if item is None:
                break
            self._write_result(item)
            now = time.monotonic()
        with self._lock:
            dirty = self._status_dirty
        if dirty or now >= self._next_status:
            self._write_status()
            now = time.monotonic()
        deadlines = [self._next_poll, self._next_status]
        if self._results:
            deadlines.append(self._last_result_write + cfg.min_result_interval_s)
        return max(0.0, min(deadlines) - now)

    def _poll(self) -> None:
        try:
            data = self._client.db_read(self.config.db, INPUT_START, INPUT_SIZE)
        except Exception:
            self._count("read_failures")
            raise
        now = time.monotonic()
        inputs = unpack_inputs(data)
        if inputs.enable != self._enable:
            self._enable = inputs.enable
            self._log.info("plc_enable", enable=inputs.enable)
            self._emit(PlcEvent("enable", now, enable=inputs.enable))
        if inputs.plc_heartbeat != self._plc_hb:
            self._plc_hb, self._plc_hb_changed = inputs.plc_heartbeat, now
            if self._plc_stale:
                with self._lock:
                    self._plc_stale, self._status_dirty = False, True
                self._log.info("plc_heartbeat_ok", plc_heartbeat=inputs.plc_heartbeat)
        elif not self._plc_stale and now - self._plc_hb_changed > self.config.plc_heartbeat_timeout_s:
            with self._lock:
                self._plc_stale, self._status_dirty = True, True
            self._log.warning("plc_heartbeat_stale", plc_heartbeat=inputs.plc_heartbeat,
                              unchanged_s=round(now - self._plc_hb_changed, 3), action="Fault=1",
                              hint="PLC in STOP, or its program does not increment PlcHeartbeat")
        pid = inputs.part_id
        if pid and pid != self._last_part_id:
            self._last_part_id = pid
            self._announced[pid] = self._epoch
            self._announced.move_to_end(pid)
            while len(self._announced) > _ANNOUNCED_MAX:
                self._announced.popitem(last=False)
            self._count("parts_detected")
            self._emit(PlcEvent("part", now, part_id=pid, enable=inputs.enable))

    def _write_status(self, final: bool = False) -> None:
        cfg = self.config
        now = time.monotonic()
        with self._lock:
            status = replace(self._status, fault=self._status.fault or self._plc_stale)
            if final:
                status = replace(status, ready=False)
            self._status_dirty = False
            silent = cfg.app_watchdog_s is not None and now - self._last_touch > cfg.app_watchdog_s
        if silent != self._app_silent:
            self._app_silent = silent
            if silent:
                self._log.warning("vision_heartbeat_held", reason="app silent", silent_for_s=cfg.app_watchdog_s)
            else:
                self._log.info("vision_heartbeat_resumed")
        hb = self._vision_hb if silent else wrap_int(self._vision_hb + 1)
        try:
            self._client.db_write(cfg.db, STATUS_START, pack_status(hb, status))
        except Exception:
            with self._lock:
                self._stats["write_failures"] += 1
                self._status_dirty = True
            raise
        with self._lock:
            self._vision_hb = hb
            self._stats["status_writes"] += 1
        self._next_status = now + cfg.status_interval_s

    def _write_result(self, item: _Queued) -> None:
        v = item.verdict
        epoch = self._announced.get(v.part_id)
        if epoch is None:
            self._drop(v, "unannounced")
            return
        if epoch == _RESOLVED:
            self._drop(v, "duplicate")
            return
        if epoch != self._epoch:
            self._drop(v, "stale_epoch")
            return
        seq = wrap_dint(self._result_seq + 1)
        now = time.monotonic()
        inspect_ms = None if item.arrival is None else (now - item.arrival) * 1000.0
        try:
            buf = pack_result(v, seq, inspect_ms=inspect_ms)
        except ValueError as exc:
            self._log.error("plc_result_invalid", part_id=v.part_id, error=str(exc))
            self._drop(v, "invalid")
            return
        try:
            self._client.db_write(self.config.db, RESULT_START, buf)
        except Exception:
            with self._lock:
                self._stats["write_failures"] += 1
                self._drop_locked(v, "write_failed")
            raise
        done = time.monotonic()
        self._last_result_write = done
        self._announced[v.part_id] = _RESOLVED
        with self._lock:
            self._result_seq = seq
            self._stats["results_written"] += 1
            latency = (done - item.published) * 1000.0
            self._stats["last_latency_ms"] = latency
            prev = self._stats["max_latency_ms"]
            self._stats["max_latency_ms"] = latency if prev is None else max(prev, latency)
        self._log.debug("plc_result_written", part_id=v.part_id, seq=seq, verdict=v.label)

    def _shutdown(self) -> None:
        if self._client is not None:
            try:
                while True:
                    with self._lock:
                        item = self._results.popleft() if self._results else None
                    if item is None:
                        break
                    wait = self._last_result_write + self.config.min_result_interval_s - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                    self._write_result(item)
                self._write_status(final=True)
                self._log.info("plc_link_stopped", result_seq=self._result_seq, ready=False)
            except Exception as exc:  # noqa: BLE001
                self._log.warning("plc_final_write_failed", error=str(exc))
            _disconnect_quietly(self._client)
            self._client = None
        with self._lock:
            queued = list(self._results)
            self._results.clear()
            for q in queued:
                self._drop_locked(q.verdict, "link_down")
            self._up_evt.clear()


def _set_io_timeout(client: Any, seconds: float) -> None:
    """Best effort: python-snap7 3.x has no public receive-timeout setter; its socket defaults to 5 s."""
    conn = getattr(client, "connection", None)
    sock = getattr(conn, "socket", None)
    if sock is not None:
        conn.timeout = seconds
        sock.settimeout(seconds)


def _disconnect_quietly(client: Any) -> None:
    if client is None:
        return
    try:
        client.disconnect()
    except Exception:  # noqa: BLE001, S110 - the connection is being thrown away
        pass


# --------------------------------------------------------------------------------------------------
# python -m service.plc --check | --write
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.plc",
                                description="Check or regenerate docs/plc-interface.md's table and deploy/plc/ "
                                            "from the LAYOUT in service/plc.py.")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--check", action="store_true", help="exit 1 if an artifact disagrees with LAYOUT")
    g.add_argument("--write", action="store_true", help="regenerate the artifacts")
    g.add_argument("--print", choices=["table", "udt", "db"], help="print one generated artifact")
    p.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root (default: %(default)s)")
    args = p.parse_args(argv)
    if args.print:
        print({"table": layout_markdown, "udt": tia_udt_source, "db": tia_db_source}[args.print]())
        return 0
    if args.write:
        for path in write_artifacts(args.root):
            print(f"wrote {path}")
        return 0
    problems = artifact_problems(args.root)
    for msg in problems:
        print(msg, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
