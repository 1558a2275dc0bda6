"""Frame benchmark: deployed BiMatting against full-precision RVM as a CPU user runs it.

Prints, measured in one process with the candidates interleaved round by round (each round runs
one frame of every candidate, recurrent states carried from frame to frame, as a video pipeline
interleaves decoding, inference and encoding), the best and the median round of:

(a) per resolution (512x288 at downsample ratio 1, 1920x1080 at 0.25) and thread count (1, 2):
    deployed BiMatting (``binarize.deploy``, packed kernels), ``rvm_mobilenetv3`` in PyTorch
    eager, the same RVM under ``torch.compile`` (where it compiles; at the largest thread count only,
    since compiling takes minutes on a small machine) and the same RVM exported with
    ``torch.onnx.export`` and run by ONNX Runtime (CPU provider, all graph optimisations; the row is
    skipped when onnxruntime is not installed: ``pip install -e ".[bench]"``);
(b) end to end, the pipeline of ``binarize matte`` (``convert_video``: decoding thread, inference,
    H.264 encoding thread) on one synthetic clip, for deployed BiMatting and rvm_mobilenetv3;
(c) where a deployed frame's time goes: inclusive time of the model's top-level modules and, inside
    them, of each kind of C kernel call (timed through a wrapper of the kernel library), the rest
    being PyTorch operators and Python.

Both models use random weights (speed does not depend on them, except through BiMatting's decoder
masks, which ``randomized_bimatting`` keeps realistic).  Other processes share the CPU, so absolute
times are noisy; interleaving keeps the ratios meaningful.

    python benchmarks/frame.py --threads 1 2 --rounds 8 --json frame.json
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

# OpenMP's wait policy is left as users run it (unset: libgomp spins ~3 ms, then sleeps), since it
# moves the deployed frame by 30% on two threads (30 ms unset, 39 ms with OMP_WAIT_POLICY=PASSIVE,
# whose sleeping workers must be woken for each of the frame's hundreds of parallel regions).  On a
# machine shared with other jobs, set OMP_WAIT_POLICY=PASSIVE yourself (see benchmarks/engine.py).
WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY", "unset")  # read now: engine.py sets a default later

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from engine import interleaved, randomized_bimatting, rvm_model  # noqa: E402

from binarize._atomic import write_text_atomic  # noqa: E402
from binarize.engine import _lib, deploy, kernel_info  # noqa: E402

SIZES = {"512x288": (512, 288, 1.0), "1920x1080": (1920, 1080, 0.25)}
DEPLOYED = "bimatting (deployed)"
EAGER = "rvm_mobilenetv3 (eager)"
COMPILED = "rvm_mobilenetv3 (torch.compile)"
ORT = "rvm_mobilenetv3 (onnxruntime)"
NO_MODEL = "no model (decode + encode only)"


class RVMStep(torch.nn.Module):
    """RVM as one frame step with explicit recurrent states (what export and compile need):
    ``(src, r1, r2, r3, r4) -> (fgr, pha, r1, r2, r3, r4)`` at a fixed downsample ratio."""

    def __init__(self, model: torch.nn.Module, downsample_ratio: float) -> None:
        super().__init__()
        self.model = model
        self.downsample_ratio = downsample_ratio

    def forward(self, src: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, r3: torch.Tensor,
                r4: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.model(src, r1, r2, r3, r4, downsample_ratio=self.downsample_ratio))


def initial_states(model: torch.nn.Module, src: torch.Tensor, ratio: float) -> List[torch.Tensor]:
    """Zero recurrent states of the shapes the model produces on ``src`` (a ConvGRU starts from 0)."""
    with torch.no_grad():
        out = model(src, *[None] * 4, downsample_ratio=ratio)
    return [torch.zeros_like(t) for t in out[2:6]]


def torch_runner(model: Callable, src: torch.Tensor, ratio: Optional[float],
                 states: Optional[List[torch.Tensor]] = None) -> Callable[[], None]:
    """One frame per call, the recurrent state carried; ``ratio=None``: ``model`` is an ``RVMStep``."""
    state: List[Any] = list(states) if states is not None else [None] * 4

    def run() -> None:
        with torch.no_grad():
            out = model(src, *state) if ratio is None else model(src, *state, downsample_ratio=ratio)
        state[:] = list(out[2:6])

    return run


def export_onnx(step: RVMStep, src: torch.Tensor, states: List[torch.Tensor], path: pathlib.Path) -> None:
    """``torch.onnx.export`` of one frame step at this input size (static shapes)."""
    names = ["src", "r1i", "r2i", "r3i", "r4i"]
    outputs = ["fgr", "pha", "r1o", "r2o", "r3o", "r4o"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(step, (src, *states), str(path), opset_version=17, input_names=names,
                              output_names=outputs, dynamo=False)
        except TypeError:  # a torch without the dynamo switch
            torch.onnx.export(step, (src, *states), str(path), opset_version=17, input_names=names,
                              output_names=outputs)


def ort_runner(path: pathlib.Path, src: torch.Tensor, states: List[torch.Tensor], threads: int) -> Callable[[], None]:
    """ONNX Runtime session (CPU provider, ``threads`` intra-op threads, all graph optimisations, no
    spinning: spinning threads would steal the CPU from the other candidates between their frames)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {"src": src.numpy(), **{f"r{i + 1}i": s.numpy() for i, s in enumerate(states)}}

    def run() -> None:
        out = session.run(None, feeds)
        feeds.update({f"r{i + 1}i": out[2 + i] for i in range(4)})

    return run


def onnxruntime_version() -> Optional[str]:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def bench_frames(deployed: torch.nn.Module, rvm: torch.nn.Module, sizes: Sequence[str], threads: Sequence[int],
                 rounds: int, skip: Sequence[str], workdir: pathlib.Path) -> List[dict]:
    rows: List[dict] = []
    for label in sizes:
        width, height, ratio = SIZES[label]
        torch.manual_seed(0)
        src = torch.rand(1, 3, height, width)
        states = initial_states(rvm, src, ratio)
        step = RVMStep(rvm, ratio).eval()
        onnx_path: Optional[pathlib.Path] = None
        notes: Dict[str, str] = {}
        if "onnx" not in skip:
            if onnxruntime_version() is None:
                notes[ORT] = "skipped: onnxruntime is not installed (pip install -e \".[bench]\")"
            else:
                onnx_path = workdir / f"rvm_{label}.onnx"
                start = time.perf_counter()
                try:
                    export_onnx(step, src, states, onnx_path)
                    notes[ORT] = f"exported in {time.perf_counter() - start:.0f} s"
                except Exception as exc:  # noqa: BLE001 - report and go on without the row
                    notes[ORT] = f"skipped: export failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
                    onnx_path = None
        for count in threads:
            torch.set_num_threads(count)
            candidates: Dict[str, Callable[[], None]] = {
                DEPLOYED: torch_runner(deployed, src, ratio),
                EAGER: torch_runner(rvm, src, ratio),
            }
            if "compile" not in skip and count == max(threads):  # compiling takes minutes: one thread count
                start = time.perf_counter()
                try:
                    torch._dynamo.reset()
                    compiled = torch.compile(step)
                    runner = torch_runner(compiled, src, None, states)
                    runner()  # compiles for this size and thread count
                    candidates[COMPILED] = runner
                    notes[COMPILED] = f"compiled in {time.perf_counter() - start:.0f} s"
                except Exception as exc:  # noqa: BLE001 - "where it works"
                    notes[COMPILED] = f"skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            if onnx_path is not None:
                candidates[ORT] = ort_runner(onnx_path, src, states, count)
            times = interleaved(candidates, rounds, warmup=2, desc=f"frames {label} {count} thread(s)")
            for name, samples in times.items():
                rows.append({"resolution": label, "downsample_ratio": ratio, "threads": count, "model": name,
                             "best_ms": min(samples["wall"]) * 1e3,
                             "median_ms": statistics.median(samples["wall"]) * 1e3,
                             "cpu_ms": statistics.median(samples["cpu"]) * 1e3, "note": notes.get(name, "")})
            for name, note in notes.items():
                if note.startswith("skipped") and name not in times:
                    rows.append({"resolution": label, "downsample_ratio": ratio, "threads": count, "model": name,
                                 "best_ms": None, "median_ms": None, "cpu_ms": None, "note": note})
    return rows


def print_frames(rows: List[dict]) -> None:
    print("\n(a) frames, interleaved in one process (best / median round)")
    print(f"{'resolution':<24} {'thr':>3} {'model':<34} {'best ms':>8} {'median':>8} {'fps':>6}  "
          f"{'deployed is (median)':<22} note")
    for row in rows:
        res = f"{row['resolution']} (ratio {row['downsample_ratio']:g})"
        if row["median_ms"] is None:
            print(f"{res:<24} {row['threads']:>3} {row['model']:<34} {'-':>8} {'-':>8} {'-':>6}  {'':<22} {row['note']}")
            continue
        base = next(r for r in rows if r["resolution"] == row["resolution"] and r["threads"] == row["threads"]
                    and r["model"] == DEPLOYED)
        ratio = "" if row["model"] == DEPLOYED else f"{row['median_ms'] / base['median_ms']:.2f}x faster"
        print(f"{res:<24} {row['threads']:>3} {row['model']:<34} {row['best_ms']:>8.1f} {row['median_ms']:>8.1f} "
              f"{1e3 / row['median_ms']:>6.1f}  {ratio:<22} {row['note']}")


# ---- (b) end to end ----------------------------------------------------------------------------

def write_clip(path: pathlib.Path, frames: int, width: int, height: int) -> None:
    """A synthetic H.264 clip (person-like foreground over a moving background)."""
    import av

    from binarize.matting.data import SyntheticMatting

    data = SyntheticMatting(clips=1, frames=frames, size=(width, height), seed=7, background="moving", split="demo")
    fgr, pha, bgr = data[0]
    src = (fgr * pha + bgr * (1 - pha)).permute(0, 2, 3, 1).numpy()
    src = np.round(np.clip(src, 0, 1) * 255).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=30, options={"crf": "18", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for array in src:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode(None))


class PassThrough(torch.nn.Module):
    """No model: alpha = the frame's mean colour, so the pipeline's decoding, compositing and encoding
    alone set the frame rate (the floor under every model's end-to-end time)."""

    def forward(self, src: torch.Tensor, *rec: Any, downsample_ratio: float = 1.0) -> List[Any]:
        return [src, src.mean(dim=-3, keepdim=True), *rec]


def bench_end_to_end(models: Dict[str, torch.nn.Module], clip: pathlib.Path, threads: int, rounds: int,
                     workdir: pathlib.Path) -> List[dict]:
    """``convert_video`` (what ``binarize matte clip -o comp.mp4 --alpha alpha.mp4`` runs once the model
    is built) of each model in turn, ``rounds`` times; fps as convert_video reports it (frames over
    the time from the first decoded frame to the last encoded one)."""
    from binarize.matting.inference import convert_video

    torch.set_num_threads(threads)
    fps: Dict[str, List[float]] = {name: [] for name in models}
    for _ in range(rounds + 1):  # the first round warms up
        for name, model in models.items():
            result = convert_video(model, clip, output_composition=workdir / "comp.mp4",
                                   output_alpha=workdir / "alpha.mp4", device="cpu", progress=False)
            fps[name].append(result.fps)
    return [{"model": name, "threads": threads, "best_fps": max(values[1:]),
             "median_fps": statistics.median(values[1:])} for name, values in fps.items()]


def print_best_end_to_end(rows: List[dict]) -> None:
    """Each model at its own best thread count (median fps), as a user who tunes --threads gets it."""
    best: Dict[str, dict] = {}
    for row in rows:
        if row["model"] not in best or row["median_fps"] > best[row["model"]]["median_fps"]:
            best[row["model"]] = row
    if DEPLOYED not in best or EAGER not in best or len({r["threads"] for r in rows}) < 2:
        return
    ours, theirs = best[DEPLOYED], best[EAGER]
    print(f"  each at its best thread count: deployed {ours['median_fps']:.1f} fps ({ours['threads']} thread(s)), "
          f"rvm_mobilenetv3 {theirs['median_fps']:.1f} fps ({theirs['threads']}): "
          f"{ours['median_fps'] / theirs['median_fps']:.2f}x")


# ---- (c) where a deployed frame's time goes ----------------------------------------------------

KERNEL_KINDS = {
    "bz_conv": "binary conv",
    "bz_sparse_fconv": "fp32 sparse conv",
    "bz_upsample2x": "resampling",
    "bz_avgpool2x2": "resampling",
    "bz_guided_apply": "guided filter",
    "bz_upsample_concat_pack": "up-sample+concat+pack",
    "bz_concat_pack": "up-sample+concat+pack",
    "bz_pack": "packing",
    "bz_pointwise": "chains, GRU, sums",
    "bz_gru_update": "chains, GRU, sums",
    "bz_masked_add": "chains, GRU, sums",
}
GROUPS = ("backbone.feature.0", "backbone", "aspp", "decoder.avgpool", "decoder.decode4", "decoder.decode3",
          "decoder.decode2", "decoder.decode1", "decoder.decode0", "project_mat", "refiner")


class TimedLibrary:
    """Stands in for the kernel library: each ``bz_*`` call is timed and charged to the innermost
    module being timed (``stack``)."""

    def __init__(self, lib: ctypes.CDLL, stack: List[str], totals: Dict[Tuple[str, str], float]) -> None:
        self._lib, self._stack, self._totals = lib, stack, totals

    def __getattr__(self, name: str) -> Any:
        function = getattr(self._lib, name)
        if name not in KERNEL_KINDS:
            return function
        kind, stack, totals = KERNEL_KINDS[name], self._stack, self._totals

        def timed(*args: Any) -> Any:
            start = time.perf_counter()
            result = function(*args)
            totals[(stack[-1] if stack else "model", kind)] += time.perf_counter() - start
            return result

        return timed


def bench_breakdown(simulated: torch.nn.Module, label: str, threads: int, frames: int) -> dict:
    """Median per-frame time of each top-level module (inclusive) and of the C calls inside it."""
    real = _lib.library()
    if real is None:
        return {}
    stack: List[str] = []
    totals: Dict[Tuple[str, str], float] = collections.defaultdict(float)
    _lib._state["lib"] = TimedLibrary(real, stack, totals)  # before deploy: call plans keep the functions
    try:
        model = deploy(simulated)
        spans: Dict[str, float] = collections.defaultdict(float)
        starts: Dict[str, float] = {}
        modules = dict(model.named_modules())
        handles = []
        for name in GROUPS:
            def enter(_module, _args, name=name):
                stack.append(name)
                starts[name] = time.perf_counter()

            def leave(_module, _args, _out, name=name):
                spans[name] += time.perf_counter() - starts.pop(name)
                stack.pop()

            handles.append(modules[name].register_forward_pre_hook(enter))
            handles.append(modules[name].register_forward_hook(leave))
        width, height, ratio = SIZES[label]
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        src = torch.rand(1, 3, height, width)
        state: List[Any] = [None] * 4
        per_frame: List[dict] = []
        with torch.no_grad():
            for i in range(frames + 2):
                spans.clear()
                totals.clear()
                start = time.perf_counter()
                out = model(src, *state, downsample_ratio=ratio)
                total = time.perf_counter() - start
                state = list(out[2:6])
                if i >= 2:
                    per_frame.append({"total": total, "spans": dict(spans), "kernels": dict(totals)})
        for handle in handles:
            handle.remove()
    finally:
        _lib._state["lib"] = real
    best = sorted(per_frame, key=lambda f: f["total"])[len(per_frame) // 2]  # the median frame
    return {"resolution": label, "downsample_ratio": ratio, "threads": threads, "total_ms": best["total"] * 1e3,
            "modules_ms": {k: v * 1e3 for k, v in best["spans"].items()},
            "kernels_ms": {f"{m}|{k}": v * 1e3 for (m, k), v in best["kernels"].items()}}


def print_breakdown(result: dict) -> None:
    if not result:
        print("\n(c) no breakdown: the compiled kernels are not built")
        return
    print(f"\n(c) deployed bimatting, {result['resolution']} (ratio {result['downsample_ratio']:g}), "
          f"{result['threads']} thread(s): the median of the timed frames, {result['total_ms']:.1f} ms")
    modules = result["modules_ms"]
    kernels: Dict[str, Dict[str, float]] = collections.defaultdict(dict)
    for key, value in result["kernels_ms"].items():
        module, kind = key.split("|")
        kernels[module][kind] = value
    inner = {"backbone": modules.get("backbone.feature.0", 0.0)}  # the stem is timed inside the backbone
    accounted = 0.0
    print(f"{'module':<22} {'ms':>6} {'share':>6}  C kernels inside (ms); the rest is PyTorch + Python")
    for name in GROUPS:
        if name not in modules:
            continue
        own = modules[name] - inner.get(name, 0.0)
        if name != "backbone.feature.0":
            accounted += modules[name]
        label = "backbone (blocks)" if name == "backbone" else ("stem (fp32 conv)" if name == "backbone.feature.0" else name)
        parts = ", ".join(f"{kind} {ms:.1f}" for kind, ms in sorted(kernels.get(name, {}).items(), key=lambda kv: -kv[1]))
        print(f"{label:<22} {own:>6.1f} {own / result['total_ms']:>6.1%}  {parts}")
    other = result["total_ms"] - accounted
    print(f"{'outside the modules':<22} {other:>6.1f} {other / result['total_ms']:>6.1%}  "
          "(input checks, the frame's down-sampling, output clamps)")


# ---- main ---------------------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per table (default 8)")
    parser.add_argument("--e2e-frames", type=int, default=48, help="frames of the end-to-end clip (default 48)")
    parser.add_argument("--e2e-rounds", type=int, default=2)
    parser.add_argument("--e2e-threads", type=int, nargs="+", default=[1, 2],
                        help="model thread counts of the end-to-end runs (default 1 2)")
    parser.add_argument("--breakdown-frames", type=int, default=9)
    parser.add_argument("--skip", nargs="*", default=[], choices=["frames", "compile", "onnx", "e2e", "breakdown"])
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the measurements here")
    args = parser.parse_args(argv)
    if min(args.threads + args.e2e_threads) < 1 or min(args.rounds, args.e2e_frames, args.e2e_rounds) < 1:
        parser.error("--threads, --rounds, --e2e-frames and --e2e-rounds must be >= 1")
    info = kernel_info()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown") if os.path.exists("/proc/cpuinfo") else "unknown"
    print(f"CPU: {cpu} ({os.cpu_count()} logical); engine: {info['backend']} kernel {info['kernel']}; "
          f"torch {torch.__version__}; onnxruntime {onnxruntime_version() or 'not installed'}; "
          f"OMP_WAIT_POLICY={WAIT_POLICY}")
    simulated = randomized_bimatting()
    deployed = deploy(simulated)
    rvm = rvm_model()
    if rvm is None:
        print("rvm_mobilenetv3 is unavailable: nothing to compare")
        return 1
    results: dict = {"cpu": cpu, "engine": info, "torch": torch.__version__, "onnxruntime": onnxruntime_version()}
    with tempfile.TemporaryDirectory(prefix="binarize-frame-") as tmp:
        workdir = pathlib.Path(tmp)
        if "frames" not in args.skip:
            results["frames"] = bench_frames(deployed, rvm, args.sizes, args.threads, args.rounds, args.skip, workdir)
            print_frames(results["frames"])
        if "e2e" not in args.skip:
            width, height, _ = SIZES["512x288"]
            clip = workdir / "clip.mp4"
            write_clip(clip, args.e2e_frames, width, height)
            models = {DEPLOYED: deployed, EAGER: rvm, NO_MODEL: PassThrough()}
            results["end_to_end"] = []
            for count in args.e2e_threads:
                rows = bench_end_to_end(models, clip, count, args.e2e_rounds, workdir)
                results["end_to_end"].extend(rows)
                print(f"\n(b) end to end (convert_video = binarize matte --threads {count}: decode, inference, "
                      f"H.264 encode of composition and alpha), {args.e2e_frames} frames 512x288, {count} model "
                      f"thread(s), best / median of {args.e2e_rounds} rounds")
                base = next(r for r in rows if r["model"] == DEPLOYED)
                for row in rows:
                    lead = "" if row is base or row["model"] == NO_MODEL else \
                        f"  deployed: {base['median_fps'] / row['median_fps']:.2f}x"
                    print(f"  {row['model']:<34} {row['best_fps']:>6.1f} / {row['median_fps']:>6.1f} fps{lead}")
            print_best_end_to_end(results["end_to_end"])
    if "breakdown" not in args.skip:
        results["breakdown"] = [bench_breakdown(simulated, label, max(args.threads), args.breakdown_frames)
                                for label in args.sizes]
        for result in results["breakdown"]:
            print_breakdown(result)
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
