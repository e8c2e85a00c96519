"""Multiple-instance training from image labels (``valve-model train --mil K``).

With image labels every slice of a defective image carries the image's class, though most of them show no
defect (docs/results.md, "Image labels only"): a model trained on all of them learns that good-looking slices
are defects. Multiple-instance learning treats an image as a *bag* of slices whose label says only that at
least one slice shows the defect, which is how the daemon decides a part (any slice defective):

* the first ``--mil-warmup`` epochs (MIL_WARMUP by default) train on every slice with its image's label, as
  plain image-label training does, so that the selection starts from a model that has seen the defects;
* each later epoch starts by scoring every slice of every defective bag with the current model (eval mode, the
  recalibrated BN statistics, no augmentation) by the log-probability of the bag's class, and keeps the
  ``K`` highest-scoring slices of each bag as that class (``select_instances``);
* the epoch draws its batches from those slices and from every slice of the good bags (good, all of them:
  a good image has no defect anywhere); the other slices of defective bags are not drawn, since whether
  they show the defect is unknown;
* validation scores bags, not slices (``bag_validation``): a bag's prediction is the daemon's part rule on
  its slices (defective when a slice's p(defect) = 1 - p(good) reaches 0.5, its class the defect class
  with the highest probability over the slices), so the weights kept are chosen on image verdicts.

This is the instance selection of Campanella et al. (Nature Medicine 2019, top-ranked tiles per slide) with
the good bags' slices as negatives. A bag is the slice file's stem up to its last ``__``: the tiles of
``valve-model realdata`` (``<group>__<image>__y<Y>_x<X>``) form one bag per source image, the daemon's
slices (``frame0007__s3``) one bag per frame; a stem without ``__`` is a bag of one slice (plain training).
Every slice of a bag must sit in the same class folder (image labels). Masks beside the slices are never
used to train; where they exist the share of selected slices that hold defect pixels is logged
(``mil_hit``), so a run shows whether the selection finds the defects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.errors import DataError
from models.images import read_mask
from models.samples import Sample
from models.tiles import good_index, image_class, tile_logodds

#: ``valve-model train --mil K`` without ``--mil-warmup``: the epochs on every slice with its image's label before the
#: selection starts. Selecting from the first epoch reads the initialisation, which ranks the slices at random: on
#: made-up bags (tools/mil_warmup.py, one bright square among four noise tiles) 2 of 6 seeds picked a noise tile first
#: and never left it (selection hit 0.0 for 8 epochs), while after 1 or 2 warm-up epochs 6 of 6 seeds picked the
#: square (docs/results/mil-warmup-toy.json)
MIL_WARMUP = 2
#: the log-probabilities are computed in batches of this many slices
SCORE_BATCH = 64


def bag_of(sample: Sample) -> str:
    """The bag (source image) of a slice: its file stem up to the last ``__``, else the slice itself."""
    stem = sample.path.stem
    return stem.rsplit("__", 1)[0] if "__" in stem else f"{sample.path.parent.name}/{stem}"


@dataclass(frozen=True)
class Bags:
    """Slices grouped by source image: ``members[b]`` indexes the samples of bag ``names[b]``, labelled
    ``labels[b]``; ``good`` is the good class's label."""

    names: tuple[str, ...]
    members: tuple[tuple[int, ...], ...]
    labels: tuple[int, ...]
    good: int

    def defective(self) -> list[int]:
        return [b for b, lab in enumerate(self.labels) if lab != self.good]


def good_label(classes: Sequence[str]) -> int:
    """The label of the good class ("good", or Magnetic-tile's "free"); a clear error without one."""
    try:
        return good_index(classes)
    except StopIteration:
        pass
    raise DataError(f"--mil needs a good class (a folder named good or free) beside the defect classes; the data "
                    f"has {', '.join(classes)}: add the good slices, or train without --mil")


def make_bags(samples: Sequence[Sample], classes: Sequence[str]) -> Bags:
    """Group ``samples`` into bags (:func:`bag_of`); a bag whose slices carry two labels is refused (mask-derived
    slice labels, not image labels)."""
    good = good_label(classes)
    order: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        order.setdefault(bag_of(s), []).append(i)
    labels = []
    for name, idx in order.items():
        found = sorted({samples[i].label for i in idx})
        if len(found) > 1:
            raise DataError(
                f"--mil trains from image labels, but the slices of image {name!r} sit in the class folders "
                f"{', '.join(classes[k] for k in found)} (slice labels, e.g. tiles written with --labels mask): "
                "write the slices with their image's label (valve-model realdata --labels mil, or tiles with "
                "--labels image), or train without --mil")
        labels.append(found[0])
    return Bags(names=tuple(order), members=tuple(tuple(v) for v in order.values()), labels=tuple(labels), good=good)


def _log_probs(model: nn.Module, dataset, indices: Sequence[int], device: torch.device) -> np.ndarray:
    """Eval-mode log-probabilities (float64, (n, K)) of ``dataset[indices]`` without augmentation and without a
    DataLoader (which would draw from torch's global RNG, the one dropout and a resume rely on)."""
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(indices), SCORE_BATCH):
            chunk = indices[start:start + SCORE_BATCH]
            x = torch.stack([dataset[i][0] for i in chunk]).to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            out.append(torch.log_softmax(model(x).float(), dim=1).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0))


def mask_holds_defect(samples: Sequence[Sample]) -> list[bool | None]:
    """Per sample: whether its mask file has a foreground pixel (None without a mask); for the log only."""
    return [None if s.mask is None else bool(read_mask(s.mask).any()) for s in samples]


def select_instances(model: nn.Module, dataset, bags: Bags, top: int, device: torch.device,
                     has_defect: Sequence[bool | None] | None = None) -> tuple[list[int], dict]:
    """The slices an epoch trains on: every slice of the good bags and the ``top`` slices of each defective bag
    with the highest log-probability of the bag's class (ties: the earlier slice). Returns the sorted indices and
    a record: ``mil_selected`` (defect slices kept), ``mil_hit`` (the share of kept defect slices whose mask holds
    a defect pixel, over those with a mask; None without masks) and ``selected_by_bag`` (bag name -> indices)."""
    keep = [i for b, lab in enumerate(bags.labels) if lab == bags.good for i in bags.members[b]]
    defective = bags.defective()
    flat = [i for b in defective for i in bags.members[b]]
    logp = _log_probs(model, dataset, flat, device)
    by_bag: dict[str, list[int]] = {}
    pos = 0
    for b in defective:
        idx = bags.members[b]
        scores = logp[pos:pos + len(idx), bags.labels[b]]
        pos += len(idx)
        chosen = sorted(idx[j] for j in np.argsort(-scores, kind="stable")[:top])
        by_bag[bags.names[b]] = chosen
        keep.extend(chosen)
    selected = [i for v in by_bag.values() for i in v]
    hits = [has_defect[i] for i in selected if has_defect is not None and has_defect[i] is not None]
    return sorted(keep), {"mil_selected": len(selected),
                          "mil_hit": (sum(hits) / len(hits)) if hits else None,
                          "selected_by_bag": by_bag}


def bag_validation(model: nn.Module, dataset, bags: Bags, device: torch.device) -> tuple[float, float, dict]:
    """Image-level validation: (loss, accuracy, per_class {label: [correct, total]}) over the bags.

    A bag's prediction is the daemon's rule (defective when a slice's 1 - p(good) reaches 0.5; the class is the
    defect class with the highest probability over its slices); its loss is the cross-entropy of its label under
    the class probabilities of its most defective slice (the one the verdict reads)."""
    order = [i for idx in bags.members for i in idx]
    logp = _log_probs(model, dataset, order, device)
    pos = 0
    loss_sum, correct = 0.0, 0
    per_class: dict = {}
    for idx, label in zip(bags.members, bags.labels, strict=True):
        lp = logp[pos:pos + len(idx)]
        pos += len(idx)
        p = np.exp(lp)
        worst = int(np.argmax(1.0 - p[:, bags.good]))
        pred = image_class(p, tile_logodds(p, bags.good), bags.good, 0.0)  # log-odds 0: p(defect) 0.5
        loss_sum += -float(lp[worst, label])
        ok = pred == label
        correct += int(ok)
        c = per_class.setdefault(int(label), [0, 0])
        c[0] += int(ok)
        c[1] += 1
    n = max(len(bags.labels), 1)
    return loss_sum / n, correct / n, per_class
