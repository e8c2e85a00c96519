"""realdata.make_tiles holds a lock on the tiles folder: a second process started on the same --runs (the ablation
split with --attentions) waits for the first one's tiles instead of writing them at the same time."""

from __future__ import annotations

import fcntl
import json
import threading

from models import tiles
from models.experiments import realdata
from models.tiles import MANIFEST_NAME


def test_make_tiles_waits_for_the_lock_then_finds_the_tiles(mt_like, tiny_protocol, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    data_root = mt_like.parent
    lock_path = runs / "tiles" / realdata.TILES_LOCK
    lock_path.parent.mkdir(parents=True)
    writes = []
    real_write = tiles.write_tiles

    def counting_write(*args, **kwargs):
        writes.append(args[1])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(tiles, "write_tiles", counting_write)
    errors = []

    def second_process():
        try:
            realdata.make_tiles(runs, data_root, "magnetic-tile", "mask")
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    with lock_path.open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process is cutting the tiles
        t = threading.Thread(target=second_process)
        t.start()
        t.join(timeout=3.0)
        assert t.is_alive(), "make_tiles went ahead while another process held the tiles lock"
        assert writes == []
        assert not (realdata.tiles_dir(runs, "magnetic-tile", "mask", "train") / MANIFEST_NAME).exists()
    t.join(timeout=120)
    assert not t.is_alive() and errors == []
    assert [p.name for p in writes] == ["train", "test"]
    for part in ("train", "test"):
        manifest = json.loads((realdata.tiles_dir(runs, "magnetic-tile", "mask", part) / MANIFEST_NAME).read_text())
        assert manifest["images"]

    # a later process (or the waiting one, had the first finished the cut) finds the tiles and writes nothing
    realdata.make_tiles(runs, data_root, "magnetic-tile", "mask")
    assert len(writes) == 2
