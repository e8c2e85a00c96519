"""The camera's device layer: a Basler opened through pypylon, configured and grabbing (docs/camera.md).

:class:`PylonDevice` implements :class:`Device`, what service.camera.grabber.Camera needs from a device (a
test double implements it too); :class:`RawGrab` is one retrieved buffer. pypylon is imported inside
PylonDevice, so importing this module is cheap.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from service.errors import CameraError, ConfigError, GrabTimeout
from service.logs import get_logger

if TYPE_CHECKING:
    from service.config import CameraSettings

log = get_logger("service.camera")  # one logger name for the camera (as before the split)

EMULATOR_CLASS = "BaslerCamEmu"
#: The BlockID pylon reports where the transport has none.
NO_BLOCK_ID = 2**64 - 1


@dataclass(frozen=True)
class RawGrab:
    """One retrieved buffer, copied out of pylon's buffer pool (the device layer's result)."""

    ok: bool
    image: np.ndarray | None
    block_id: int
    timestamp: int = 0
    error_code: int = 0
    description: str = ""
    #: what the device reported: pixel format name, and the bytes the buffer holds (None: not reported)
    pixel_format: str = "Mono8"
    payload_size: int | None = None


class Device(Protocol):
    """What Camera needs from an opened, configured, grabbing device (PylonDevice, or a test double)."""

    info: dict[str, str]

    def retrieve(self, timeout_ms: int) -> RawGrab | None: ...  # None: nothing within timeout_ms
    def trigger(self, timeout_ms: int) -> None: ...  # GrabTimeout: not ready, did not fire
    def resync(self) -> None: ...  # stop the stream (queued buffers discarded), start a new one
    def is_removed(self) -> bool: ...
    def get_feature(self, name: str) -> Any: ...
    def set_feature(self, name: str, value: Any) -> None: ...
    def execute(self, name: str) -> None: ...
    def close(self) -> None: ...


def _short(exc: BaseException) -> str:
    """GenICam messages end in ': XxxException thrown in node ... (file ..., line ...)'; keep the reason."""
    text = str(exc).strip()
    head = text.split(" : ", 1)[0].strip()
    return head or text


class PylonDevice:
    """An InstantCamera opened, configured from CameraSettings and grabbing (GrabStrategy_OneByOne).

    Raises (from the constructor):
        CameraError: no matching camera, or it cannot be opened / started.
        ConfigError: the camera rejects the configuration (names the key and the fix).
    """

    def __init__(self, settings: CameraSettings) -> None:
        if settings.source == "emulator" and not os.environ.get("PYLON_CAMEMU"):
            os.environ["PYLON_CAMEMU"] = "1"  # before the transport layer enumerates
        from pypylon import genicam, pylon

        self._pylon, self._genicam = pylon, genicam
        self.settings = settings
        self._names: dict[str, str] | None = None
        tl = pylon.TlFactory.GetInstance()
        dev_info = self._find(tl)
        self.info = {"model": dev_info.GetModelName(), "serial": dev_info.GetSerialNumber(),
                     "device_class": dev_info.GetDeviceClass()}
        try:
            self.cam = pylon.InstantCamera(tl.CreateDevice(dev_info))
            # No default configuration: pylon's AcquireContinuousConfiguration would overwrite the pfs file.
            self.cam.RegisterConfiguration(pylon.ConfigurationEventHandler(), pylon.RegistrationMode_ReplaceAll,
                                           pylon.Cleanup_Delete)
            self.cam.Open()
        except genicam.GenericException as exc:
            raise CameraError(f"cannot open camera {self.info['model']} ({self.info['serial']}): {_short(exc)}; "
                              "is another program (pylon Viewer) using it?") from None
        try:
            self._configure()
            self.cam.StartGrabbing(pylon.GrabStrategy_OneByOne, pylon.GrabLoop_ProvidedByUser)
        except genicam.GenericException as exc:
            self.close()
            raise CameraError(f"cannot start grabbing on {self.info['model']} ({self.info['serial']}): "
                              f"{_short(exc)}") from None
        except BaseException:
            self.close()
            raise

    def _find(self, tl: Any) -> Any:
        s = self.settings
        devices = list(tl.EnumerateDevices())
        emulator = s.source == "emulator"
        found = [d for d in devices if (d.GetDeviceClass() == EMULATOR_CLASS) == emulator]
        if s.serial:
            found = [d for d in found if d.GetSerialNumber() == s.serial]
        if found:
            return found[0]
        seen = ", ".join(f"{d.GetModelName()} ({d.GetSerialNumber()})" for d in devices) or "none"
        what = "camera emulator" if emulator else "Basler camera"
        which = f" with serial {s.serial!r}" if s.serial else ""
        fix = (f"the emulator needs PYLON_CAMEMU >= 1 (it is {os.environ.get('PYLON_CAMEMU')!r})" if emulator
               else "check power and cable, the network adapter's IP settings (pylon IP Configurator) and "
                    "camera.serial")
        raise CameraError(f"no {what}{which} found (cameras seen: {seen}); {fix}")

    # ---------------------------------------------------------------------------------- features

    def _lookup(self, name: str, key: str) -> Any:
        nm = self.cam.GetNodeMap()
        node = nm.GetNode(name)
        if node is not None and node.IsValid():
            return node
        if self._names is None:
            self._names = {}
            for n in nm.GetNodes():
                real = n.GetNode().GetName()
                self._names.setdefault(real.lower(), real)
        real = self._names.get(name.lower())
        if real is not None:
            return nm.GetNode(real)
        close = difflib.get_close_matches(name, list(self._names.values()), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{key}: the camera ({self.info['model']}) has no feature named {name!r}{hint} "
                          "(check the name in pylon Viewer's feature tree, or remove it)")

    def _set(self, name: str, value: Any, key: str) -> None:
        genicam = self._genicam
        node = self._lookup(name, key)
        iface = node.GetNode().GetPrincipalInterfaceType()
        if not genicam.IsWritable(node):
            raise ConfigError(f"{key}: the camera's {name} is not writable now (read-only, or locked by another "
                              "feature such as an Auto mode or a selector); remove it or unlock it first")
        kinds = {genicam.intfIInteger: "an integer", genicam.intfIFloat: "a number", genicam.intfIBoolean:
                 "true/false", genicam.intfIEnumeration: "one of " + ", ".join(self._symbolics(node)),
                 genicam.intfIString: "a string", genicam.intfICommand: "true (executes the command)"}
        wrong = ConfigError(f"{key} = {value!r}: {name} takes {kinds.get(iface, 'no value')}")
        try:
            if iface == genicam.intfICommand:
                if value is not True and value is not False:
                    raise wrong
                if value:
                    node.Execute()
            elif isinstance(value, str):
                node.FromString(value)
            elif iface == genicam.intfIInteger:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise wrong
                node.SetValue(int(value))
            elif iface == genicam.intfIFloat:
                if isinstance(value, bool):
                    raise wrong
                node.SetValue(float(value))
            elif iface == genicam.intfIBoolean:
                if not isinstance(value, bool):
                    raise wrong
                node.SetValue(value)
            else:
                raise wrong
        except genicam.GenericException as exc:
            raise ConfigError(f"{key} = {value!r}: the camera rejected it: {_short(exc)}{self._range(node, iface)}") \
                from None

    def _symbolics(self, node: Any) -> list[str]:
        try:
            return list(node.GetSymbolics())
        except Exception:
            return []

    def _range(self, node: Any, iface: Any) -> str:
        g = self._genicam
        try:
            if iface == g.intfIInteger:
                return f" (allowed {node.GetMin()}..{node.GetMax()}, step {node.GetInc()})"
            if iface == g.intfIFloat:
                return f" (allowed {node.GetMin()}..{node.GetMax()})"
            if iface == g.intfIEnumeration:
                return f" (one of {', '.join(self._symbolics(node))})"
        except Exception:
            pass
        return ""

    def _has(self, name: str) -> bool:
        node = self.cam.GetNodeMap().GetNode(name)
        return node is not None and node.IsValid() and self._genicam.IsAvailable(node)

    def _configure(self) -> None:
        s, pylon, genicam = self.settings, self._pylon, self._genicam
        if s.pfs_file:
            try:
                pylon.FeaturePersistence.Load(s.pfs_file, self.cam.GetNodeMap(), True)
            except genicam.GenericException as exc:
                raise ConfigError(f"camera.pfs_file: {s.pfs_file} cannot be loaded into {self.info['model']}: "
                                  f"{_short(exc)} (save it from this camera model in pylon Viewer)") from None
        self._geometry()
        if s.source == "emulator":
            if s.images:
                self._set("TestImageSelector", "Off", "camera.images")
                self._set("ImageFileMode", "On", "camera.images")
                self._set("ImageFilename", os.path.abspath(s.images), "camera.images")
            else:
                self._set("ImageFileMode", "Off", "camera.images")
                log.info("camera_emulator_test_pattern", hint="camera.images is empty: the emulator's test image")
        if self._has("AcquisitionMode"):  # a camera's power-on default may be SingleFrame
            self._set("AcquisitionMode", "Continuous", "camera (AcquisitionMode Continuous)")
        self._trigger()
        for name, value in s.features.items():
            self._set(name, value, f"camera.features.{name}")

    def _geometry(self) -> None:
        s = self.settings
        pf = self.cam.GetNodeMap().GetNode("PixelFormat")
        if "Mono8" not in self._symbolics(pf):
            raise ConfigError(f"camera.source: {self.info['model']} has no Mono8 pixel format; valve-inspect needs "
                              "a monochrome camera")
        if pf.ToString() != "Mono8":
            self._set("PixelFormat", "Mono8", "camera (PixelFormat Mono8)")
        for key, name, offset in (("camera.width", "Width", "OffsetX"), ("camera.height", "Height", "OffsetY")):
            value = getattr(s, key.split(".")[1])
            node = self._lookup(name, key)
            if value > node.GetMax() and self._has(offset) and self._genicam.IsWritable(
                    self.cam.GetNodeMap().GetNode(offset)):
                self.cam.GetNodeMap().GetNode(offset).SetValue(0)  # the maximum shrinks with the offset
            if not node.GetMin() <= value <= node.GetMax() or (value - node.GetMin()) % node.GetInc():
                raise ConfigError(f"{key} = {value}: {self.info['model']} allows {node.GetMin()}..{node.GetMax()} "
                                  f"in steps of {node.GetInc()}")
            if node.GetValue() != value:
                self._set(name, value, key)

    def _trigger(self) -> None:
        mode = self.settings.trigger
        key = f"camera.trigger = {mode!r}"
        selectors = self._symbolics(self.cam.GetNodeMap().GetNode("TriggerSelector"))
        if "FrameStart" not in selectors:
            raise ConfigError(f"{key}: the camera has no FrameStart trigger (TriggerSelector: {', '.join(selectors)})")
        for other in ("AcquisitionStart", "FrameBurstStart"):  # only the frame trigger may be active
            if other in selectors:
                self._set("TriggerSelector", other, key)
                self._set("TriggerMode", "Off", key)
        self._set("TriggerSelector", "FrameStart", key)
        if mode == "free-run":
            self._set("TriggerMode", "Off", key)
            return
        self._set("TriggerMode", "On", key)
        if mode == "software":
            self._set("TriggerSource", "Software", key)
        else:
            self._set("TriggerSource", "Line1", key)
            self._set("TriggerActivation", "RisingEdge", key)

    # ------------------------------------------------------------------------------------ grabbing

    def retrieve(self, timeout_ms: int) -> RawGrab | None:
        res = self.cam.RetrieveResult(int(timeout_ms), self._pylon.TimeoutHandling_Return)
        if res is None or not res.IsValid():
            return None
        try:
            block_id = int(res.GetBlockID())
            if res.GrabSucceeded():
                # The camera's own word on the buffer; Camera._deliver checks it against the settings.
                pixel_type = res.GetPixelType()
                name = "Mono8" if pixel_type == self._pylon.PixelType_Mono8 else f"pixel type 0x{pixel_type:08X}"
                image = res.GetArray()  # a copy: the buffer goes back to pylon below
                return RawGrab(True, image, block_id, int(res.GetTimeStamp()), pixel_format=name,
                               payload_size=int(res.GetPayloadSize()))
            return RawGrab(False, None, block_id, int(res.GetTimeStamp()), int(res.GetErrorCode()),
                           str(res.GetErrorDescription()).strip())
        finally:
            res.Release()

    def trigger(self, timeout_ms: int) -> None:
        pylon = self._pylon
        try:
            if not self.cam.WaitForFrameTriggerReady(int(timeout_ms), pylon.TimeoutHandling_Return):
                raise GrabTimeout(f"camera not ready for a trigger within {timeout_ms} ms (exposure or readout "
                                  "of the previous frame still running: parts come faster than the camera)")
            self.cam.ExecuteSoftwareTrigger()
        except self._genicam.GenericException as exc:
            raise CameraError(f"software trigger failed: {_short(exc)}") from None

    def resync(self) -> None:
        """StopGrabbing (AcquisitionStop; queued and in-transfer buffers are cancelled and freed), StartGrabbing."""
        pylon = self._pylon
        try:
            self.cam.StopGrabbing()
            self.cam.StartGrabbing(pylon.GrabStrategy_OneByOne, pylon.GrabLoop_ProvidedByUser)
        except self._genicam.GenericException as exc:
            raise CameraError(f"cannot restart grabbing: {_short(exc)}") from None

    def is_removed(self) -> bool:
        return bool(self.cam.IsCameraDeviceRemoved())

    def get_feature(self, name: str) -> Any:
        node = self._lookup(name, name)
        return node.GetValue() if hasattr(node, "GetValue") else node.ToString()

    def set_feature(self, name: str, value: Any) -> None:
        self._set(name, value, name)

    def execute(self, name: str) -> None:
        self._set(name, True, name)

    def close(self) -> None:
        cam = getattr(self, "cam", None)
        if cam is None:
            return
        self.cam = None
        for step in ("StopGrabbing", "Close", "DestroyDevice"):
            try:
                getattr(cam, step)()
            except Exception as exc:  # a removed device throws here; nothing left to do about it
                log.debug("camera_close_step_failed", step=step, error=_short(exc))
