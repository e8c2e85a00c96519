"""service.logs: one JSON object per line, also when structlog and the standard library's logging (python-snap7's
records) write from different threads at once."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time

import structlog

from service.logs import configure_logging, get_logger


class YieldingStream:
    """A text stream that lets other threads run inside each write (as a file's buffer does when it blocks on the
    disk or a full pipe): what a line writer must not depend on."""

    def __init__(self, f):
        self.f = f

    def write(self, text: str) -> int:
        time.sleep(0)
        n = self.f.write(text)
        time.sleep(0)
        return n

    def flush(self) -> None:
        self.f.flush()

    def isatty(self) -> bool:
        return False


def test_lines_from_structlog_and_stdlib_threads_never_interleave(tmp_path):
    """Two threads log at once, one through structlog (the daemon's own events), one through the standard library
    (as python-snap7 does on another thread): every line of the file is one whole JSON object and none is lost.
    (A CI run caught `{...plc_result_dropped...}{"event": "S7Client initialized ...}` on one line when the two
    wrote the message and its newline in separate calls under separate locks.)"""
    n = 3000
    path = tmp_path / "daemon.log"
    switch = sys.getswitchinterval()
    with path.open("w", encoding="utf-8") as f:
        out = YieldingStream(f)
        configure_logging("info", "json", stream=out)
        sys.setswitchinterval(1e-6)  # threads switch as often as the interpreter allows: the race shows every run
        try:
            ours, theirs = get_logger("service.plc"), logging.getLogger("snap7.client")
            start = threading.Barrier(2)

            def write_ours():
                start.wait()
                for i in range(n):
                    ours.warning("plc_result_dropped", part_id=i, reason="link_down")

            def write_theirs():
                start.wait()
                for i in range(n):
                    theirs.info("Disconnected from 127.0.0.1:%d", i)

            threads = [threading.Thread(target=write_ours), threading.Thread(target=write_theirs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            sys.setswitchinterval(switch)
            configure_logging("info", "json")  # back to stdout for the tests after this one
            structlog.reset_defaults()
            configure_logging("info", "json")
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""  # the file ends with a newline
    events = [json.loads(line) for line in lines[:-1]]  # raises on a broken line (two objects, or an empty line)
    assert sum(e["event"] == "plc_result_dropped" for e in events) == n
    assert sum(e["event"].startswith("Disconnected from") for e in events) == n
    assert sorted(e["part_id"] for e in events if "part_id" in e) == list(range(n))
