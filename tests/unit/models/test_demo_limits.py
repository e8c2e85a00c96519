"""tools/demo_limits.py: the demo model's held-out errors split by what the labels cannot say."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tools.demo_limits import main, ring_contrast, summarise


def test_ring_contrast_measures_a_dark_disc_against_its_surround():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(150.0, 5.0, (64, 64)), 0, 255)
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 32) ** 2 + (xx - 32) ** 2 <= 8 ** 2
    img[disc] -= 20.0
    snr, weber = ring_contrast(img.astype(np.uint8), disc)
    assert snr == pytest.approx(20.0 / 5.0, rel=0.2)
    assert weber == pytest.approx(20.0 / 150.0, rel=0.1)
    # the same disc painted at the surface's own gray is invisible
    flat = np.clip(rng.normal(150.0, 5.0, (64, 64)), 0, 255).astype(np.uint8)
    assert ring_contrast(flat, disc)[0] < 0.5
    assert ring_contrast(flat, np.zeros_like(disc)) == (None, None)
    # a ring without spread (the saturated specular band) counts one gray level of noise, not zero
    band = np.full((64, 64), 255, np.uint8)
    band[disc] = 245
    assert ring_contrast(band, disc)[0] == pytest.approx(10.0)


def row(label, pred, px=0, part_class=None, snr=None):
    return {"part": 0, "slice": 0, "part_class": part_class or label, "label": label, "pred": pred,
            "p_label": 0.5, "defect_px": px, "snr": snr, "weber": None}


def test_summary_separates_label_cutoff_faint_and_other_errors():
    slices = ([row("good", "good")] * 6
              + [row("good", "scratch", px=12, part_class="scratch"),   # a scratch's tip below the 40 px label
                 row("good", "dirt", part_class="good"),                 # a false alarm on a good part
                 row("dirt", "good", px=300, snr=0.4),                   # faint dirt missed
                 row("scratch", "good", px=60, snr=2.5),                 # a short scratch piece missed
                 row("dirt", "dirt", px=500, snr=3.0),
                 row("dirt", "scratch", px=1200, snr=5.0)])
    s = summarise(slices)
    assert s["slices"] == 12 and s["errors"] == 5 and s["accuracy"] == pytest.approx(7 / 12)
    assert s["confusion"] == {"good->scratch": 1, "good->dirt": 1, "dirt->good": 1, "scratch->good": 1,
                              "dirt->scratch": 1}
    explained = s["errors_explained"]
    assert explained["good label, 1-39 defect px (the label's cut-off)"] == 1
    assert explained["defect called good, snr < 1 (fainter than the texture)"] == 1
    assert explained["defect label, 40-99 px"] == 1
    flagged = s["good_false_alarms"]
    assert flagged["good parts"] == {"n": 7, "flagged": 1, "as": {"dirt": 1}}
    assert flagged["defect parts, 1-39 defect px (below the label's 40)"]["flagged"] == 1
    assert s["defect_recall_by_px"]["300-999"]["dirt"] == {"n": 2, "found": 1, "called_good": 1}
    assert s["defect_recall_by_snr"]["0-0.5"]["dirt"] == {"n": 1, "found": 0, "called_good": 1}
    # without the slices holding 1-99 defect px (the cut-off one and the 60 px scratch): 7 right of 10
    assert s["accuracy_without_1_99_px_slices"] == pytest.approx(7 / 10)
    assert s["accuracy_without_cutoff_slices"] == pytest.approx(7 / 11)


def test_end_to_end_on_rendered_parts_with_the_shipped_model(tmp_path):
    out = tmp_path / "limits.json"
    assert main(["--work", str(tmp_path / "parts"), "--parts", "3", "--seed", "5", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    manifest = [json.loads(line) for line in (tmp_path / "parts" / "manifest.jsonl").read_text().splitlines()]
    assert len(doc["slices"]) == 8 * len(manifest) == doc["summary"]["slices"]
    assert [s["label"] for s in doc["slices"]] == [lab for m in manifest for lab in m["slice_labels"]]
    assert [s["defect_px"] for s in doc["slices"]] == [px for m in manifest for px in m["slice_defect_px"]]
    right = sum(s["label"] == s["pred"] for s in doc["slices"])
    assert doc["summary"]["accuracy"] == pytest.approx(right / len(doc["slices"]))
    # a second call reuses the rendered parts and gives the same slices
    assert main(["--work", str(tmp_path / "parts"), "--parts", "3", "--seed", "5", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["slices"] == doc["slices"]
