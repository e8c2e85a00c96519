"""Numbers into text: mean +- sample std over seeds, percent formatting, and the sentence that orders the
ablation's variants against the paper's.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std (ddof 1), n) of the finite values; std None with fewer than 2, mean None with 0."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None, 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) >= 2 else None), len(vals)


def summary(values: Sequence[float | None]) -> dict:
    """The JSON form of :func:`mean_std`, with the per-seed values."""
    m, s, n = mean_std(values)
    return {"mean": m, "std": s, "n": n, "values": list(values)}


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100.0 * v:.{digits}f}"


def fmt_ms(values: Sequence[float | None], digits: int = 1, expected: int | None = None) -> str:
    """'97.1 ± 0.8' in percent; one value: '97.1'; a count when fewer values than ``expected``."""
    m, s, n = mean_std(values)
    if m is None:
        return "-"
    text = pct(m, digits) + ("" if s is None else f" ± {pct(s, digits)}")
    if expected is not None and n < expected:
        text += f" (n={n})"
    return text


def ordering_sentence(stats: dict[str, tuple[float | None, float | None]], paper: dict[str, float],
                      labels: dict[str, str], metric: str = "accuracy") -> str:
    """Our order of the variants by mean, whether it agrees with the paper's on every pair the paper
    orders strictly, and which pairs differ by less than their std (percent points)."""
    have = {k: v for k, v in stats.items() if v[0] is not None}
    if len(have) < 2:
        return f"Fewer than two variants have a {metric}: no ordering."
    ours = sorted(have, key=lambda k: -have[k][0])

    def chain(keys: Sequence[str], value: Callable[[str], float]) -> str:
        out = f"{labels[keys[0]]} {value(keys[0]):.1f}"
        for a, b in zip(keys, keys[1:], strict=False):
            out += f" {'=' if round(value(a), 6) == round(value(b), 6) else '>'} {labels[b]} {value(b):.1f}"
        return out

    paper_keys = sorted((k for k in paper if k in have), key=lambda k: -paper[k])
    text = (f"Ours ({metric}, mean over seeds, %): {chain(ours, lambda k: 100 * have[k][0])}. "
            f"Paper (accuracy %, their valve data): {chain(paper_keys, lambda k: paper[k])}. ")
    pairs = [(a, b) for i, a in enumerate(paper_keys) for b in paper_keys[i + 1:] if paper[a] != paper[b]]
    wrong = [(a, b) for a, b in pairs if not have[a][0] > have[b][0]]
    if not pairs:
        text += "The paper orders no pair of these variants."
    elif not wrong:
        text += f"Our ordering agrees with the paper's on all {len(pairs)} pairs the paper orders."
    else:
        text += (f"Our ordering disagrees with the paper's on {len(wrong)} of the {len(pairs)} pairs the paper "
                 "orders: " + "; ".join(f"{labels[a]} vs {labels[b]} (paper {labels[a]} higher, ours "
                                        f"{'equal' if have[a][0] == have[b][0] else labels[b] + ' higher'})"
                                        for a, b in wrong) + ".")
    keys = list(have)
    if any(have[k][1] is None for k in keys):
        text += (" With a single seed there is no std: the spread between trainings is unknown, and no "
                 "difference here can be told from training noise.")
        return text
    noisy = []
    for i, a in enumerate(ours):
        for b in ours[i + 1:]:
            diff = have[a][0] - have[b][0]
            spread = max(have[a][1], have[b][1])
            if diff < spread:
                noisy.append(f"{labels[a]} vs {labels[b]} (difference {100 * diff:.1f}, std "
                             f"{100 * have[a][1]:.1f} / {100 * have[b][1]:.1f})")
    if noisy:
        text += (" **The std over seeds is larger than the difference** for: " + "; ".join(noisy)
                 + ". These seeds do not separate those variants.")
    else:
        text += " Every difference between variants is larger than both variants' std."
    return text
