"""Each table of docs/results.md from the cached evaluation reports: its numbers (``RUNS/<table>.json``)
and its Markdown (table3: classification with IAM; table6: the attention ablation; table4: weakly
supervised segmentation; figures: saliency overlays of correct and wrong cases).
"""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

from models.experiments.results.protocol import ABLATION, SALIENCY_METHODS, ResultsError, ResultsOptions
from models.experiments.results.runs import load_metrics, report_dir, train_seconds
from models.experiments.results.stats import fmt_ms, mean_std, ordering_sentence, pct, plural, summary

LABELS = {"none": "no attention", "iam-no-spatial": "IAM without spatial", "cbam": "CBAM", "iam": "IAM"}
#: the paper's Table 6 (accuracy %, their private valve data)
PAPER_ABLATION = {"none": 92.2, "iam-no-spatial": 96.2, "cbam": 96.2, "iam": 97.7}
SEG_KEYS = ("pixel_accuracy", "iou", "precision", "recall", "f_score")
FIGURE_CASES = 8  # images per figure

ANCHORS_TABLE3 = [
    "Paper, Table 3: accuracy 97.7 % on the authors' private valve data (IRA-CNN with IAM).",
    "KolektorSDD, weakly supervised: 99.5 % accuracy (Xu et al., the paper's ref. [25]); another "
    "method, split and input size, not like-for-like.",
    "Magnetic-tile, fully supervised segmentation: mIoU 66.9 (DEU-Net, Appl. Sci. 2024); pixel-level "
    "training labels and another metric, not like-for-like (our segmentation is in Table 4).",
]


# ---------------------------------------------------------------------------------------------
# table 3


def table3(s: ResultsOptions) -> tuple[list[str], dict]:
    lines: list[str] = []
    data: dict = {}
    for ds in s.datasets:
        p = s.proto(ds)
        ms = [load_metrics(s, s.run(ds, "iam", seed), "gradcam++") for seed in s.seeds]
        classes = ms[0]["classification"]["classes"]
        cls = [m["classification"] for m in ms]
        per_class = {c: {k: summary([x["per_class"][c][k] for x in cls]) for k in ("precision", "recall",
                                                                                  "f_measure", "ap")}
                     for c in classes}
        cms = [x["confusion_matrix"] for x in cls]
        summed = [[sum(cm[i][j] for cm in cms) for j in range(len(classes))] for i in range(len(classes))]
        d = {"classes": classes, "seeds": s.seeds, "per_class": per_class,
             "support": {c: cls[0]["per_class"][c]["support"] for c in classes},
             "accuracy": summary([x["accuracy"] for x in cls]),
             "macro": {k: summary([x["macro"][k] for x in cls]) for k in ("precision", "recall", "f_measure")},
             "mean_ap": summary([x.get("mean_ap") for x in cls]),
             "confusion_matrix_per_seed": dict(zip(map(str, s.seeds), cms, strict=True)),
             "confusion_matrix_summed": summed,
             "test_images": ms[0]["data"]["evaluated"], "test_counts": ms[0]["data"]["counts"]}
        data[ds] = d
        n = len(s.seeds)
        lines += [f"### {p['name']}", "",
                  f"Test side: {d['test_images']} images (" + ", ".join(f"{k} {v}" for k, v in d["test_counts"].items())
                  + "). Accuracy **" + fmt_ms(d["accuracy"]["values"], 1, n) + " %** (per seed: "
                  + ", ".join(f"s{seed} {pct(v)}" for seed, v in zip(s.seeds, d["accuracy"]["values"], strict=True))
                  + ").", "",
                  "| class | precision % | recall % | F-measure % | AP % | support |", "|---|---|---|---|---|---|"]
        for c in classes:
            r = per_class[c]
            lines.append(f"| {c} | {fmt_ms(r['precision']['values'], 1, n)} | {fmt_ms(r['recall']['values'], 1, n)} | "
                         f"{fmt_ms(r['f_measure']['values'], 1, n)} | {fmt_ms(r['ap']['values'], 1, n)} | "
                         f"{d['support'][c]} |")
        mac = d["macro"]
        lines += [f"| macro | {fmt_ms(mac['precision']['values'], 1, n)} | {fmt_ms(mac['recall']['values'], 1, n)} | "
                  f"**{fmt_ms(mac['f_measure']['values'], 1, n)}** | {fmt_ms(d['mean_ap']['values'], 1, n)} (mean AP) | "
                  f"{d['test_images']} |", "",
                  f"Confusion matrix **summed over {plural(n, 'seed')}** ({n} x {d['test_images']} predictions; rows "
                  "true, columns predicted):", "",
                  "| true \\ predicted | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
        for c, row in zip(classes, summed, strict=True):
            lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
        lines += ["", "Per seed (rows true, columns predicted): "
                  + "; ".join(f"s{seed} `{cm}`" for seed, cm in zip(s.seeds, cms, strict=True)) + ".", ""]
        fig_seed = s.figure_seed
        rep = report_dir(s.run_dir(s.run(ds, "iam", fig_seed)), "gradcam++")
        figs = s.doc.parent / "results"
        figs.mkdir(parents=True, exist_ok=True)
        for src, name in (("confusion_matrix.png", f"{ds}-confusion.png"), ("pr_curves.png", f"{ds}-pr.png")):
            shutil.copyfile(rep / src, figs / name)
        lines += [f"Seed {fig_seed}: ![{p['name']} confusion matrix](results/{ds}-confusion.png) "
                  f"![{p['name']} precision-recall](results/{ds}-pr.png)", ""]
    lines += ["**Published figures for context** (not comparable one to one):", ""]
    lines += [f"- {a}" for a in ANCHORS_TABLE3]
    lines.append("")
    return lines, data


# ---------------------------------------------------------------------------------------------
# table 6


def table6(s: ResultsOptions) -> tuple[list[str], dict]:
    lines: list[str] = []
    data: dict = {}
    n = len(s.seeds)
    for ds in s.datasets:
        p = s.proto(ds)
        d: dict = {"variants": {}}
        for att in ABLATION:
            ms = [load_metrics(s, s.run(ds, att, seed), "gradcam++") for seed in s.seeds]
            d["variants"][att] = {
                "accuracy": summary([m["classification"]["accuracy"] for m in ms]),
                "macro_f": summary([m["classification"]["macro"]["f_measure"] for m in ms]),
                "paper_accuracy": PAPER_ABLATION[att] / 100.0,
                "train_seconds": [train_seconds(s, s.run(ds, att, seed)) for seed in s.seeds]}
        v = d["variants"]
        acc = {a: (v[a]["accuracy"]["mean"], v[a]["accuracy"]["std"]) for a in ABLATION}
        mf = {a: (v[a]["macro_f"]["mean"], v[a]["macro_f"]["std"]) for a in ABLATION}
        d["ordering_accuracy"] = ordering_sentence(acc, PAPER_ABLATION, LABELS, "accuracy")
        d["ordering_macro_f"] = ordering_sentence(mf, PAPER_ABLATION, LABELS, "macro-F")
        data[ds] = d
        lines += [f"### {p['name']}", "",
                  "| attention | paper accuracy % (valve data) | accuracy % | macro-F % | training s per run |",
                  "|---|---|---|---|---|"]
        for att in ABLATION:
            secs = mean_std(v[att]["train_seconds"])[0]
            lines.append(f"| {LABELS[att]} (`{att}`) | {PAPER_ABLATION[att]:.1f} | "
                         f"{fmt_ms(v[att]['accuracy']['values'], 1, n)} | {fmt_ms(v[att]['macro_f']['values'], 1, n)} | "
                         f"{'-' if secs is None else f'{secs:.0f}'} |")
        lines += ["", "Accuracy % per seed:", "",
                  "| attention | " + " | ".join(f"s{seed}" for seed in s.seeds) + " |",
                  "|---|" + "---|" * n]
        for att in ABLATION:
            lines.append(f"| {LABELS[att]} | " + " | ".join(pct(x) for x in v[att]["accuracy"]["values"]) + " |")
        lines += ["", d["ordering_accuracy"], "", d["ordering_macro_f"].replace(
            "Paper (accuracy %", "Paper (accuracy %, not macro-F"), ""]
    return lines, data


# ---------------------------------------------------------------------------------------------
# table 4


def table4(s: ResultsOptions) -> tuple[list[str], dict]:
    lines: list[str] = []
    data: dict = {}
    n = len(s.seeds)
    for ds in s.datasets:
        p = s.proto(ds)
        d: dict = {"methods": {}}
        policy = None
        for method in SALIENCY_METHODS:
            ms = [load_metrics(s, s.run(ds, "iam", seed), method) for seed in s.seeds]
            policy = ms[0]["data"].get("input_policy")
            seg = [m["segmentation"] for m in ms]
            d["methods"][method] = {
                "images": seg[0]["per_class"]["all"]["n"],
                "without_mask": seg[0]["segmented_images_without_mask"],
                "mean": {k: summary([x["per_class"]["all"]["mean"][k] for x in seg]) for k in SEG_KEYS},
                "pooled": {k: summary([x["per_class"]["all"]["pooled"][k] for x in seg]) for k in SEG_KEYS},
                "correct_only_mean": {k: summary([x["correctly_classified"]["all"]["mean"][k] for x in seg])
                                      for k in SEG_KEYS},
                "correct_only_images": [x["correctly_classified"]["all"]["n"] for x in seg],
                "per_class_mean_iou": {c: summary([x["per_class"][c]["mean"]["iou"] for x in seg])
                                       for c in seg[0]["segmented_classes"]},
            }
        d["input_policy"] = policy
        data[ds] = d
        first = d["methods"][SALIENCY_METHODS[0]]
        lines += [f"### {p['name']}", "",
                  f"Scored: the {first['images']} test images whose true class is a defect and that have a mask "
                  f"({first['without_mask']} defect images without a mask are left out), end to end (a defect "
                  "predicted as good gets an empty mask and IoU 0). Mean over images, then mean ± std over seeds.", "",
                  "| saliency | PA % | IoU % | precision % | recall % | F % | pooled IoU % | IoU % (correctly classified) |",
                  "|---|---|---|---|---|---|---|---|"]
        for method in SALIENCY_METHODS:
            r = d["methods"][method]
            lines.append(f"| {method} | " + " | ".join(fmt_ms(r["mean"][k]["values"], 1, n) for k in SEG_KEYS)
                         + f" | {fmt_ms(r['pooled']['iou']['values'], 1, n)} | "
                         f"{fmt_ms(r['correct_only_mean']['iou']['values'], 1, n)} |")
        if len(first["per_class_mean_iou"]) > 1:
            classes = list(first["per_class_mean_iou"])
            lines += ["", "IoU % per defect class (mean over images):", "",
                      "| saliency | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
            for method in SALIENCY_METHODS:
                r = d["methods"][method]["per_class_mean_iou"]
                lines.append(f"| {method} | " + " | ".join(fmt_ms(r[c]["values"], 1, n) for c in classes) + " |")
        lines.append("")
        iou = {m: d["methods"][m]["mean"]["iou"]["mean"] for m in SALIENCY_METHODS}
        order = sorted(SALIENCY_METHODS, key=lambda m: -iou[m])
        text = order[0]
        for a, b in zip(order, order[1:], strict=False):
            text += (" = " if math.isclose(iou[a], iou[b], rel_tol=1e-9, abs_tol=1e-12) else " > ") + b
        best = "agrees with" if order[0] == "gradcam++" and not math.isclose(
            iou[order[0]], iou[order[1]], rel_tol=1e-9, abs_tol=1e-12) else "differs from"
        sd = {m: d["methods"][m]["mean"]["iou"]["std"] for m in SALIENCY_METHODS}
        gap = iou[order[0]] - iou[order[-1]]
        spread = max((v for v in sd.values() if v is not None), default=None)
        noise = (f" The whole range ({100 * gap:.1f} points) is within the seeds' spread (std up to "
                 f"{100 * spread:.1f}): these seeds do not separate the methods."
                 if spread is not None and spread >= gap else "")
        lines += [f"Ours by mean IoU: {text}; this {best} the paper's Table 4, where Grad-CAM++ segments best."
                  + noise, ""]
        if p["preset"] == "compact":
            lines += ["CAM and Grad-CAM give the same rows here, and that is expected: the compact preset pools the "
                      "last feature map globally (GAP) before its FC layers, so the gradient of the class score is "
                      "the same at every location of a channel, and CAM's per-location weights and Grad-CAM's "
                      "averaged ones differ only by the positive factor h x w, which the min-max scaling removes "
                      "(Selvaraju et al.: Grad-CAM generalises CAM). They differ on the paper preset's flatten head.",
                      ""]
        if policy == "letterbox":
            lines += ["Pixel accuracy (PA) is inflated: scoring is in the letterboxed model input, whose zero "
                      "padding counts as true negatives (about 60 % of a KolektorSDD input; Magnetic-tile images vary "
                      "from near-square to 1:4); read IoU and F "
                      "(`docs/real-data.md`).", ""]
    lines += ["Published figure for context: Magnetic-tile, fully supervised DEU-Net (Appl. Sci. 2024), mIoU "
              "66.9; trained on pixel masks with another mIoU definition, not like-for-like with these weakly "
              "supervised, image-label-only maps.", ""]
    return lines, data


# ---------------------------------------------------------------------------------------------
# figures


def saliency_cases(run_dir: Path, rep: Path, data_path: Path, test_format: str, n: int = FIGURE_CASES):
    """(correct, wrong, notes): OverlayItems of correctly classified defect images and of
    misclassified images (either direction), recomputed with the run's weights (Grad-CAM++, Otsu)."""
    import numpy as np
    import torch

    from models.checkpoint import load as load_model
    from models.data import load_samples
    from models.evaluate import content_box, pick_overlays, round_robin
    from models.figures import OverlayItem
    from models.images import read_image, read_mask
    from models.ira_cnn import segmented_classes
    from models.saliency import saliency
    from models.samples import remap_classes
    from service.segment import masks_for, refined_mask

    with (rep / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    model = load_model(run_dir / "model.safetensors")
    model.eval()
    classes = tuple(model.config.classes)
    size = model.config.input_size
    seg_names = segmented_classes(classes)
    seg_flags = np.array([c in seg_names for c in classes])
    data = remap_classes(load_samples(data_path, test_format), classes)
    by_rel = {data.relpath(x): x for x in data.samples}
    correct_rows: dict[str, list] = {}
    wrong_rows: dict[tuple[str, str], list] = {}
    for r in rows:
        if r["true"] == r["pred"]:
            if r["true"] in seg_names:
                correct_rows.setdefault(r["true"], []).append(r)
        else:
            wrong_rows.setdefault((r["true"], r["pred"]), []).append(r)
    correct_rows = {k: v[:n] for k, v in correct_rows.items()}
    wrong_sel = round_robin([sorted(v, key=lambda r: -float(r["score"])) for v in wrong_rows.values()], n)

    def items(sel: list[dict]) -> list[tuple[int, OverlayItem]]:
        if not sel:
            return []
        samples = [by_rel[r["image"]] for r in sel]
        images = np.stack([read_image(x.path, size) for x in samples])
        logits, maps = saliency(model, torch.from_numpy(images).unsqueeze(1), "gradcam++")
        probs = torch.softmax(logits.float(), dim=1).numpy()
        maps_np = maps.float().numpy()
        pred = probs.argmax(axis=1)
        masks = masks_for(maps_np, pred, seg_flags, slices=images)
        for j, x in enumerate(samples):  # as evaluate does: masks over the image, not the letterbox padding
            if seg_flags[pred[j]] and (box := content_box(x.path, size)) is not None:
                masks[j] = False
                masks[j][box] = refined_mask(images[j][box], maps_np[j][box])
        out = []
        for i, (r, x) in enumerate(zip(sel, samples, strict=True)):
            if classes[pred[i]] != r["pred"]:
                raise ResultsError(f"{x.path}: predicted {classes[pred[i]]} now but {r['pred']} in "
                                   f"{rep / 'predictions.csv'}: the weights changed after the evaluation; "
                                   "run the command again")
            true_mask = read_mask(x.mask, size) if x.mask is not None and r["true"] in seg_names else None
            title = f"{x.path.parent.name}/{x.path.name}\ntrue {r['true']} / pred {r['pred']} p={probs[i, pred[i]]:.2f}"
            if r.get("iou") not in (None, ""):
                title += f"\nIoU {float(r['iou']):.2f}"
            out.append((0 if true_mask is not None else 1,
                        OverlayItem(image=images[i], saliency=maps_np[i], pred_mask=masks[i], true_mask=true_mask,
                                    title=title)))
        return out

    correct = {k: items(v) for k, v in correct_rows.items()}
    wrong = items(wrong_sel)
    chosen_correct = pick_overlays(correct, [], n)
    chosen_wrong = pick_overlays({}, wrong, n)
    counts = {"correct_defects": sum(1 for r in rows if r["true"] == r["pred"] and r["true"] in seg_names),
              "wrong": sum(1 for r in rows if r["true"] != r["pred"]), "images": len(rows)}
    return chosen_correct, chosen_wrong, counts


def figures(s: ResultsOptions) -> tuple[list[str], dict]:
    from models.figures import plot_saliency_grid

    lines: list[str] = ["Grad-CAM++ of the predicted class (jet), its Otsu mask (red dashed; empty when the "
                        "prediction is good) and the true mask (green); each tile's title: image, true / predicted "
                        "class, softmax probability of the predicted class, IoU when scored. Correct: up to "
                        f"{FIGURE_CASES} correctly classified defect images, round-robin over the defect classes "
                        "in test-set order, masked ones first. Wrong: up to "
                        f"{FIGURE_CASES} misclassified images, round-robin over the (true, predicted) pairs, most "
                        "confident first.", ""]
    data: dict = {}
    figs = s.doc.parent / "results"
    figs.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(max(s.proto(ds)["threads"] for ds in s.datasets))
    for ds in s.datasets:
        p = s.proto(ds)
        run = s.run(ds, "iam", s.figure_seed)
        rd = s.run_dir(run)
        correct, wrong, counts = saliency_cases(rd, report_dir(rd, "gradcam++"), s.data_path(ds), p["test_format"])
        plot_saliency_grid(correct, figs / f"{ds}-correct.png",
                           title=f"{p['name']}, IAM seed {s.figure_seed}: correctly classified defects "
                                 "(Grad-CAM++; true mask green, Otsu red dashed)")
        plot_saliency_grid(wrong, figs / f"{ds}-wrong.png",
                           title=f"{p['name']}, IAM seed {s.figure_seed}: misclassified "
                                 "(Grad-CAM++; true mask green, Otsu red dashed)")
        data[ds] = {"run": str(rd), **counts, "correct": [it.title.replace("\n", " | ") for it in correct],
                    "wrong": [it.title.replace("\n", " | ") for it in wrong]}
        lines += [f"### {p['name']} (IAM, seed {s.figure_seed})", "",
                  f"{counts['images']} test images: {counts['correct_defects']} correctly classified defect "
                  f"images, {counts['wrong']} misclassified.", "",
                  f"![{p['name']}: correct](results/{ds}-correct.png)" if correct
                  else "No correctly classified defect images.", "",
                  f"![{p['name']}: wrong](results/{ds}-wrong.png)" if wrong else "No misclassified images.", ""]
    return lines, data


BUILDERS = {"table3": table3, "table6": table6, "table4": table4, "figures": figures}
