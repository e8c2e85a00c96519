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
