"""The camera: a Basler through pypylon (or pylon's camera emulator), grabbing on its own thread.

    cam = Camera(settings.camera, on_event=handle, metrics=metrics).start()
    cam.trigger(part_id=1234)          # camera.trigger = "software": one frame per call
    ...                                # handle(Frame | GrabFailure) runs on the grab thread
    cam.close()

device.py: PylonDevice, the Device protocol, RawGrab; grabber.py: Camera, GrabFailure, frame pairing.
The design (events, pairing, timeouts, recovery, configuration order) is in docs/camera.md.
pypylon is imported lazily, inside PylonDevice, so importing this package is cheap.
"""

from service.camera.device import EMULATOR_CLASS, NO_BLOCK_ID, Device, PylonDevice, RawGrab
from service.camera.grabber import (
    POLL_MS,
    TIMEOUTS_BEFORE_RECONNECT,
    Camera,
    CameraEvent,
    GrabFailure,
    backoff_delays,
)

__all__ = ["EMULATOR_CLASS", "NO_BLOCK_ID", "POLL_MS", "TIMEOUTS_BEFORE_RECONNECT", "Camera", "CameraEvent",
           "Device", "GrabFailure", "PylonDevice", "RawGrab", "backoff_delays"]
