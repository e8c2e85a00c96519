"""Synthetic frames replayed through the real pylon camera emulator come back bit-exact, in sorted order.

pypylon's emulation transport layer is enabled by PYLON_CAMEMU; it is read each time the TlFactory
enumerates devices (checked with pypylon 26.9: setting it after ``import pypylon`` and even after
``TlFactory.GetInstance()`` works, as long as it is set before ``EnumerateDevices``). The emulator
replays *every* entry of the ImageFilename folder in sorted name order and fails a grab on anything
that is not an image (a manifest, a masks/ subfolder): hence synth's separate frames/ folder.
"""

import cv2
import numpy as np
import pytest

from service.sim.synth import write_dataset

pylon = pytest.importorskip("pypylon.pylon")


@pytest.fixture()
def emulated_camera(monkeypatch):
    monkeypatch.setenv("PYLON_CAMEMU", "1")
    factory = pylon.TlFactory.GetInstance()
    devices = [d for d in factory.EnumerateDevices() if d.GetDeviceClass() == "BaslerCamEmu"]
    if not devices:
        pytest.skip("the pylon camera emulator is not available")
    camera = pylon.InstantCamera(factory.CreateDevice(devices[0]))
    camera.Open()
    try:
        yield camera
    finally:
        if camera.IsGrabbing():
            camera.StopGrabbing()
        camera.Close()


def test_emulator_replays_synth_frames_bit_exact_in_order(tmp_path, emulated_camera):
    """Frames from write_dataset, replayed by the emulator at 2448x2048 Mono8 with a software trigger,
    arrive identical to the PNGs, in part order, and the replay wraps around to the first frame."""
    rows = write_dataset(tmp_path, 4, seed=3, mix="good=1,dirt=1,scratch=1,ec=1")
    expected = [cv2.imread(str(tmp_path / r["file"]), cv2.IMREAD_UNCHANGED) for r in rows]
    cam = emulated_camera
    assert (cam.Width.GetMax(), cam.Height.GetMax()) >= (2448, 2048)
    cam.Width.SetValue(2448)  # the emulator starts at 1024x1040: set the size before StartGrabbing
    cam.Height.SetValue(2048)
    cam.PixelFormat.SetValue("Mono8")
    cam.TestImageSelector.SetValue("Off")
    cam.ImageFileMode.SetValue("On")
    cam.ImageFilename.SetValue(str(tmp_path / "frames"))
    cam.TriggerSelector.SetValue("FrameStart")
    cam.TriggerMode.SetValue("On")
    cam.TriggerSource.SetValue("Software")
    cam.StartGrabbing(pylon.GrabStrategy_OneByOne)
    got = []
    for _ in range(len(expected) + 1):
        cam.WaitForFrameTriggerReady(5000, pylon.TimeoutHandling_ThrowException)
        cam.ExecuteSoftwareTrigger()
        result = cam.RetrieveResult(5000, pylon.TimeoutHandling_ThrowException)
        try:
            assert result.GrabSucceeded(), result.GetErrorDescription()
            got.append(result.GetArray().copy())
        finally:
            result.Release()
    cam.StopGrabbing()
    for i, image in enumerate(got):
        want = expected[i % len(expected)]
        assert image.shape == (2048, 2448) and image.dtype == np.uint8
        assert np.array_equal(image, want), f"grab {i} is not {rows[i % len(rows)]['file']}"
