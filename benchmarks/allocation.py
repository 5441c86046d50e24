"""Time the allocation pipeline on the book's ResNet-34: cost tables, major-axis rounding, one allocation.

Usage: python benchmarks/allocation.py [--quick] [--device cpu|cuda]

Each figure is printed next to an anchor measured in the same run. The rounding is compared with
round-to-nearest of the same layers and widths. The cost tables are compared with one Hessian
analysis of the same layers, which takes no time when it is cached. The integer program is shown
with the number of allocations it chooses among. --quick analyses 64 calibration images with 4 Lanczos steps instead of
256 with 16, so it finishes in a few minutes on a CPU; the timings of rounding and solving barely
depend on that, but the analysis does.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from cet.allocate import allocate_bits
from cet.costs import METHODS, cost_tables, gradient_statistics
from cet.data import calibration_set, load_fashion_mnist
from cet.experiment import round_layers
from cet.io import write_json_atomic
from cet.models import quantizable_layers
from cet.quantize import channel_axis, quantize_per_channel
from cet.study import analyze_or_load
from cet.training import FineTuneConfig, TrainConfig, reference_model

BIT_WIDTHS = [2, 3, 4, 5, 6, 8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small analysis (64 images, 4 Lanczos steps)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="results/bench-allocation.json", help="JSON file for the figures")
    args = parser.parse_args()

    data = load_fashion_mnist()
    trained = reference_model(TrainConfig(), FineTuneConfig(), data.train, device=args.device)
    model = trained.model
    size, steps, top_k, probes = (64, 4, 2, 2) if args.quick else (256, 16, 8, 8)
    calibration = calibration_set(data.train, size, 0)

    start = time.perf_counter()
    analyses = analyze_or_load(model, trained.path.stem, calibration, 0, device=args.device, batch_size=128,
                               lanczos_steps=steps, top_k=top_k, trace_probes=probes, piecewise_linear=True)
    analysis_s = time.perf_counter() - start
    layers = quantizable_layers(model)

    start = time.perf_counter()
    for name in analyses:
        weight = layers[name].weight.detach().cpu()
        for bits in BIT_WIDTHS:
            quantize_per_channel(weight, bits, channel_axis(layers[name]))
    nearest_s = time.perf_counter() - start

    start = time.perf_counter()
    rounded, records = round_layers(model, analyses, BIT_WIDTHS, calibration, device=args.device)
    rounding_s = time.perf_counter() - start

    start = time.perf_counter()
    gradients = gradient_statistics(model, calibration, {n: layers[n] for n in analyses}, num_chunks=8, device=args.device)
    gradient_s = time.perf_counter() - start
    start = time.perf_counter()
    tables = cost_tables(list(METHODS), model, analyses, BIT_WIDTHS, gradients, rounded)
    tables_s = time.perf_counter() - start

    sizes = [a.num_weights for a in analyses.values()]
    solves = []
    for target in (8.0, 11.0, 14.0):
        start = time.perf_counter()
        allocate_bits(tables["cet"].costs, sizes, BIT_WIDTHS, target)
        solves.append(time.perf_counter() - start)

    figures = {
        "layers": len(analyses),
        "bit_widths": BIT_WIDTHS,
        "weights": int(sum(sizes)),
        "quick": args.quick,
        "device": args.device,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "analysis_s": analysis_s,
        "analysis_cached": analysis_s < 30,
        "round_to_nearest_s": nearest_s,
        "major_axis_rounding_s": rounding_s,
        "rounding_accepted": int(sum(r.accepted for r in records)),
        "rounding_cases": len(records),
        "gradient_statistics_s": gradient_s,
        "cost_tables_s": tables_s,
        "methods": len(tables),
        "allocation_solve_s": float(np.median(solves)),
        "allocations_searched": float(len(BIT_WIDTHS)) ** len(analyses),
    }
    print(f"ResNet-34, {figures['layers']} layers by {len(BIT_WIDTHS)} bit widths, {figures['weights']:,} weights, "
          f"{args.device} ({figures['machine']}){', quick' if args.quick else ''}")
    print(f"{'step':<44}{'seconds':>10}   anchor")
    print(f"{'major-axis rounding, all layers and widths':<44}{rounding_s:>10.1f}   round-to-nearest: {nearest_s:.2f} s")
    print(f"{'  accepted (layer, width) cases':<44}{figures['rounding_accepted']:>10}   of {len(records)}")
    print(f"{'gradient statistics (8 chunks)':<44}{gradient_s:>10.1f}")
    print(f"{f'cost tables, {len(tables)} methods':<44}{tables_s:>10.1f}   Hessian analysis: {analysis_s:.1f} s"
          f"{' (cached)' if figures['analysis_cached'] else ''}")
    print(f"{'one allocation (milp), median of 3':<44}{figures['allocation_solve_s']:>10.3f}   "
          f"among {figures['allocations_searched']:.2e} allocations")
    write_json_atomic(figures, args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
