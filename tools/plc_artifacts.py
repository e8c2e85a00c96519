"""Check or regenerate what is derived from the PLC interface table outside the runtime package.

    python tools/plc_artifacts.py --check     # exit 1 when docs/ or deploy/plc/ disagree with LAYOUT
    python tools/plc_artifacts.py --write     # regenerate them

The table is :data:`service.plc.layout.LAYOUT`. From it come the layout table in docs/plc-interface.md
(between DOCS_BEGIN and DOCS_END) and the TIA Portal external sources deploy/plc/VisionInterface.udt and
deploy/plc/DB100_Vision.db. The check also verifies that LAYOUT's offsets are what TIA Portal assigns in
a non-optimised ("standard") DB (:func:`classic_layout`). A repository tool: it reads and writes files of
the repository checkout, so it lives outside the installed ``service`` package.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root, for `service` without an install
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.plc.layout import DB_SIZE, DEFAULT_DB, LAYOUT, S7_TYPE_SIZES  # noqa: E402

UDT_NAME = "VisionInterface"
DB_NAME = "Vision"

DOCS_BEGIN = "<!-- BEGIN LAYOUT: generated from service/plc/layout.py LAYOUT by `python tools/plc_artifacts.py --write` -->"
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


_GENERATED = ("// Generated from service/plc/layout.py LAYOUT by `python tools/plc_artifacts.py --write`; "
              "do not edit by hand.")


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
            problems.append(f"{path} is missing; run `python tools/plc_artifacts.py --write`")
        elif p.read_text(encoding="utf-8") != want:
            problems.append(f"{path} differs from LAYOUT; run `python tools/plc_artifacts.py --write` and review the diff")
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
                problems.append(f"{DOCS_PATH}: the layout table differs from LAYOUT; run `python tools/plc_artifacts.py --write`")
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tools/plc_artifacts.py",
                                description="Check or regenerate docs/plc-interface.md's table and deploy/plc/ "
                                            "from the LAYOUT in service/plc/layout.py.")
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
