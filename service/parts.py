"""One result per PartId: the open parts, their deadlines, and the exactly-once hand-out.

    PLC announces PartId -> PartBook.announce -> (frame arrives) frame_arrived -> claim | expired | drain

Whoever claims a part first (inspection, camera failure, overflow, timeout or shutdown) answers it;
a later claim gets None and is counted in ``late``. The daemon (service.app) is the only user.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class OpenPart:
    """A PartId the PLC announced that has no result yet (times: time.monotonic())."""

    part_id: int
    announced: float
    deadline: float
    frame_id: int = 0
    arrival: float | None = None


class PartBook:
    """Open parts by PartId; ``claim`` hands each one out exactly once.

    A part's deadline is ``timeout_s`` after it was announced; once its frame arrived it gets
    ``timeout_s`` more for the inspection. ``expired`` claims the overdue ones.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._open: OrderedDict[int, OpenPart] = OrderedDict()
        self._lock = threading.Lock()
        self.duplicates = 0
        self.late = 0

    def announce(self, part_id: int, at: float) -> bool:
        with self._lock:
            if part_id in self._open:
                self.duplicates += 1
                return False
            self._open[part_id] = OpenPart(part_id, at, at + self.timeout_s)
            return True

    def frame_arrived(self, part_id: int, arrival: float, frame_id: int) -> bool:
        with self._lock:
            p = self._open.get(part_id)
            if p is None or p.arrival is not None:
                return False
            p.arrival, p.frame_id = arrival, frame_id
            p.deadline = max(p.deadline, arrival + self.timeout_s)
            return True

    def oldest_without_frame(self) -> int | None:
        """The oldest announced part still waiting for its frame (diagnostics)."""
        with self._lock:
            for p in self._open.values():
                if p.arrival is None:
                    return p.part_id
            return None

    def time_left(self, part_id: int, now: float) -> float | None:
        """Seconds until the open part's deadline (negative when overdue), None when it is closed."""
        with self._lock:
            p = self._open.get(part_id)
            return None if p is None else p.deadline - now

    def waiting_for_frame(self, part_id: int) -> bool:
        with self._lock:
            p = self._open.get(part_id)
            return p is not None and p.arrival is None

    def claim(self, part_id: int) -> OpenPart | None:
        with self._lock:
            p = self._open.pop(part_id, None)
            if p is None:
                self.late += 1
            return p

    def expired(self, now: float) -> list[OpenPart]:
        with self._lock:
            out = [p for p in self._open.values() if p.deadline <= now]
            for p in out:
                del self._open[p.part_id]
            return out

    def drain(self) -> list[OpenPart]:
        with self._lock:
            out = list(self._open.values())
            self._open.clear()
            return out

    def __len__(self) -> int:
        with self._lock:
            return len(self._open)
