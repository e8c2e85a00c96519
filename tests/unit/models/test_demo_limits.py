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
    # a soft rim 1-2 px outside the mask (a blob's blurred edge) is left out of the surround: the ring starts 2 px out
    soft = img.copy()
    rim = ((yy - 32) ** 2 + (xx - 32) ** 2 <= 10 ** 2) & ~disc
    soft[rim] -= 20.0
    assert ring_contrast(np.clip(soft, 0, 255).astype(np.uint8), disc)[0] == pytest.approx(snr, rel=0.2)
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
    assert explained["defect label, 40-99 px, any wrong class"] == 1
    assert explained["defect called good, 40-99 px"] == 1
    flagged = s["good_false_alarms"]
    assert flagged["good parts"] == {"n": 7, "flagged": 1, "as": {"dirt": 1}}
    assert flagged["defect parts, 1-39 defect px (below the label's 40)"]["flagged"] == 1
    assert s["defect_recall_by_px"]["300-999"]["dirt"] == {"n": 2, "found": 1, "called_good": 1}
    assert s["defect_recall_by_snr"]["0-0.5"]["dirt"] == {"n": 1, "found": 0, "called_good": 1}
    # without the slices holding 1-99 defect px (the cut-off one and the 60 px scratch): 7 right of 10
    assert s["accuracy_without_1_99_px_slices"] == pytest.approx(7 / 10)
    assert s["accuracy_without_cutoff_slices"] == pytest.approx(7 / 11)


def test_bin_edges_and_the_faint_rule():
    slices = [row("dirt", "good", px=99, snr=1.0, part_class="dirt"),      # 40-99 bin; snr 1.0 is not faint
              row("dirt", "dirt", px=100, snr=0.999, part_class="dirt"),   # 100-299 bin; 0.5-1 bin
              row("scratch", "dirt", px=70, snr=0.2),                     # faint, but not called good
              row("good", "good", px=39, part_class="dirt"),               # the label's cut-off, right
              row("good", "dirt", px=1, part_class="dirt")]                # the cut-off, called a defect
    s = summarise(slices)
    px, snr = s["defect_recall_by_px"], s["defect_recall_by_snr"]
    assert px["40-99"]["dirt"] == {"n": 1, "found": 0, "called_good": 1}
    assert px["100-299"]["dirt"] == {"n": 1, "found": 1, "called_good": 0}
    assert snr["1-2"]["dirt"]["n"] == 1 and snr["0.5-1"]["dirt"]["n"] == 1 and snr["0-0.5"]["scratch"]["n"] == 1
    explained = s["errors_explained"]
    assert explained["defect called good, snr < 1 (fainter than the texture)"] == 0
    assert explained["defect label, 40-99 px, any wrong class"] == 2
    assert explained["defect called good, 40-99 px"] == 1
    assert explained["good label, 1-39 defect px (the label's cut-off)"] == 1
    assert s["good_false_alarms"]["defect parts, 1-39 defect px (below the label's 40)"]["n"] == 2
    # without the slices holding 1-99 px only the 100 px one is left, and it is right
    assert s["accuracy_without_1_99_px_slices"] == 1.0


def test_cutoff_errors_are_placed_in_their_parts():
    def at(part, label, pred, px=0):
        return {**row(label, pred, px=px, part_class="dirt"), "part": part}
    slices = [at(0, "good", "scratch", px=20), at(0, "dirt", "dirt", px=400),     # rejected anyway; adds scratch
              at(1, "good", "dirt", px=20), at(1, "dirt", "dirt", px=400),        # rejected anyway; no new class
              at(2, "good", "dirt", px=20), at(2, "dirt", "good", px=50)]         # the only defect call
    parts = summarise(slices)["cutoff_errors_in_their_parts"]
    assert parts == {"flips_accept": 1, "adds_a_class": 2}


def test_end_to_end_on_rendered_parts_with_the_shipped_model(tmp_path, capsys):
    out = tmp_path / "limits.json"
    assert main(["--work", str(tmp_path / "parts"), "--parts", "3", "--seed", "5", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    manifest = [json.loads(line) for line in (tmp_path / "parts" / "manifest.jsonl").read_text().splitlines()]
    assert len(doc["slices"]) == 8 * len(manifest) == doc["summary"]["slices"]
    assert [s["label"] for s in doc["slices"]] == [lab for m in manifest for lab in m["slice_labels"]]
    assert [s["defect_px"] for s in doc["slices"]] == [px for m in manifest for px in m["slice_defect_px"]]
    right = sum(s["label"] == s["pred"] for s in doc["slices"])
    assert doc["summary"]["accuracy"] == pytest.approx(right / len(doc["slices"]))
    assert "rendering 3 parts" in capsys.readouterr().out
    # a second call reuses the rendered parts (no rendering) and gives the same slices
    assert main(["--work", str(tmp_path / "parts"), "--parts", "3", "--seed", "5", "--json", str(out)]) == 0
    second = capsys.readouterr().out
    assert "rendering" not in second and "reusing the parts" in second
    assert json.loads(out.read_text())["slices"] == doc["slices"]
    # parts of another seed or count are refused, not silently scored under the arguments' name
    with pytest.raises(SystemExit, match="not 4 of seed 5"):
        main(["--work", str(tmp_path / "parts"), "--parts", "4", "--seed", "5"])
    with pytest.raises(SystemExit, match="not 3 of seed 6"):
        main(["--work", str(tmp_path / "parts"), "--parts", "3", "--seed", "6"])


def test_novel_defects_in_the_mix_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--work", str(tmp_path / "parts"), "--parts", "2", "--mix", "good=0.5,novel=0.5"])
    assert "novel" in capsys.readouterr().err and not (tmp_path / "parts").exists()
