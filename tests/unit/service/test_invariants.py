"""The safety invariants, each made to fail: every forbidden case is constructed and must be refused.

* Verdict (service.records): exactly one kind (accept | reject bit(s) | no_part | not_inspected), never
  Accept with anything else, through every constructor path: ``Verdict(...)``, ``dataclasses.replace`` of a
  valid verdict (including those of the ``make_*`` helpers and of ``service.decide``).
* pack_result (service.plc): a record that slipped past Verdict's check (fields set behind its back) is
  refused before any byte reaches the PLC.
* PartBook (service.parts): under threads racing claim / expired / drain, each PartId has exactly one winner.
* Never Accept uninspected (service.decide._check, service.app's worker): a part whose inspection was
  incomplete or raised is NotInspected.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import sys
import threading
import time

import numpy as np
import pytest

from service.decide import decide
from service.parts import PartBook
from service.plc import pack_result
from service.records import Prediction, Verdict
from tests.helpers.daemon_doubles import FakeModel, drain_worker, frame, make_daemon, part_event
from tests.helpers.daemon_fixtures import wait_until

pytestmark = pytest.mark.timeout(60)

REJECT_BITS = ("reject_dirt", "reject_scratch", "reject_ec", "reject_unknown")
KIND_BITS = ("accept", *REJECT_BITS, "no_part", "not_inspected")
CLASSES = ("good", "dirt", "scratch", "ec")
SEG = np.array([False, True, True, False])
TH = {"dirt": 0.5, "scratch": 0.5, "ec": 0.5}


def _kinds(bits: dict[str, bool]) -> int:
    return sum([bits["accept"], any(bits[b] for b in REJECT_BITS), bits["no_part"], bits["not_inspected"]])


#: every assignment of the 7 verdict bits (2**7 = 128), split into the allowed and the forbidden ones
ALL_BITS = [dict(zip(KIND_BITS, combo, strict=True)) for combo in itertools.product((False, True), repeat=7)]
FORBIDDEN = [b for b in ALL_BITS if _kinds(b) != 1]
ALLOWED = [b for b in ALL_BITS if _kinds(b) == 1]
#: the named cases of the issue, each also among FORBIDDEN
NAMED = {
    "accept+reject_dirt": dict(accept=True, reject_dirt=True),
    "accept+reject_unknown": dict(accept=True, reject_unknown=True),
    "accept+no_part": dict(accept=True, no_part=True),
    "accept+not_inspected": dict(accept=True, not_inspected=True),
    "no kind at all": dict(),
    "no_part+not_inspected": dict(no_part=True, not_inspected=True),
    "reject_ec+not_inspected": dict(reject_ec=True, not_inspected=True),
    "reject_scratch+no_part": dict(reject_scratch=True, no_part=True),
}


def _label(bits: dict[str, bool]) -> str:
    return "+".join(k for k, v in bits.items() if v) or "none"


def test_the_enumeration_is_what_the_invariant_says():
    """Sanity of the table itself: 4 kinds, 15 ways to reject (any non-empty set of reject bits)."""
    assert len(ALLOWED) == 1 + 15 + 1 + 1
    assert len(FORBIDDEN) == 128 - len(ALLOWED)
    for bits in NAMED.values():
        full = {k: bits.get(k, False) for k in KIND_BITS}
        assert full in FORBIDDEN


@pytest.mark.parametrize("bits", FORBIDDEN, ids=_label)
def test_verdict_constructor_refuses_every_forbidden_combination(bits):
    with pytest.raises(ValueError, match="part 9"):
        Verdict(part_id=9, **bits)


@pytest.mark.parametrize("bits", ALLOWED, ids=_label)
def test_verdict_constructor_takes_every_allowed_combination(bits):
    v = Verdict(part_id=9, **bits)
    assert v.label == ("reject" if any(bits[b] for b in REJECT_BITS) else next(k for k in KIND_BITS if bits[k]))


@pytest.mark.parametrize("name", list(NAMED))
def test_named_forbidden_cases_are_refused_with_the_rule_in_the_message(name):
    """Accept with anything else names that rule; a verdict of no kind or of two non-accept kinds names
    'exactly one'. (Both checks in Verdict.__post_init__ are needed for these messages.)"""
    bits = NAMED[name]
    match = "accept cannot be combined" if bits.get("accept") else "exactly one of accept, reject, no_part"
    with pytest.raises(ValueError, match=match):
        Verdict(part_id=3, **bits)


def _valid_sources() -> dict[str, Verdict]:
    probs = np.full((8, 4), 0.01, dtype=np.float32)
    probs[:, 0] = 0.97
    pred = Prediction(logits=np.log(probs), probs=probs, saliency=np.zeros((8, 8, 8), np.float32), classes=CLASSES)
    accepted = decide(1, 1, pred, None, TH, SEG, inspect_ms=1.0)
    assert accepted.accept
    return {
        "make_not_inspected": Verdict.make_not_inspected(1, "timeout_no_frame"),
        "make_no_part": Verdict.make_no_part(1, "no_valve"),
        "decide_accept": accepted,
        "direct_reject": Verdict(part_id=1, reject_dirt=True),
    }


@pytest.mark.parametrize("source", ["make_not_inspected", "make_no_part", "decide_accept", "direct_reject"])
@pytest.mark.parametrize("name", list(NAMED))
def test_dataclasses_replace_cannot_make_a_forbidden_verdict(source, name):
    """replace() of any valid verdict into a forbidden one is refused (it runs __post_init__ again)."""
    base = _valid_sources()[source]
    change = {k: NAMED[name].get(k, False) for k in KIND_BITS}
    with pytest.raises(ValueError):
        dataclasses.replace(base, **change)


@pytest.mark.parametrize("helper, extra", [(h, e) for h, own in (("make_not_inspected", "not_inspected"),
                                                                    ("make_no_part", "no_part"))
                                            for e in KIND_BITS if e != own])
def test_helper_results_cannot_gain_a_second_kind(helper, extra):
    """A make_* result plus any other kind bit (as a caller patching it would try) is refused."""
    base = getattr(Verdict, helper)(4, "r")
    with pytest.raises(ValueError):
        dataclasses.replace(base, **{extra: True})


@pytest.mark.parametrize("bits", FORBIDDEN, ids=_label)
def test_pack_result_refuses_a_forbidden_record_that_bypassed_verdict(bits):
    """Fields set behind Verdict's back (object.__setattr__, as a buggy caller might) never reach the PLC."""
    v = Verdict.make_not_inspected(5, "x")
    for k in KIND_BITS:
        object.__setattr__(v, k, bits[k])
    with pytest.raises(ValueError, match="exactly one of"):
        pack_result(v, seq=1)


@pytest.mark.parametrize("bits", ALLOWED, ids=_label)
def test_pack_result_packs_every_allowed_record(bits):
    buf = pack_result(Verdict(part_id=5, **bits), seq=1)
    byte24 = buf[24 - 12]
    assert [bool(byte24 >> i & 1) for i in range(7)] == [bits[k] for k in KIND_BITS]


# ------------------------------------------------------------------------------------------- PartBook


def test_partbook_hands_each_part_id_out_exactly_once_under_racing_threads():
    """Claimers, an expirer and a drainer start together on a barrier (the GIL switching every microsecond)
    and race for the same 64 overdue parts, 150 rounds: every PartId has exactly one winner, and every lost
    claim is counted late."""
    n_parts, rounds, n_claimers = 64, 150, 4
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for r in range(rounds):
            book = PartBook(timeout_s=0.0)
            ids = list(range(1000 * r + 1, 1000 * r + 1 + n_parts))
            for pid in ids:
                assert book.announce(pid, at=0.0)
            barrier = threading.Barrier(n_claimers + 2)
            won: dict[str, list[int]] = {}
            errors: list[BaseException] = []

            def claimer(name: str, order: list[int], won=won, barrier=barrier, book=book, errors=errors):
                try:
                    barrier.wait(5)
                    won[name] = [pid for pid in order if book.claim(pid) is not None]
                except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                    errors.append(exc)

            def expirer(won=won, barrier=barrier, book=book, errors=errors):
                try:
                    barrier.wait(5)
                    got = []
                    for _ in range(20):
                        got += [p.part_id for p in book.expired(now=time.monotonic())]
                    won["expired"] = got
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            def drainer(won=won, barrier=barrier, book=book, errors=errors):
                try:
                    barrier.wait(5)
                    won["drain"] = [p.part_id for p in book.drain()]
                except BaseException as exc:  # noqa: BLE001
                    errors.append(exc)

            rng = random.Random(r)
            threads = [threading.Thread(target=claimer, args=(f"claim{i}", rng.sample(ids, len(ids))))
                       for i in range(n_claimers)]
            threads += [threading.Thread(target=expirer), threading.Thread(target=drainer)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            assert not errors, errors
            winners = [pid for got in won.values() for pid in got]
            assert sorted(winners) == ids, f"round {r}: {len(winners)} wins for {n_parts} parts"
            assert len(book) == 0
            claimed = sum(len(v) for k, v in won.items() if k.startswith("claim"))
            assert book.late == n_claimers * n_parts - claimed
    finally:
        sys.setswitchinterval(old)


# ------------------------------------------------------------------------------------------- never Accept uninspected


@pytest.mark.parametrize("n", [0, 1, 7, 9])
def test_decide_never_accepts_a_part_with_missing_or_extra_slices(n):
    """Every slice says good with p 0.97, but there are n != 8 of them: NotInspected (decide._check), not Accept."""
    probs = np.full((n, 4), 0.01, dtype=np.float32)
    probs[:, 0] = 0.97
    pred = Prediction(logits=np.log(probs), probs=probs, saliency=np.zeros((n, 8, 8), np.float32), classes=CLASSES)
    v = decide(11, 2, pred, None, TH, SEG, inspect_ms=1.0)
    assert v.not_inspected and not v.accept
    assert v.reason == f"{n} of 8 slices inspected"


class _ShortModel(FakeModel):
    """Says good with p 0.97 for all but the last slice it was given (a truncated batch)."""

    def run(self, slices):
        return super().run(slices[:-1])


@pytest.mark.parametrize("model, reason", [(_ShortModel(), "7 of 8 slices inspected"),
                                           (FakeModel(error=RuntimeError("CUDA error")), "inspection_error")],
                         ids=["truncated_batch", "inference_raised"])
def test_daemon_never_accepts_a_part_whose_inspection_was_incomplete_or_raised(tmp_path, valve_image, model, reason):
    """Through the daemon's worker: a good valve whose batch came back short, or whose inference raised, is
    published NotInspected with the reason, never Accept."""
    d = make_daemon(tmp_path, model=model)
    d._on_plc_event(part_event(81))
    d._on_camera_event(frame(valve_image, 81))
    drain_worker(d)
    (v,) = d.plc.published
    assert v.part_id == 81 and v.not_inspected and not v.accept and v.reason == reason


def test_daemon_answers_a_part_whose_frame_never_came_not_inspected(tmp_path):
    """A part announced, triggered, and never imaged: once its deadline passes the control loop's expiry
    answers it NotInspected (timeout_no_frame); it is never left open or accepted."""
    d = make_daemon(tmp_path, pipeline={"part_timeout_s": 0.1, "trigger_window_ms": 50})
    t = threading.Thread(target=d._control, daemon=True)
    t.start()
    try:
        d.plc.events.put(part_event(82))
        assert wait_until(lambda: d.plc.published, 5.0)
    finally:
        d.request_stop()
        t.join(2.0)
    (v,) = d.plc.published
    assert v.part_id == 82 and v.not_inspected and not v.accept and v.reason == "timeout_no_frame"
    assert d.camera.triggers == [82] and len(d.book) == 0


def test_make_helpers_carry_frame_id_and_inspect_ms_and_default_them_to_zero():
    """make_no_part / make_not_inspected keep the part, frame and inspection time; unknown ones are 0."""
    for make, kind in ((Verdict.make_no_part, "no_part"), (Verdict.make_not_inspected, "not_inspected")):
        v = make(4, "why", frame_id=7, inspect_ms=3.5)
        assert (v.part_id, v.frame_id, v.inspect_ms, v.reason, v.label) == (4, 7, 3.5, "why", kind)
        d = make(4, "why")
        assert (d.frame_id, d.inspect_ms) == (0, 0.0)
