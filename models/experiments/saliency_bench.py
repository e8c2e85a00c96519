"""``valve-model bench``: PyTorch eager + autograd Grad-CAM++ vs the ONNX graph with in-graph Grad-CAM++.

One run, the same weights and the same inputs for both sides: frames of 8 uint8 slices
(B=8, 1, S, S), S = the model's input size (192, the runtime contract), each frame 4 seeded
uniform-noise slices and the 4 structured ones of the export check (:func:`models.export.check_slices`).

    (a) eager-full  the pytorch-grad-cam recipe, the baseline: eager forward with the parameters
                requiring grad, the last feature map kept by retain_grad, ``model.zero_grad()``, the
                summed argmax logits' ``backward()`` through the *whole* network (parameter gradients
                included, as pytorch-grad-cam's ``loss.backward(retain_graph=True)`` does), Grad-CAM++
                weights -> softmax -> Otsu
    (a') eager  torch.from_numpy -> models.saliency.saliency (forward without parameter gradients,
                autograd of the argmax logit w.r.t. the last feature map only, Grad-CAM++): the lean
                eager reference the export is checked against -> softmax ->
                service.segment.masks_for (Otsu where the class is segmented)
    (b) onnx    ONNX Runtime (CPUExecutionProvider) on the exported graph (logits, probs and the
                Grad-CAM++ map in one run, no autograd) -> service.segment.masks_for
    torchcam    (``--torchcam``, only when the torchcam package imports) torchcam's GradCAMpp on
                ``block3`` -> models.saliency.scale_map -> masks_for; timed and compared, never a
                pass/fail reference: torchcam 0.5.0 computes alpha = g^2 (its in-place division acts
                on a copy), not Grad-CAM++'s g^2 / (2 g^2 + sum(A) g^3), so its maps differ.

Weights: ``--run`` loads a trained run; otherwise each preset of ``--presets`` gets seeded random
weights whose BatchNorm running statistics are the average of a few train-mode forwards over
the bench frames (so activations and maps have realistic scales).

Per side: ms per 8-slice frame (median, p99, mean over ``--iterations`` after ``--warmup``) and
slices/s (8 * iterations / total time); ``b/a`` is the ratio of the medians (below 1: ONNX
Runtime is faster). Both sides run with ``--threads`` intra-op threads (torch.set_num_threads,
ORT intra_op_num_threads). The check runs every distinct frame once on both sides: the argmax
classes must agree and the saliency maps must be within 1e-4 max-abs (logits and the Otsu masks are
reported too). Exit codes: 0 done and the check passed, 1 the check failed, 2 bad options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.errors import ValveModelError
from models.export import TOLERANCE, check_slices, export_onnx, ort_session
from models.ira_cnn import IRACNN, PRESETS, build_model, count_parameters, preset_config, segmented_classes
from models.saliency import saliency, scale_map, weighted_map
from service.segment import masks_for

PROG = "valve-model bench"
BATCH = 8
#: distinct frames: the timing loop cycles through them, the check runs each once
N_FRAMES = 4
CALIBRATION_PASSES = 3


class BenchError(ValveModelError, ValueError):
    """A user error: bad options, a missing run, torchcam requested but not importable."""


def bench_frames(size: int, n_frames: int = N_FRAMES, seed: int = 0) -> list[np.ndarray]:
    """``n_frames`` uint8 arrays (8, 1, size, size): 4 seeded noise slices + the 4 structured check slices."""
    return [check_slices(BATCH - 4, size, seed=seed + i).numpy() for i in range(n_frames)]


def calibrated_model(preset: str, seed: int = 0, size: int = 192, **overrides) -> IRACNN:
    """A preset with seeded random weights, BN running stats averaged over train-mode passes; eval mode."""
    torch.manual_seed(seed)
    model = build_model(preset_config(preset, input_size=size, **overrides))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the passes
    model.train()
    with torch.no_grad():
        for frame in bench_frames(size, CALIBRATION_PASSES, seed=1000 + seed):
            model(torch.from_numpy(frame))
    for m in bns:
        m.momentum = 0.1
    return model.eval()


def _stats(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1e3
    return {"iterations": len(seconds), "median_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min()),
            "slices_per_s": float(BATCH * len(seconds) / max(sum(seconds), 1e-12))}


def _time(step: Callable[[np.ndarray], tuple], frames: list[np.ndarray], iterations: int, warmup: int) -> dict:
    for i in range(warmup):
        step(frames[i % len(frames)])
    seconds = []
    for i in range(iterations):
        frame = frames[i % len(frames)]
        t0 = time.perf_counter()
        step(frame)
        seconds.append(time.perf_counter() - t0)
    return _stats(seconds)


def eager_step(model: IRACNN, segmented: np.ndarray) -> Callable[[np.ndarray], tuple]:
    """(a): frame -> (logits, probs, saliency, masks) numpy, by torch eager + autograd + Otsu."""

    def step(frame: np.ndarray) -> tuple:
        logits, maps = saliency(model, torch.from_numpy(frame), "gradcam++")
        probs = torch.softmax(logits, dim=1).numpy()
        logits_np, maps_np = logits.numpy(), maps.numpy()
        return logits_np, probs, maps_np, masks_for(maps_np, logits_np.argmax(1), segmented, slices=frame)

    return step


def eager_full_step(model: IRACNN, segmented: np.ndarray) -> Callable[[np.ndarray], tuple]:
    """(a) the baseline: frame -> (logits, probs, saliency, masks) by pytorch-grad-cam's recipe (full backward)."""
    size = model.config.input_size

    def step(frame: np.ndarray) -> tuple:
        with torch.enable_grad():
            model.zero_grad(set_to_none=True)
            acts = model.features(torch.from_numpy(frame))
            acts.retain_grad()
            logits = model.head(acts)
            cls = logits.argmax(1)
            logits.gather(1, cls.view(-1, 1)).sum().backward()  # parameter gradients too, like loss.backward()
        maps = scale_map(weighted_map("gradcam++", acts.detach(), acts.grad), size).numpy()
        logits_np = logits.detach().numpy()
        probs = torch.softmax(logits.detach(), dim=1).numpy()
        return logits_np, probs, maps, masks_for(maps, logits_np.argmax(1), segmented, slices=frame)

    return step


def forward_step(model: IRACNN) -> Callable[[np.ndarray], tuple]:
    """Profile side: torch eager forward + softmax only (no gradient, no map, no Otsu)."""

    def step(frame: np.ndarray) -> tuple:
        with torch.inference_mode():
            logits = model(torch.from_numpy(frame))
            return (torch.softmax(logits, dim=1).numpy(),)

    return step


def onnx_profile(path: Path, frames: list[np.ndarray], threads: int, runs: int = 10) -> dict:
    """ONNX Runtime's own profiler over ``runs`` frames: kernel time by op type and by model block (%)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        for i in range(runs):
            session.run(None, {"slices": frames[i % len(frames)]})
        events = json.loads(Path(session.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    by_block: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") != "Node" or not ev.get("name", "").endswith("_kernel_time"):
            continue
        dur = float(ev["dur"])
        op = ev.get("args", {}).get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + dur
        name = ev["name"].lstrip("/")
        block = name.split("/", 1)[0] if "/" in name else "(other)"  # the module path's first part
        by_block[block] = by_block.get(block, 0.0) + dur
    total = sum(by_op.values()) or 1.0

    def top(d: dict[str, float], n: int = 8) -> dict[str, float]:
        return {k: round(100.0 * v / total, 1) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:n]}

    return {"runs": runs, "kernel_ms_per_frame": round(total / 1e3 / runs, 2), "by_op_percent": top(by_op),
            "by_block_percent": top(by_block)}


def onnx_step(session, segmented: np.ndarray) -> Callable[[np.ndarray], tuple]:
    """(b): frame -> (logits, probs, saliency, masks) numpy, by ONNX Runtime + Otsu."""

    def step(frame: np.ndarray) -> tuple:
        logits, probs, maps = session.run(["logits", "probs", "saliency"], {"slices": frame})
        return logits, probs, maps, masks_for(maps, logits.argmax(1), segmented, slices=frame)

    return step


def torchcam_step(model: IRACNN, segmented: np.ndarray, cam) -> Callable[[np.ndarray], tuple]:
    """torchcam GradCAMpp on block3, upsampled and min-max scaled like ours, + Otsu."""
    size = model.config.input_size

    def step(frame: np.ndarray) -> tuple:
        scores = model(torch.from_numpy(frame))
        cls = scores.argmax(1)
        maps = cam(class_idx=cls.tolist(), scores=scores)[0]  # (B, h, w), torchcam-normalised
        maps_np = scale_map(maps.detach().float(), size).numpy()
        logits = scores.detach().numpy()
        return logits, torch.softmax(scores.detach(), 1).numpy(), maps_np, masks_for(maps_np, cls.numpy(), segmented, slices=frame)

    return step


def compare(ref: list[tuple], other: list[tuple], tol: float = TOLERANCE) -> dict:
    """Outputs of two sides on the same frames -> classes, logits/saliency max-abs, mask pixels that differ."""
    logits_a = np.concatenate([r[0] for r in ref])
    logits_b = np.concatenate([o[0] for o in other])
    maps_a = np.concatenate([r[2] for r in ref])
    maps_b = np.concatenate([o[2] for o in other])
    masks_a = np.concatenate([r[3] for r in ref])
    masks_b = np.concatenate([o[3] for o in other])
    agree = logits_a.argmax(1) == logits_b.argmax(1)
    sal = np.abs(maps_a[agree].astype(np.float64) - maps_b[agree].astype(np.float64))
    out = {
        "slices": int(agree.size),
        "classes_agree": int(agree.sum()),
        "logits_max_abs": float(np.abs(logits_a.astype(np.float64) - logits_b).max()),
        "saliency_max_abs": float(sal.max()) if sal.size else 0.0,
        "mask_pixels_differ": int((masks_a[agree] != masks_b[agree]).sum()),
        "mask_pixels": int(masks_a[agree].size),
        "tolerance": tol,
    }
    out["passed"] = bool(agree.all() and out["saliency_max_abs"] <= tol)
    return out


@contextlib.contextmanager
def _torch_threads(n: int):
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def bench_model(model: IRACNN, *, iterations: int = 50, warmup: int = 5, threads: int | None = None,
                use_torchcam: bool = False, seed: int = 0, workdir: str | Path | None = None,
                log: Callable[[str], None] = print, profile: bool = False) -> dict:
    """Export ``model`` to ONNX (timed), run both sides on the same frames, time them and compare."""
    threads = threads or torch.get_num_threads()
    model = model.eval()
    cfg = model.config
    segmented = np.array([c in segmented_classes(cfg.classes) for c in cfg.classes])
    frames = bench_frames(cfg.input_size, N_FRAMES, seed)
    result: dict = {"preset": cfg.preset, "model_config": cfg.to_dict(), "parameters": count_parameters(model)}
    with _torch_threads(threads), tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / "model.onnx"
        log(f"{cfg.preset}: exporting ({result['parameters'] / 1e6:.2f} M parameters) ...")
        exported = export_onnx(model, path)
        result["export"] = {"seconds": round(exported.seconds, 3), "exporter": exported.exporter,
                            "opset": exported.opset, "megabytes": round(path.stat().st_size / 1e6, 2)}
        t0 = time.perf_counter()
        session = ort_session(path, threads=threads)
        result["export"]["session_seconds"] = round(time.perf_counter() - t0, 3)
        for p in model.parameters():
            p.requires_grad_(True)
        sides = {"eager_full": eager_full_step(model, segmented), "eager": eager_step(model, segmented),
                 "onnx": onnx_step(session, segmented)}
        outputs = {name: [step(f) for f in frames] for name, step in sides.items()}
        result["check"] = compare(outputs["eager"], outputs["onnx"])
        result["check_full"] = compare(outputs["eager_full"], outputs["onnx"])
        for name, step in sides.items():
            log(f"{cfg.preset}: timing {name} ({iterations} iterations after {warmup} warm-up) ...")
            result[name] = _time(step, frames, iterations, warmup)
        if profile:
            log(f"{cfg.preset}: profiling (torch forward only; ONNX Runtime's profiler) ...")
            result["eager_forward"] = _time(forward_step(model), frames, iterations, warmup)
            result["onnx_profile"] = onnx_profile(path, frames, threads, runs=max(3, min(iterations, 10)))
        if use_torchcam:  # its hooks stay on block3 while it lives: only after (a) and (b) are timed
            from torchcam.methods import GradCAMpp

            cam = GradCAMpp(model, "block3", input_shape=(1, cfg.input_size, cfg.input_size))
            try:
                step = torchcam_step(model, segmented, cam)
                result["torchcam_vs_eager"] = compare(outputs["eager"], [step(f) for f in frames])
                log(f"{cfg.preset}: timing torchcam ({iterations} iterations after {warmup} warm-up) ...")
                result["torchcam"] = _time(step, frames, iterations, warmup)
            finally:
                cam.remove_hooks()
        del session
    result["ratio_b_over_a"] = result["onnx"]["median_ms"] / result["eager_full"]["median_ms"]
    result["ratio_b_over_a_lean"] = result["onnx"]["median_ms"] / result["eager"]["median_ms"]
    return result


def run_bench(presets: list[str] | None = None, run: str | Path | None = None, iterations: int = 50,
              warmup: int = 5, threads: int | None = None, use_torchcam: bool = False, seed: int = 0,
              log: Callable[[str], None] = print, profile: bool = False) -> dict:
    """The whole bench: each preset (random calibrated weights) or the run's model. Returns the JSON dict."""
    if iterations < 1:
        raise BenchError(f"--iterations must be at least 1, not {iterations}")
    if warmup < 0:
        raise BenchError(f"--warmup must be 0 or more, not {warmup}")
    if threads is not None and threads < 1:
        raise BenchError(f"--threads must be at least 1, not {threads}")
    if run is not None and presets:
        raise BenchError("--run and --presets exclude each other: --run benchmarks that run's model")
    presets = list(presets or ([] if run is not None else PRESETS))
    unknown = [p for p in presets if p not in PRESETS]
    if unknown:
        raise BenchError(f"unknown preset(s) {', '.join(unknown)}: choose from {', '.join(PRESETS)}")
    if use_torchcam:
        try:
            import torchcam  # noqa: F401
        except ImportError:
            raise BenchError("--torchcam: the torchcam package does not import here; it needs no torchvision: "
                             "'pip install --no-deps torchcam' (plus pillow and matplotlib), or leave "
                             "--torchcam out") from None
    threads = threads or torch.get_num_threads()
    models: list[tuple[str, Callable[[], IRACNN]]] = []
    if run is not None:
        from models.checkpoint import load

        try:
            trained = load(run)
        except (FileNotFoundError, ValueError) as exc:
            raise BenchError(f"cannot load --run {run}: {exc}") from None
        models.append((f"run:{trained.config.preset}", lambda: trained))
    else:
        models += [(p, lambda p=p: calibrated_model(p, seed)) for p in presets]
    import onnxruntime

    result = {
        "batch": BATCH, "iterations": iterations, "warmup": warmup, "threads": threads, "seed": seed,
        "weights": str(Path(run).resolve()) if run is not None else "random, BN stats from train-mode passes",
        "machine": {"cpus": os.cpu_count(), "load_average_before": list(os.getloadavg()),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__, "platform": platform.platform()},
        "models": {},
    }
    with _torch_threads(threads):
        for name, make in models:
            model = make()
            result["models"][name] = bench_model(model, iterations=iterations, warmup=warmup, threads=threads,
                                                 use_torchcam=use_torchcam, seed=seed, log=log, profile=profile)
            del model
    result["machine"]["load_average_after"] = list(os.getloadavg())
    result["passed"] = all(m["check"]["passed"] and m["check_full"]["passed"] for m in result["models"].values())
    return result


def format_result(r: dict) -> str:
    m = r["machine"]
    lines = [f"{PROG}: frames of {r['batch']} uint8 slices, {r['iterations']} iterations after {r['warmup']} "
             f"warm-up, {r['threads']} thread(s); torch {m['torch']}, onnxruntime {m['onnxruntime']}; "
             f"{m['cpus']} CPUs, load average {m['load_average_before'][0]:.2f} before, "
             f"{m['load_average_after'][0]:.2f} after", f"weights: {r['weights']}", ""]
    head = f"{'model':14s} {'side':44s} {'median ms':>10s} {'p99 ms':>9s} {'slices/s':>9s}"
    lines += [head, "-" * len(head)]
    labels = {"eager_full": "(a) eager + full backward (pytorch-grad-cam)", "eager": "(a') eager + head-only autograd",
              "onnx": "(b) ONNX Runtime in-graph + Otsu", "torchcam": "    torchcam GradCAMpp + Otsu (not a ref.)"}
    for name, res in r["models"].items():
        size = res["model_config"]["input_size"]
        for side in ("eager_full", "eager", "onnx", "torchcam"):
            if side in res:
                t = res[side]
                lines.append(f"{name:14s} {labels[side]:44s} {t['median_ms']:10.2f} {t['p99_ms']:9.2f} "
                             f"{t['slices_per_s']:9.1f}")
        c, e = res["check"], res["export"]
        faster = 1 / res["ratio_b_over_a"]
        lines.append(f"{'':14s} b/a = {res['ratio_b_over_a']:.3f} (ONNX Runtime {faster:.2f}x "
                     f"{'faster' if faster >= 1 else 'the speed'} than (a); b/a' = {res['ratio_b_over_a_lean']:.3f}); "
                     f"input {size}x{size}; "
                     f"{res['parameters'] / 1e6:.2f} M parameters; export {e['seconds']:.1f} s "
                     f"({e['exporter']}, opset {e['opset']}, {e['megabytes']:.1f} MB), session {e['session_seconds']:.1f} s")
        lines.append(f"{'':14s} check (a) vs (b): classes {c['classes_agree']}/{c['slices']} agree, saliency "
                     f"max-abs {c['saliency_max_abs']:.3g}, logits max-abs {c['logits_max_abs']:.3g}, Otsu masks "
                     f"differ in {c['mask_pixels_differ']}/{c['mask_pixels']} px: "
                     f"{'PASS' if c['passed'] else 'FAIL'} (tolerance {c['tolerance']:g})")
        if "eager_forward" in res:
            fwd, full = res["eager_forward"]["median_ms"], res["eager_full"]["median_ms"]
            pr = res["onnx_profile"]
            lines.append(f"{'':14s} profile: torch forward alone {fwd:.2f} ms, so the forward is {100 * fwd / full:.0f} % "
                         f"of (a); (a) / forward = {full / fwd:.2f}x is what skipping autograd can save at most "
                         f"if (b)'s forward were no faster than torch's")
            lines.append(f"{'':14s} ONNX Runtime kernels {pr['kernel_ms_per_frame']:.2f} ms/frame; by op: "
                         + ", ".join(f"{k} {v}%" for k, v in pr["by_op_percent"].items()))
            lines.append(f"{'':14s} by block: " + ", ".join(f"{k} {v}%" for k, v in pr["by_block_percent"].items()))
        if "torchcam_vs_eager" in res:
            t = res["torchcam_vs_eager"]
            lines.append(f"{'':14s} torchcam vs (a): classes {t['classes_agree']}/{t['slices']}, saliency max-abs "
                         f"{t['saliency_max_abs']:.3g}, masks differ in {t['mask_pixels_differ']} px (torchcam 0.5.0 "
                         "uses alpha = g^2: a different map, not a failure)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Time PyTorch eager + autograd Grad-CAM++ against the exported ONNX graph with "
        "in-graph Grad-CAM++ on ONNX Runtime (both + Otsu), on the same weights and 8-slice frames, and check "
        "that they agree.")
    p.add_argument("--presets", help=f"comma-separated presets with random weights (default {','.join(PRESETS)}; "
                   "the paper preset's 155 M-parameter head makes its export and frames slow)")
    p.add_argument("--run", help="benchmark a trained run (directory or .safetensors) instead of random weights")
    p.add_argument("--iterations", type=int, default=50, help="timed frames per side (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed frames per side first (default 5)")
    p.add_argument("--threads", type=int, help="intra-op threads for torch and ONNX Runtime alike "
                   "(default: torch's default here)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the frames (default 0)")
    p.add_argument("--torchcam", action="store_true",
                   help="also time torchcam's GradCAMpp (needs the torchcam package; compared, not a reference)")
    p.add_argument("--json", dest="json_out", help="write the figures to this JSON file")
    p.add_argument("--profile", action="store_true",
                   help="also time torch's forward alone and run ONNX Runtime's profiler (time by op type and block)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    presets = [p.strip() for p in args.presets.split(",") if p.strip()] if args.presets else None

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        result = run_bench(presets, args.run, args.iterations, args.warmup, args.threads, args.torchcam,
                           args.seed, log=say, profile=args.profile)
    except BenchError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    result["command"] = ["valve-model", "bench", *argv]
    print(format_result(result))
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    if not result["passed"]:
        print(f"{PROG}: the check failed: (a) and (b) disagree beyond {TOLERANCE:g} (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
