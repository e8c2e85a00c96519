"""The embedded demo line's frames: synthetic valves rendered once into the cache directory."""

from __future__ import annotations

import os
import time
from pathlib import Path

from service.logs import get_logger

log = get_logger(__name__)


def demo_frames(parts: int = 24, seed: int = 20261124) -> tuple[Path, list[str]]:
    """Synthetic frames for the embedded demo, rendered once into the cache directory."""
    from service.sim.synth import write_dataset

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "valve-inspect" / "demo"
    out = base / f"seed{seed}-n{parts}"
    manifest = out / "manifest.jsonl"
    if not manifest.is_file():
        log.info("demo_rendering_frames", parts=parts, seed=seed, out=str(out))
        t0 = time.monotonic()
        tmp = base / f".tmp-{os.getpid()}"
        write_dataset(tmp, parts=parts, seed=seed, overwrite=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.replace(out)
        log.info("demo_frames_ready", seconds=round(time.monotonic() - t0, 1), out=str(out))
    from service.sim.plc_sim import load_manifest

    return out / "frames", load_manifest(manifest)


def bmp_frames(png_dir: Path) -> Path:
    """The demo frames as uncompressed BMP files beside ``png_dir`` (written once, then reused).

    The emulator decodes the replayed file on every trigger, on the same CPU cores as the daemon: a
    2448 x 2048 PNG costs it several times a BMP. A real camera's frame arrives by DMA with no decode, so
    BMP replay is the closer stand-in for the line (the embedded demo and ``valve-inspect bench`` replay BMP;
    ``bench --frames png`` measures with the decode). Each file appears whole (written beside the folder,
    then renamed into it), so a daemon replaying the folder never reads a half-written frame.
    """
    import cv2

    out = png_dir.parent / "frames-bmp"
    pngs = sorted(png_dir.glob("*.png"))
    want = [out / (f.stem + ".bmp") for f in pngs]
    if not all(_whole_bmp(f) for f in want):
        out.mkdir(parents=True, exist_ok=True)
        for src, dst in zip(pngs, want, strict=True):
            if _whole_bmp(dst):
                continue
            image = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
            try:
                ok, data = cv2.imencode(".bmp", image) if image is not None else (False, None)
            except cv2.error:
                ok = False
            if not ok:
                raise OSError(f"cannot convert {src} to {dst}: delete {png_dir.parent} to render the demo again")
            tmp = out.parent / f".{dst.name}.{os.getpid()}.tmp"
            try:
                tmp.write_bytes(data.tobytes())
                os.replace(tmp, dst)
            finally:
                tmp.unlink(missing_ok=True)
    return out


def _whole_bmp(path: Path) -> bool:
    """Whether ``path`` is a BMP file as long as its header says (a copy cut short is written again)."""
    try:
        with path.open("rb") as f:
            head = f.read(6)
        return head[:2] == b"BM" and int.from_bytes(head[2:6], "little") == path.stat().st_size
    except OSError:
        return False
