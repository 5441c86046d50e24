"""cet's Hessian engine against PyHessian, side by side, on the trained ResNet-34.

Both tools get the same model, the same calibration batch and the same layers. PyHessian computes the
Hessian of every parameter that requires a gradient, so it is run on one layer at a time with all other
parameters frozen, as HAWQ does. Given one batch, it runs a forward and a backward pass per layer and
reuses that graph for the layer's products. cet analyses all layers from one shared forward and
backward pass.
Three tasks, per layer:

- top1: the top eigenvalue (PyHessian: power iteration; cet: Lanczos);
- top8: the top eight eigenvalues (PyHessian: power iteration with deflation; cet: one Lanczos run);
- trace: Hutchinson's estimate (cet uses as many probes on each layer as PyHessian's stopping rule
  chose, so the times compare the same work; the two estimates differ by sampling noise).

Each tool and task runs in a fresh process. Its peak memory is the peak above the memory in use after
loading the model and data: the resident set sampled every 5 ms on the CPU, allocated memory on CUDA. The script prints a
table and writes results/bench-hessian.json. PyHessian (the PyPI package ``pyhessian``) is installed
into this Python's environment with pip when it is missing; ``--no-deps`` keeps pip from replacing torch.

    python benchmarks/hessian.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import calibration_batch, synchronize, trained_resnet34  # noqa: E402

from cet.hessian import LayerHessian, hutchinson_trace  # noqa: E402
from cet.io import write_json_atomic  # noqa: E402
from cet.lanczos import lanczos  # noqa: E402
from cet.models import quantizable_layers  # noqa: E402

QUICK_LAYERS = ["conv1", "layer1.0.conv1", "layer2.0.downsample.0", "layer3.3.conv2", "fc"]
TASKS = ("top1", "top8", "trace")
# Lanczos runs until every wanted Ritz pair has a residual |Hy - theta y| of at most STOP_RESIDUAL
# times its value, which bounds its distance to an eigenvalue by 1%, or until this many steps.
LANCZOS_STEPS = {"top1": 16, "top8": 40}
STOP_RESIDUAL = 1e-2
# PyHessian's own defaults.
PYHESSIAN_MAX_ITER = 100
PYHESSIAN_TOL = 1e-3


def ensure_pyhessian() -> None:
    if importlib.util.find_spec("pyhessian") is None:
        print("installing pyhessian from PyPI into", sys.prefix, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "pyhessian"], check=True)


class ResidentPeak:
    """Sample this process's resident set every 5 ms in a thread and keep the largest value seen."""

    def __init__(self):
        self.peak = self.current()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def current() -> int:
        with open("/proc/self/statm") as stream:
            return int(stream.read().split()[1]) * resource.getpagesize()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.current())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.current())


_sampler: ResidentPeak | None = None


def start_memory(device: str) -> int:
    """Start measuring peak memory; return the memory in use now."""
    global _sampler
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    _sampler = ResidentPeak()
    return _sampler.peak


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return _sampler.stop()


def setup(device: str, batch_size: int, layer_names: list[str] | None):
    torch.manual_seed(0)
    model, train = trained_resnet34(device)
    model.eval()
    inputs, targets = calibration_batch(train, batch_size, device=device)
    layers = quantizable_layers(model)
    if layer_names is not None:
        layers = {name: layers[name] for name in layer_names}
    return model, inputs, targets, dict(layers)


def run_cet(task: str, device: str, batch_size: int, layer_names, probes: dict | None) -> dict:
    model, inputs, targets, layers = setup(device, batch_size, layer_names)
    base = start_memory(device)
    generator = torch.Generator().manual_seed(0)
    synchronize(device)
    start = time.perf_counter()
    values, steps = {}, {}
    with LayerHessian(model, layers, [(inputs, targets)], device=device) as hessian:
        for name in hessian.layer_names:
            weight = hessian.parameters[name].detach()

            def hvp(v, name=name):
                return hessian.hvp(name, v)

            if task == "trace":
                estimate = hutchinson_trace(hvp, weight, probes[name], generator)
                values[name] = [estimate.mean, estimate.standard_error, estimate.num_probes]
            else:
                start_vector = torch.randn(weight.shape, generator=generator).to(device=device, dtype=weight.dtype)
                k = 1 if task == "top1" else 8
                result = lanczos(hvp, start_vector, LANCZOS_STEPS[task], stop_residual=STOP_RESIDUAL, stop_count=k)
                values[name] = result.ritz_values[:k].tolist()
                steps[name] = result.num_steps
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": peak_memory_bytes(device) - base, "values": values, "steps": steps}


def run_pyhessian(task: str, device: str, batch_size: int, layer_names) -> dict:
    from pyhessian import hessian as PyHessian

    model, inputs, targets, layers = setup(device, batch_size, layer_names)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    base = start_memory(device)
    synchronize(device)
    start = time.perf_counter()
    values = {}
    for name, module in layers.items():
        module.weight.requires_grad_(True)
        analysis = PyHessian(model, F.cross_entropy, data=(inputs, targets), cuda=device == "cuda")
        if task == "trace":
            samples = analysis.trace(maxIter=PYHESSIAN_MAX_ITER, tol=PYHESSIAN_TOL)
            values[name] = [statistics.mean(samples), statistics.stdev(samples) / len(samples) ** 0.5 if len(samples) > 1 else 0.0, len(samples)]
        else:
            top_n = 1 if task == "top1" else 8
            eigenvalues, _ = analysis.eigenvalues(maxIter=PYHESSIAN_MAX_ITER, tol=PYHESSIAN_TOL, top_n=top_n)
            values[name] = sorted(eigenvalues, reverse=True)
        module.weight.requires_grad_(False)
        module.weight.grad = None  # PyHessian's backward left a gradient with its graph; free both
        del analysis
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_bytes": peak_memory_bytes(device) - base, "values": values}


def hvp_cost(device: str, batch_size: int, layer_names) -> dict:
    """Return the median time of one gradient and of one cet HVP (averaged over the layers)."""
    model, inputs, targets, layers = setup(device, batch_size, layer_names)
    weights = [m.weight for m in layers.values()]

    def gradient():
        synchronize(device)
        start = time.perf_counter()
        torch.autograd.grad(F.cross_entropy(model(inputs), targets), weights)
        synchronize(device)
        return time.perf_counter() - start

    gradient()
    gradient_s = statistics.median(gradient() for _ in range(3))
    with LayerHessian(model, layers, [(inputs, targets)], device=device) as hessian:
        per_layer = []
        for name in hessian.layer_names:
            vector = torch.ones_like(hessian.parameters[name]).detach()
            hessian.hvp(name, vector)
            times = []
            for _ in range(3):
                synchronize(device)
                start = time.perf_counter()
                hessian.hvp(name, vector)
                synchronize(device)
                times.append(time.perf_counter() - start)
            per_layer.append(statistics.median(times))
    return {"gradient_s": gradient_s, "hvp_s": statistics.mean(per_layer)}


def in_fresh_process(function, *args):
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(function, args)


def relative_difference(cet_values, pyhessian_values, task: str) -> float:
    worst = 0.0
    for name, reference in pyhessian_values.items():
        ours = cet_values[name]
        pairs = [(ours[0], reference[0])] if task == "trace" else list(zip(ours, reference))
        for a, b in pairs:
            worst = max(worst, abs(a - b) / max(abs(b), 1e-30))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"{len(QUICK_LAYERS)} layers and a batch of 32 instead of every layer and 128")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="results/bench-hessian.json")
    parser.add_argument("--batch-size", type=int, help="override the batch size (default 32 with --quick, else 128)")
    parser.add_argument("--layers", nargs="+", help="override the layers (default: the subset with --quick, else all)")
    args = parser.parse_args()
    ensure_pyhessian()
    batch_size = args.batch_size or (32 if args.quick else 128)
    layer_names = args.layers or (QUICK_LAYERS if args.quick else None)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads" + (
        f", {torch.cuda.get_device_name()}" if args.device == "cuda" else "")
    print(f"torch {torch.__version__}, device {args.device} ({machine}); batch {batch_size}; "
          f"layers: {'subset ' + ', '.join(layer_names) if layer_names else 'all quantizable'}"
          f"{' (--quick)' if args.quick else ''}", flush=True)

    results = {}
    for task in TASKS:
        print(f"{task}: PyHessian ...", flush=True)
        theirs = in_fresh_process(run_pyhessian, task, args.device, batch_size, layer_names)
        probes = {name: int(v[2]) for name, v in theirs["values"].items()} if task == "trace" else None
        print(f"{task}: cet ...", flush=True)
        ours = in_fresh_process(run_cet, task, args.device, batch_size, layer_names, probes)
        results[task] = (ours, theirs)
    cost = in_fresh_process(hvp_cost, args.device, batch_size, layer_names)

    layers = list(results["top1"][1]["values"])
    summary = {}
    print()
    print(f"{'task':6} {'cet s':>9} {'PyHessian s':>12} {'speedup':>8} {'cet MiB':>8} {'PyHessian MiB':>14} {'max rel diff':>13}")
    for task, (ours, theirs) in results.items():
        difference = relative_difference(ours["values"], theirs["values"], task)
        summary[task] = {
            "cet_s": ours["seconds"], "pyhessian_s": theirs["seconds"], "speedup": theirs["seconds"] / ours["seconds"],
            "max_rel_diff": difference, "cet_peak_mib": ours["peak_bytes"] / 2**20,
            "pyhessian_peak_mib": theirs["peak_bytes"] / 2**20,
            "cet_values": ours["values"], "pyhessian_values": theirs["values"], "cet_lanczos_steps": ours.get("steps"),
            "layers": layers, "batch_size": batch_size, "quick": args.quick, "device": args.device,
        }
        print(f"{task:6} {ours['seconds']:9.1f} {theirs['seconds']:12.1f} {summary[task]['speedup']:8.1f} "
              f"{summary[task]['cet_peak_mib']:8.0f} {summary[task]['pyhessian_peak_mib']:14.0f} {difference:13.2e}")
    print("\n(trace: both sides are Hutchinson estimates with the same number of probes; their difference is sampling noise)")
    trace_z = max(abs(results['trace'][0]['values'][n][0] - results['trace'][1]['values'][n][0])
                  / max(results['trace'][0]['values'][n][1], 1e-30) for n in layers)
    print(f"trace: largest |cet - PyHessian| in units of cet's standard error: {trace_z:.1f}")
    print(f"one gradient {cost['gradient_s']:.3f} s, one cet HVP {cost['hvp_s']:.3f} s "
          f"(mean over layers): HVP / gradient = {cost['hvp_s'] / cost['gradient_s']:.2f}")
    summary["hvp_cost"] = {"gradient_s": cost["gradient_s"], "hvp_s": cost["hvp_s"],
                           "hvp_over_gradient": cost["hvp_s"] / cost["gradient_s"]}
    summary["machine"] = {"torch": torch.__version__, "device": args.device, "description": machine}
    write_json_atomic(summary, Path(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
