"""The S7-1500 link: the vision <-> PLC data block, its packing, and the thread that owns the Snap7 client.

    layout.py   the interface as ONE table (LAYOUT) and the S7 addressing constants
    codec.py    pure pack_* / unpack_* over that table (PlcInputs, VisionStatus, PlcResult)
    link.py     PlcLink: one owner thread for the Snap7 client, reconnects, the link-loss policy

The docs table (docs/plc-interface.md) and the TIA Portal sources (deploy/plc/) are generated from
LAYOUT by ``python tools/plc_artifacts.py --write`` (``--check`` verifies them), outside this package.
"""

from service.plc.codec import (
    PlcInputs,
    PlcResult,
    VisionStatus,
    pack_inputs,
    pack_result,
    pack_status,
    unpack_inputs,
    unpack_result,
    unpack_status,
    wrap_dint,
    wrap_int,
)
from service.plc.layout import (
    DB_RANGE,
    DB_SIZE,
    DEFAULT_DB,
    FIELDS,
    INPUT_SIZE,
    INPUT_START,
    ISO_ON_TCP_PORT,
    LAYOUT,
    PLC_TO_VISION,
    RACK_RANGE,
    RESULT_SIZE,
    RESULT_START,
    S7_TYPE_SIZES,
    SIMULATOR_PORT,
    SLOT_RANGE,
    STATUS_SIZE,
    STATUS_START,
    VISION_TO_PLC,
    Field,
    fields_in,
)
from service.plc.link import PlcEvent, PlcLink, PlcLinkConfig

__all__ = [
    "DB_RANGE", "DB_SIZE", "DEFAULT_DB", "FIELDS", "INPUT_SIZE", "INPUT_START", "ISO_ON_TCP_PORT", "LAYOUT",
    "PLC_TO_VISION", "RACK_RANGE", "RESULT_SIZE", "RESULT_START", "S7_TYPE_SIZES", "SIMULATOR_PORT", "SLOT_RANGE",
    "STATUS_SIZE", "STATUS_START", "VISION_TO_PLC", "Field", "PlcEvent", "PlcInputs", "PlcLink", "PlcLinkConfig",
    "PlcResult", "VisionStatus", "fields_in", "pack_inputs", "pack_result", "pack_status", "unpack_inputs",
    "unpack_result", "unpack_status", "wrap_dint", "wrap_int",
]
