"""Benchmark of the packed engine: per-layer and whole-frame speed, and memory over a long clip.

Prints, side by side in one run on the same inputs and thread count:

(a) every 3x3 binary convolution shape of BiMatting at 512x288: the packed engine against torch's
    float32 ``conv2d`` of the same shape, given a float input (it signs and packs it itself: a
    drop-in for the float conv) and given the input already packed (as the deployed model feeds
    most of these layers: the op before writes the bits), with how many of the shape's calls in a
    deployed frame get a packed input;
(b) whole frames at 512x288 (downsample_ratio 1) and 1920x1080 (downsample_ratio 0.25): deployed
    BiMatting, simulated BiMatting and full-precision RVM (MobileNetV3, torch eager);
(c) the resident memory of deployed BiMatting over a short and a long clip (it must stay flat).

Timings interleave the candidates round by round (so background load hits all of them alike)
and report the best and the median round.  Writes the plot with ``--plot``.

    python benchmarks/engine.py --threads 2 --plot docs/img/engine_speed.png
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

# Threads that spin while waiting (libgomp's default) steal the CPU from the thread they wait for
# whenever other processes share the cores; waiting passively keeps timings meaningful on a busy
# machine.  It applies to torch and the engine alike (they share one OpenMP runtime) and must be
# set before torch loads.  Override by setting OMP_WAIT_POLICY yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from binarize._atomic import atomic_output, write_text_atomic  # noqa: E402
from binarize.engine import PackedConv2d, deploy, kernel_info  # noqa: E402
from binarize.engine.functional import binary_conv2d, pack_activations  # noqa: E402
from binarize.models import create_model  # noqa: E402
from binarize.nn import BinaryConv2d  # noqa: E402


def interleaved(candidates: Dict[str, Callable[[], object]], rounds: int, warmup: int = 1,
                desc: str = "") -> Dict[str, Dict[str, List[float]]]:
    """Seconds of each candidate per round (candidates run one after another each round).

    Returns ``{name: {"wall": [...], "cpu": [...]}}``: wall-clock time, and the process CPU time
    (all threads), which background load on a shared machine disturbs much less.
    """
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: Dict[str, Dict[str, List[float]]] = {name: {"wall": [], "cpu": []} for name in candidates}
    for _ in tqdm(range(rounds), desc=desc, leave=False, disable=not desc):
        for name, fn in candidates.items():
            cpu, start = time.process_time(), time.perf_counter()
            fn()
            times[name]["wall"].append(time.perf_counter() - start)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def best_and_median(samples: Sequence[float]) -> tuple:
    return min(samples), statistics.median(samples)


def randomized_bimatting(seed: int = 0) -> torch.nn.Module:
    """BiMatting with random weights and non-trivial BatchNorm statistics (no checkpoint needed)."""
    torch.manual_seed(seed)
    model = create_model("bimatting").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.1)
    return model


def rvm_model() -> Optional[torch.nn.Module]:
    try:
        return create_model("rvm_mobilenetv3").eval()
    except ValueError:
        try:
            import binarize.models.rvm  # noqa: F401  registers rvm_mobilenetv3

            return create_model("rvm_mobilenetv3").eval()
        except Exception as exc:  # noqa: BLE001
            print(f"(rvm_mobilenetv3 unavailable: {exc})")
            return None


def binary_conv_shapes(model: torch.nn.Module, src: torch.Tensor, kernel: int = 3) -> List[dict]:
    """Distinct (layer, input shape) pairs of the model's k x k binary convs on one frame."""
    seen: Dict[tuple, dict] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, BinaryConv2d) and module.kernel_size == (kernel, kernel):
            def hook(mod, args, _out, name=name):
                x = args[0]
                key = shape_key(mod.in_channels, mod.out_channels, x.shape[-2], x.shape[-1], mod.stride)
                seen.setdefault(key, {"name": name, "layer": mod, "shape": tuple(x.shape), "count": 0})
                seen[key]["count"] += 1
            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model(src, *[None] * 4)
    for handle in hooks:
        handle.remove()
    return sorted(seen.values(), key=lambda entry: (-entry["shape"][-1], entry["shape"][1]))


def shape_key(in_channels: int, out_channels: int, height: int, width: int, stride) -> tuple:
    stride = stride if isinstance(stride, int) else stride[0]
    return in_channels, out_channels, height, width, stride


def deployed_input_forms(deployed: torch.nn.Module, src: torch.Tensor, kernel: int = 3) -> Dict[tuple, list]:
    """``{shape key: [calls given packed input, calls]}`` of the k x k binary convs in a deployed frame.

    The second of two frames is counted (the first links producers to their consumers).  It watches
    ``binary_conv2d`` wherever the engine's modules bound it.
    """
    forms: Dict[tuple, list] = collections.defaultdict(lambda: [0, 0])

    def watching(x, weights, **kwargs):
        if weights.kernel_size == (kernel, kernel):
            entry = forms[shape_key(x.shape[1], weights.out_channels, x.shape[-2], x.shape[-1],
                                    kwargs.get("stride", 1))]
            entry[0] += kwargs.get("packed_input") is not None
            entry[1] += 1
        return binary_conv2d(x, weights, **kwargs)

    modules = [module for name, module in sys.modules.items()
               if name.startswith("binarize.engine") and getattr(module, "binary_conv2d", None) is binary_conv2d]
    for module in modules:
        module.binary_conv2d = watching
    try:
        run = frame_runner(deployed, src, 1.0)
        run()
        forms.clear()
        run()
    finally:
        for module in modules:
            module.binary_conv2d = binary_conv2d
    return dict(forms)


def bench_layers(model: torch.nn.Module, deployed: torch.nn.Module, rounds: int) -> List[dict]:
    src = torch.rand(1, 1, 3, 288, 512)
    forms = deployed_input_forms(deployed, src)
    rows = []
    for entry in tqdm(binary_conv_shapes(model, src), desc="layers", leave=False):
        layer = entry["layer"]
        x = torch.randn(1, *entry["shape"][1:])
        weight = torch.randn_like(layer.weight)
        packed = PackedConv2d(layer)
        # the packed input is made once, outside the timing: in the model the op before writes it
        words = pack_activations(x, packed.spec.bias, layer.groups).reshape(-1).contiguous()
        shape_only = torch.empty(x.shape, device="meta")
        fp32 = functools.partial(F.conv2d, x, weight, None, layer.stride, layer.padding, layer.dilation,
                                 layer.groups)
        # each engine call follows an fp32 call (as in the model, it does not find its own tables and
        # output still cached from a call of its own)
        times = interleaved({
            "fp32": fp32, "packed": functools.partial(packed, x),
            "fp32 again": fp32, "packed_in": functools.partial(packed, shape_only, packed_input=words),
        }, rounds)
        fp_wall = times["fp32"]["wall"] + times["fp32 again"]["wall"]
        fp_best, fp_med = best_and_median(fp_wall)
        pk_best, pk_med = best_and_median(times["packed"]["wall"])
        pi_best, pi_med = best_and_median(times["packed_in"]["wall"])
        fp_cpu, pk_cpu = min(times["fp32"]["cpu"] + times["fp32 again"]["cpu"]), min(times["packed"]["cpu"])
        c, h, w = entry["shape"][1:]
        packed_calls, calls = forms.get(shape_key(c, layer.out_channels, h, w, layer.stride), (0, 0))
        rows.append({
            "layer": entry["name"], "in": c, "out": layer.out_channels, "size": f"{w}x{h}",
            "stride": layer.stride[0], "fp32_ms": fp_best * 1e3, "packed_ms": pk_best * 1e3,
            "fp32_med_ms": fp_med * 1e3, "packed_med_ms": pk_med * 1e3,
            "speedup": fp_best / pk_best, "speedup_med": fp_med / pk_med,
            "fp32_cpu_ms": fp_cpu * 1e3, "packed_cpu_ms": pk_cpu * 1e3,
            "speedup_cpu": fp_cpu / max(pk_cpu, 1e-9),
            "packed_in_ms": pi_best * 1e3, "packed_in_med_ms": pi_med * 1e3,
            "speedup_packed_in": fp_best / pi_best, "speedup_packed_in_med": fp_med / pi_med,
            "deployed_calls": calls, "deployed_packed_calls": packed_calls,
        })
    return rows


def as_deployed_ms(row: dict) -> float:
    """The layer's engine time with its input in the form the deployed model gives it (mixed shapes
    weighted by their calls; a shape the frame never ran counts as float input)."""
    share = row["deployed_packed_calls"] / row["deployed_calls"] if row["deployed_calls"] else 0.0
    return share * row["packed_in_ms"] + (1.0 - share) * row["packed_ms"]


def frame_runner(model: torch.nn.Module, src: torch.Tensor, ratio: float) -> Callable[[], None]:
    """A callable running one frame, carrying the recurrent state like a video stream."""
    state: list = [None] * 4

    def run() -> None:
        with torch.no_grad():
            out = model(src, *state, downsample_ratio=ratio)
        state[:] = list(out[2:6])

    return run


def bench_frames(models: Dict[str, torch.nn.Module], rounds: int) -> List[dict]:
    rows = []
    for label, (width, height, ratio) in {"512x288": (512, 288, 1.0), "1920x1080": (1920, 1080, 0.25)}.items():
        src = torch.rand(1, 1, 3, height, width)
        runners = {name: frame_runner(model, src, ratio) for name, model in models.items()}
        times = interleaved(runners, rounds, desc=f"frames {label}")
        for name, samples in times.items():
            best, median = best_and_median(samples["wall"])
            rows.append({"resolution": label, "downsample_ratio": ratio, "model": name,
                         "best_ms": best * 1e3, "median_ms": median * 1e3, "fps": 1.0 / best,
                         "cpu_ms": min(samples["cpu"]) * 1e3})
    return rows


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def bench_memory(model: torch.nn.Module, short: int, long: int) -> Optional[dict]:
    if not os.path.exists("/proc/self/statm"):
        return None
    src = torch.rand(1, 1, 3, 288, 512)
    run = frame_runner(model, src, 1.0)
    samples = []
    for _ in tqdm(range(long), desc="memory", leave=False):
        run()
        samples.append(rss_mb())
    return {"frames_short": short, "frames_long": long, "peak_short_mb": max(samples[:short]),
            "peak_long_mb": max(samples), "growth_mb": max(samples) - max(samples[:short])}


def print_layers(rows: List[dict]) -> None:
    print("\n(a) 3x3 binary conv layers of BiMatting at 512x288: packed engine vs torch fp32 conv2d")
    print("    float in: the engine signs and packs the float input itself; packed in: the input arrives packed")
    print("    (in a deployed frame, 'packed' of 'calls' of the shape do); best rounds, median-round ratio in")
    print("    brackets; cpu: process CPU time of the best round (float in)")
    print(f"{'layer':36s} {'in':>4s} {'out':>4s} {'input':>8s} {'s':>1s} {'fp32 ms':>8s} {'float in':>8s} "
          f"{'speedup':>8s} {'(median)':>8s} {'cpu':>6s} {'packed in':>9s} {'speedup':>8s} {'(median)':>8s} "
          f"{'packed/calls':>12s}")
    for r in rows:
        print(f"{r['layer'][:36]:36s} {r['in']:4d} {r['out']:4d} {r['size']:>8s} {r['stride']:1d} "
              f"{r['fp32_ms']:8.2f} {r['packed_ms']:8.2f} {r['speedup']:7.1f}x {r['speedup_med']:7.1f}x "
              f"{r['speedup_cpu']:5.1f}x {r['packed_in_ms']:9.2f} {r['speedup_packed_in']:7.1f}x "
              f"{r['speedup_packed_in_med']:7.1f}x {r['deployed_packed_calls']:>6d}/{r['deployed_calls']:<5d}")
    total_fp = sum(r["fp32_ms"] for r in rows)
    total_pk = sum(r["packed_ms"] for r in rows)
    total_pi = sum(r["packed_in_ms"] for r in rows)
    cpu_fp = sum(r["fp32_cpu_ms"] for r in rows)
    cpu_pk = sum(r["packed_cpu_ms"] for r in rows)
    print(f"{'all shapes':36s} {'':4s} {'':4s} {'':8s} {'':1s} {total_fp:8.2f} {total_pk:8.2f} "
          f"{total_fp / total_pk:7.1f}x {'':8s} {cpu_fp / cpu_pk:5.1f}x {total_pi:9.2f} {total_fp / total_pi:7.1f}x")
    deployed = sum(as_deployed_ms(r) for r in rows)
    print(f"  with each shape's input as the deployed model gives it: {deployed:.2f} ms, "
          f"{total_fp / deployed:.1f}x faster than fp32 over all shapes")


def print_frames(rows: List[dict]) -> None:
    print("\n(b) whole frame (batch 1, recurrent state carried)")
    print(f"{'resolution':10s} {'model':22s} {'best ms':>8s} {'median ms':>9s} {'fps':>6s} {'cpu ms':>8s}")
    for r in rows:
        print(f"{r['resolution']:10s} {r['model']:22s} {r['best_ms']:8.1f} {r['median_ms']:9.1f} {r['fps']:6.2f} "
              f"{r['cpu_ms']:8.1f}")
    for resolution in dict.fromkeys(r["resolution"] for r in rows):
        by = {r["model"]: r for r in rows if r["resolution"] == resolution}
        packed = by.get("bimatting (deployed)")
        if packed is None:
            continue
        for other in ("bimatting (simulated)", "rvm_mobilenetv3 (fp32)"):
            if other in by:
                print(f"  {resolution}: deployed bimatting is {by[other]['best_ms'] / packed['best_ms']:.1f}x faster "
                      f"than {other} (median {by[other]['median_ms'] / packed['median_ms']:.1f}x, "
                      f"CPU time {by[other]['cpu_ms'] / packed['cpu_ms']:.1f}x)")


def plot(layer_rows: List[dict], frame_rows: List[dict], path: pathlib.Path, threads: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    labels = [f"{r['in']}->{r['out']} {r['size']}" for r in layer_rows]
    positions = range(len(layer_rows))
    left.bar([i - 0.2 for i in positions], [r["speedup"] for r in layer_rows], 0.4, color="#3b7dd8",
             label="float input (signed and packed by the engine)")
    left.bar([i + 0.2 for i in positions], [r["speedup_packed_in"] for r in layer_rows], 0.4, color="#5cb85c",
             label="packed input (as the deployed model feeds most layers)")
    left.axhline(8, color="#d84b3b", linestyle="--", linewidth=1, label="8x target")
    left.set_xticks(list(positions), labels, fontsize=7, rotation=90)
    left.set_ylabel("speedup over torch fp32 conv2d")
    left.set_title(f"3x3 binary conv layers of BiMatting at 512x288 ({threads} thread{'s' if threads > 1 else ''})")
    left.legend(fontsize=8)
    resolutions = list(dict.fromkeys(r["resolution"] for r in frame_rows))
    models = list(dict.fromkeys(r["model"] for r in frame_rows))
    width = 0.8 / max(len(models), 1)
    colors = ["#3b7dd8", "#9aa5b1", "#e0a030", "#5cb85c"]
    for index, model in enumerate(models):
        fps = [next((r["fps"] for r in frame_rows if r["model"] == model and r["resolution"] == res), 0)
               for res in resolutions]
        right.bar([i + index * width for i in range(len(resolutions))], fps, width, label=model,
                  color=colors[index % len(colors)])
    right.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(resolutions))], resolutions)
    right.set_ylabel("frames per second (best round)")
    right.set_title(f"whole frame ({threads} thread{'s' if threads > 1 else ''})")
    right.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110)
    print(f"\nplot written to {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and the engine (default 2)")
    parser.add_argument("--layer-rounds", type=int, default=15)
    parser.add_argument("--frame-rounds", type=int, default=6)
    parser.add_argument("--frames-short", type=int, default=50)
    parser.add_argument("--frames-long", type=int, default=200)
    parser.add_argument("--skip", nargs="*", default=[], choices=["layers", "frames", "memory"])
    parser.add_argument("--plot", type=pathlib.Path, default=None, help="write the plot (PNG) here")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="write the measurements here")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    info = kernel_info()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               "unknown") if os.path.exists("/proc/cpuinfo") else "unknown"
    print(f"CPU: {cpu}; threads: {args.threads}; engine: {info['backend']} kernel {info['kernel']} "
          f"(supported: {', '.join(info['supported']) or '-'}; OpenMP: {info['openmp']}); torch {torch.__version__}; "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    simulated = randomized_bimatting()
    deployed = deploy(simulated)
    results: dict = {"cpu": cpu, "threads": args.threads, "engine": info,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if "layers" not in args.skip:
        results["layers"] = bench_layers(simulated, deployed, args.layer_rounds)
        print_layers(results["layers"])
    if "frames" not in args.skip:
        models = {"bimatting (deployed)": deployed, "bimatting (simulated)": simulated}
        rvm = rvm_model()
        if rvm is not None:
            models["rvm_mobilenetv3 (fp32)"] = rvm
        results["frames"] = bench_frames(models, args.frame_rounds)
        print_frames(results["frames"])
    if "memory" not in args.skip:
        memory = bench_memory(deploy(simulated), args.frames_short, args.frames_long)
        results["memory"] = memory
        if memory:
            print(f"\n(c) deployed bimatting RSS: peak {memory['peak_short_mb']:.0f} MB over the first "
                  f"{memory['frames_short']} frames, {memory['peak_long_mb']:.0f} MB over {memory['frames_long']} "
                  f"(growth {memory['growth_mb']:+.1f} MB)")
    if args.json:
        write_text_atomic(args.json, json.dumps(results, indent=2))
    if args.plot and "layers" in results and "frames" in results:
        plot(results["layers"], results["frames"], args.plot, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
