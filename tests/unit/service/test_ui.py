"""service.ui: the live view's HTTP API on a real server (port 0), fed like the daemon feeds it."""

import json
import threading
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

from service import ui as ui_mod
from service.config import load_config
from service.errors import ConfigError
from service.records import Verdict
from service.roi import extract
from service.sim.synth import Pose, render_part
from service.ui import REJECTS, LiveParts, start_ui
from tests.helpers.daemon_fixtures import run_cli

STATUS = {"parts": {"accept": 3, "reject": 1, "no_part": 0, "not_inspected": 0}, "camera_connected": True,
          "plc_connected": False, "provider": "CPUExecutionProvider", "gpu": False}


class _Pred:
    def __init__(self, saliency):
        self.saliency = saliency


@pytest.fixture(scope="module")
def part():
    """A synthetic frame with a valve, its SliceBatch, saliency and a mask on slice 2."""
    img, _, _ = render_part(np.random.default_rng([5, 2]), "dirt", pose=Pose(1224.0, 1024.0, 772.0, 386.0, -2.0))
    batch = extract(img)
    sal = np.zeros((8, 192, 192), np.float32)
    sal[2, 50:140, 50:140] = 1.0
    masks = np.zeros((8, 192, 192), bool)
    masks[2, 80:110, 80:110] = True
    return img, {"batch": batch, "pred": _Pred(sal), "masks": masks}


def reject(part_id: int) -> Verdict:
    return Verdict(part_id=part_id, frame_id=part_id + 100, reject_dirt=True, score_dirt=0.93, dirt_area_px=900,
                   reason="dirt on slice(s) [2]",
                   extra={"slices": [{"class": "dirt" if i == 2 else "good", "p": 0.93 if i == 2 else 0.99}
                                     for i in range(8)]})


@pytest.fixture
def served():
    parts = LiveParts()
    server = start_ui("127.0.0.1", 0, parts, lambda: dict(STATUS))
    yield parts, server
    server.stop()


def get(url: str, headers: dict | None = None, method: str = "GET"):
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_status_page_and_latest_image(served, part):
    """/ is the HTML page; /api/status has counts, health, provider and the last part with its per-slice
    classes; /api/parts/latest.jpg is the part's ROI overlay as a JPEG, encoded once per part."""
    parts, server = served
    code, _, body = get(server.url + "api/parts/latest.jpg")
    assert code == 404  # nothing inspected yet
    img, extras = part
    parts.put(reject(7), img, extras)
    code, headers, page = get(server.url)
    assert code == 200 and headers["Content-Type"].startswith("text/html") and b"/api/status" not in page
    assert b"api/status" in page and b"api/parts/latest.jpg" in page
    code, _, body = get(server.url + "api/status")
    st = json.loads(body)
    assert code == 200 and st["parts"] == STATUS["parts"] and st["camera_connected"] is True
    assert st["plc_connected"] is False and st["provider"] == "CPUExecutionProvider"
    last = st["last_part"]
    assert (last["part_id"], last["verdict"], last["defects"]) == (7, "reject", ["dirt"])
    assert last["scores"]["dirt"] == pytest.approx(0.93) and last["time"].endswith("+00:00")
    assert [s["class"] for s in last["slices"]] == ["good", "good", "dirt"] + ["good"] * 5
    code, headers, jpg = get(server.url + "api/parts/latest.jpg?part=1")
    assert code == 200 and headers["Content-Type"] == "image/jpeg" and headers["X-Part-Id"] == "7"
    decoded = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
    x0, y0, x1, y1 = extras["batch"].bounding_box(0.25)
    scale = min(1.0, ui_mod.LATEST_MAX_SIDE / max(x1 - x0, y1 - y0))  # the ROI crop, downscaled when big
    assert decoded.shape[:2] == (round((y1 - y0) * scale), round((x1 - x0) * scale))
    assert decoded.std() > 10  # not blank
    get(server.url + "api/parts/latest.jpg?part=1")
    assert server.view.cache.encoded == 1
    code, headers, _ = get(server.url + "api/parts/latest.jpg", method="HEAD")
    assert code == 200 and int(headers["Content-Length"]) == len(jpg)


def test_parts_without_a_frame_update_the_status_not_the_image(served, part):
    """A NotInspected part without a frame is the last part in the status; the image stays the last framed one."""
    parts, server = served
    img, extras = part
    parts.put(reject(1), img, extras)
    parts.put(Verdict.make_not_inspected(2, "timeout_no_frame"), None, None)
    st = json.loads(get(server.url + "api/status")[2])
    assert st["last_part"]["part_id"] == 2 and st["last_part"]["has_image"] is False
    assert st["image_part"]["part_id"] == 1
    assert get(server.url + "api/parts/latest.jpg")[1]["X-Part-Id"] == "1"


def test_rejects_are_a_bounded_ring_of_thumbnails(served, part):
    """Only the last REJECTS rejects are held, newest first; each is a small JPEG; accepts are not held."""
    parts, server = served
    img, extras = part
    for i in range(REJECTS + 3):
        parts.put(reject(100 + i), img, extras)
    parts.put(Verdict(part_id=999, accept=True), img, extras)
    st = json.loads(get(server.url + "api/status")[2])
    assert [r["part_id"] for r in st["rejects"]] == [100 + i for i in reversed(range(3, REJECTS + 3))]
    code, headers, thumb = get(server.url + "api/parts/rejects/0.jpg")
    assert code == 200 and headers["X-Part-Id"] == str(100 + REJECTS + 2)
    assert max(cv2.imdecode(np.frombuffer(thumb, np.uint8), cv2.IMREAD_COLOR).shape[:2]) == ui_mod.THUMB_MAX_SIDE
    seq = st["rejects"][3]["seq"]
    assert get(server.url + f"api/parts/rejects/0.jpg?part={seq}")[1]["X-Part-Id"] == str(st["rejects"][3]["part_id"])
    assert get(server.url + f"api/parts/rejects/{REJECTS}.jpg")[0] == 404


def test_read_only(served):
    """Anything but GET and HEAD is 405 with Allow: GET, HEAD."""
    _, server = served
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        code, headers, _ = get(server.url + "api/status", method=method)
        assert code == 405 and headers["Allow"] == "GET, HEAD", method
    assert get(server.url + "nope")[0] == 404


def test_token_is_checked_on_every_request(part):
    """With a token, requests without it (or with a wrong one) get 401; Bearer header or ?token= pass."""
    parts = LiveParts()
    img, extras = part
    parts.put(reject(3), img, extras)
    server = start_ui("127.0.0.1", 0, parts, lambda: dict(STATUS), token="s3cret-token")
    try:
        for path in ("", "api/status", "api/parts/latest.jpg", "api/parts/rejects/0.jpg"):
            code, headers, _ = get(server.url + path)
            assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer"), path
            assert get(server.url + path + "?token=wrong")[0] == 401
            assert get(server.url + path, {"Authorization": "Bearer s3cret-token"})[0] == 200, path
            assert get(server.url + path + "?token=s3cret-token")[0] == 200, path
        assert get(server.url + "api/status", {"Authorization": "Bearer s3cret-token"}, method="POST")[0] == 405
    finally:
        server.stop()


def test_put_never_waits_for_a_slow_encode(served, part, monkeypatch):
    """While the view is drawing a part (here: until the 200 puts are done), the pipeline's put returns at once."""
    parts, server = served
    img, extras = part
    real = ui_mod.part_overlay
    drawing, finish, drawn = threading.Event(), threading.Event(), threading.Event()

    def slow(*a, **k):
        drawing.set()
        finish.wait(5.0)  # a put that waited for the drawing would hold the test these 5 s, then fail
        drawn.set()
        return real(*a, **k)

    monkeypatch.setattr(ui_mod, "part_overlay", slow)
    parts.put(reject(1), img, extras)
    t = threading.Thread(target=get, args=(server.url + "api/parts/latest.jpg",))
    t.start()
    assert drawing.wait(10.0)  # the request is inside the encode now
    worst = 0.0
    for i in range(200):
        t0 = time.perf_counter()
        parts.put(reject(10 + i), img, extras)
        worst = max(worst, time.perf_counter() - t0)
    assert not drawn.is_set(), "a put waited until the drawing ended"  # every put ran while it was drawn
    finish.set()
    t.join()
    assert worst < 0.01, worst
    assert parts.latest().verdict.part_id == 209


def test_binding_beyond_loopback_needs_a_token():
    """[ui] host beyond loopback without a token is a ConfigError naming ui.token; with one it loads; a loopback
    host needs none; environment overrides work like every key."""
    with pytest.raises(ConfigError, match=r"ui\.token: is empty but host = '0\.0\.0\.0'"):
        load_config(None, env={"VALVE_INSPECT_UI__HOST": "0.0.0.0"})
    s = load_config(None, env={"VALVE_INSPECT_UI__HOST": "0.0.0.0", "VALVE_INSPECT_UI__TOKEN": "t" * 32,
                               "VALVE_INSPECT_UI__PORT": "9200"})
    assert (s.ui.host, s.ui.port, s.ui.token) == ("0.0.0.0", 9200, "t" * 32)
    assert load_config(None, env={"VALVE_INSPECT_UI__HOST": "::1"}).ui.token == ""
    s = load_config(None, env={})
    assert (s.ui.enabled, s.ui.host, s.ui.port) == (True, "127.0.0.1", 9109)


def test_run_refuses_to_start_without_a_token_beyond_loopback(tmp_path):
    """`valve-inspect run` with the live view on 0.0.0.0 and no token exits 2 naming ui.token, and
    check-config never prints a token that is set."""
    from tests.helpers.daemon_fixtures import clean_env

    proc = run_cli("run", "--duration", "5", env=clean_env(VALVE_INSPECT_UI__HOST="0.0.0.0"), timeout=60)
    assert proc.returncode == 2 and "ui.token" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    proc = run_cli("check-config", env=clean_env(VALVE_INSPECT_UI__HOST="0.0.0.0", VALVE_INSPECT_UI__TOKEN="hush"))
    assert proc.returncode == 0 and "hush" not in proc.stdout and 'token = "<hidden>"' in proc.stdout
