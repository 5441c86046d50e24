"""Time one Hessian-vector product of a few ResNet-34 layers with both engines of cet.hessian.LayerHessian.

"graph" keeps the first backward pass's graph and runs a second backward pass per product; "forward"
recomputes the forward and backward pass per product in forward mode (torch.func.jvp of torch.func.grad).
Prints the setup time, the median time of one product and the time of one gradient, per layer.

    python benchmarks/hvp_engines.py [--batch-size 64] [--repeats 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import calibration_batch, synchronize, trained_resnet34  # noqa: E402

from cet.hessian import LayerHessian  # noqa: E402
from cet.models import quantizable_layers  # noqa: E402

LAYERS = ["conv1", "layer2.1.conv1", "layer4.2.conv2", "fc"]


def timed(function, device):
    synchronize(device)
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    model, train = trained_resnet34(args.device)
    model.eval()
    inputs, targets = calibration_batch(train, args.batch_size, device=args.device)
    all_layers = quantizable_layers(model)
    layers = {name: all_layers[name] for name in LAYERS}
    print(f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, device {args.device}, "
          f"batch {args.batch_size}, median of {args.repeats}")

    weights = [m.weight for m in layers.values()]
    gradient_s = statistics.median(
        timed(lambda: torch.autograd.grad(F.cross_entropy(model(inputs), targets), weights), args.device)[0]
        for _ in range(args.repeats)
    )
    print(f"one gradient (forward + backward): {gradient_s:.3f} s")
    rows = []
    for engine in ("graph", "forward"):
        setup_s, hessian = timed(lambda: LayerHessian(model, layers, [(inputs, targets)], device=args.device, engine=engine), args.device)
        with hessian:
            for name, module in layers.items():
                vector = torch.randn(module.weight.shape, generator=torch.Generator().manual_seed(0)).to(args.device)
                hessian.hvp(name, vector)  # warm-up
                times = [timed(lambda: hessian.hvp(name, vector), args.device)[0] for _ in range(args.repeats)]
                rows.append((engine, name, setup_s, statistics.median(times)))
    print(f"{'engine':8} {'layer':16} {'setup s':>8} {'HVP s':>8} {'HVP/grad':>9}")
    for engine, name, setup_s, hvp_s in rows:
        print(f"{engine:8} {name:16} {setup_s:8.3f} {hvp_s:8.4f} {hvp_s / gradient_s:9.2f}")


if __name__ == "__main__":
    main()
