"""The ``cet`` command line: analyze, allocate, quantize and evaluate, each step writing a file.

The same steps are plain functions in :mod:`cet.cli.steps`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence

__all__ = ["EXIT_CODES", "build_parser", "main"]

EXIT_OK = 0
EXIT_INPUT = 1
EXIT_USAGE = 2
EXIT_OUTPUT = 3
EXIT_INFEASIBLE = 4
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INPUT: "invalid input: data, model, weights, analysis or plan file",
    EXIT_USAGE: "invalid command line (an unknown option, a malformed value such as a bit list)",
    EXIT_OUTPUT: "the output file cannot be written (nothing was written)",
    EXIT_INFEASIBLE: "no allocation reaches the target (the message names the reachable range)",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); an existing output file is left unchanged",
}

DEFAULT_BITS = "2,3,4,5,6,8"
# The step modules import torch; the parser needs only these names.
COST_METHODS = ("cet-rtn", "hawq-v1", "hawq-v2")

_DESCRIPTION = """\
Compress a neural network with Compression Error Theory (CET) in four steps:

  cet analyze   per-layer Hessian information and bit-width costs  -> analysis JSON
  cet allocate  a bit width per layer for a target ratio or a loss tolerance  -> plan JSON
  cet quantize  the bit-packed model file
  cet evaluate  top-1 accuracy of the float32, simulated or packed model

Example on the book's Fashion-MNIST ResNet-34:

  cet analyze  --model fashion-resnet34 --data fashion-mnist --calibration-size 64 -o analysis.json
  cet allocate --analysis analysis.json --target-ratio 8 -o plan.json
  cet quantize --model fashion-resnet34 --plan plan.json -o model.cetq
  cet evaluate --model fashion-resnet34 --data fashion-mnist --packed model.cetq
"""


def _exit_code_text() -> str:
    return "exit codes:\n" + "\n".join(f"  {code:<4} {text}" for code, text in EXIT_CODES.items())


def _bit_widths(text: str) -> list[int]:
    from .steps import InputError, parse_bit_widths

    try:
        return parse_bit_widths(text)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _integer_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"invalid value {value}: must be at least {minimum}")
        return value

    return parse


_positive_int = _integer_at_least(1)


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: auto)")
    common.add_argument("--seed", type=int, default=0, help="seed of the calibration draw and the random probes (default: 0)")
    common.add_argument("--quiet", action="store_true",
                        help="no progress bars, warnings or summaries (evaluate still prints the accuracy); "
                             "errors still go to stderr")
    return common


def _model_options() -> argparse.ArgumentParser:
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "--model", required=True,
        help="fashion-resnet34 (the book's model), a torchvision architecture such as resnet34 (with --weights), "
             "or module:function returning your nn.Module (importable from the current directory)",
    )
    model.add_argument("--weights", help="a state dict file, or a checkpoint containing one under 'state_dict' or 'model'")
    model.add_argument("--num-classes", type=_positive_int, default=1000,
                       help="output classes of a torchvision architecture (default: 1000, ImageNet)")
    return model


def _data_option(parser: argparse.ArgumentParser, required: bool) -> None:
    from ..data import DATA_SPEC_HELP

    parser.add_argument("--data", required=required, help=f"the data set: {DATA_SPEC_HELP}")
    parser.add_argument("--batch-size", type=_positive_int, default=128, help="images per forward pass (default: 128)")
    parser.add_argument("--image-size", type=_positive_int, default=224,
                        help="crop size in pixels of the ImageNet evaluation transform, image folders only (default: 224)")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of ``cet`` with its four subcommands."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="cet", description=_DESCRIPTION, epilog=_exit_code_text(), formatter_class=formatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"cet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{analyze,allocate,quantize,evaluate}")
    common, model = _common_options(), _model_options()

    analyze = commands.add_parser(
        "analyze", parents=[common, model], formatter_class=formatter, epilog=_exit_code_text(),
        help="estimate each layer's Hessian information and bit-width costs; write the analysis JSON",
        description="Draw a calibration set, run Lanczos and Hutchinson on every quantizable layer's Hessian "
                    "block, and price each bit width with the cet-rtn, hawq-v1 and hawq-v2 cost models.",
    )
    _data_option(analyze, required=True)
    analyze.add_argument("--calibration-size", type=_positive_int, default=256,
                         help="samples drawn for the Hessian estimate (default: 256)")
    analyze.add_argument("--bits", type=_bit_widths, default=DEFAULT_BITS,
                         help=f"candidate bit widths, comma-separated, each from 2 to 16 (default: {DEFAULT_BITS})")
    analyze.add_argument("--lanczos-steps", type=_positive_int, default=16, help="Lanczos steps per layer (default: 16)")
    analyze.add_argument("--top-k", type=_positive_int, default=8, help="Ritz pairs kept per layer (default: 8)")
    # Two probes are the fewest that give the trace a standard error.
    analyze.add_argument("--trace-probes", type=_integer_at_least(2), default=8,
                         help="Hutchinson probes per layer, at least 2 (default: 8)")
    analyze.add_argument("-o", "--output", required=True, help="the analysis JSON to write")

    allocate = commands.add_parser(
        "allocate", parents=[common], formatter_class=formatter, epilog=_exit_code_text(),
        help="choose a bit width per layer for a target ratio or a loss tolerance; write the plan JSON",
        description="Solve the bit allocation exactly (an integer program) from the costs in an analysis file.",
    )
    allocate.add_argument("--analysis", required=True, help="the analysis JSON written by cet analyze")
    criterion = allocate.add_mutually_exclusive_group(required=True)
    criterion.add_argument("--target-ratio", type=float,
                           help="weight-compression ratio against float32 to reach at least, e.g. 8")
    criterion.add_argument("--tolerance", type=float,
                           help="maximum summed predicted loss change (in the units of the cross-entropy loss)")
    allocate.add_argument("--method", choices=COST_METHODS, default="cet-rtn",
                          help="cost model: cet-rtn (CET's surrogate, round-to-nearest errors), hawq-v1 (top "
                               "eigenvalue) or hawq-v2 (average trace) (default: cet-rtn)")
    allocate.add_argument("--bits", type=_bit_widths,
                          help="candidate bit widths, a subset of the analysed ones (default: all analysed)")
    allocate.add_argument("-o", "--output", required=True, help="the plan JSON to write")

    quantize = commands.add_parser(
        "quantize", parents=[common, model], formatter_class=formatter, epilog=_exit_code_text(),
        help="quantize the model with a plan and write the bit-packed model file",
        description="Quantize every planned layer per output channel and write codes, scales and the float32 "
                    "remainder of the model into one file.",
    )
    quantize.add_argument("--plan", required=True, help="the plan JSON written by cet allocate")
    quantize.add_argument("-o", "--output", required=True, help="the packed model file to write")

    evaluate = commands.add_parser(
        "evaluate", parents=[common, model], formatter_class=formatter, epilog=_exit_code_text(),
        help="measure top-1 accuracy of the float32, simulated or packed model",
        description="Measure top-1 accuracy on the data's evaluation split. Without --plan or --packed the float32 "
                    "model is measured.",
    )
    _data_option(evaluate, required=True)
    evaluate.add_argument("--workers", type=int, default=0,
                          help="worker processes that load and transform images (default: 0, in the main process)")
    variant = evaluate.add_mutually_exclusive_group()
    variant.add_argument("--plan", help="measure the simulated quantized model of this plan (float32 arithmetic)")
    variant.add_argument("--packed", help="measure the model loaded from this packed file")
    evaluate.add_argument("-o", "--output", help="also write the accuracy as JSON to this file")
    return parser


def _configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING, format="cet: %(levelname)s: %(message)s")


def _say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        print(message)


def _run(args: argparse.Namespace) -> None:
    from .steps import check_writable

    output = getattr(args, "output", None)
    if output is not None:
        check_writable(output)
    if args.command == "allocate":
        _allocate(args)
        return

    from ..reproducibility import seed_everything
    from .steps import load_model, resolve_device

    device = resolve_device(args.device)
    seed_everything(args.seed)
    data = None
    if getattr(args, "data", None) is not None:
        from ..data import load_data_source

        data = load_data_source(args.data, image_size=args.image_size)
    # Every input is checked before the model loads, because loading the book's model may first train it.
    plan = None
    if args.command == "analyze":
        from ..data import check_calibration_size

        check_calibration_size(data.calibration_pool, args.calibration_size)
    elif getattr(args, "plan", None) is not None:
        from .steps import read_plan

        plan = read_plan(args.plan)
    elif getattr(args, "packed", None) is not None and not os.path.isfile(args.packed):
        raise FileNotFoundError(f"packed model file {args.packed} not found; write one with 'cet quantize'")
    fashion_mnist_dir = None
    if data is not None and args.data.startswith("fashion-mnist:"):
        fashion_mnist_dir = args.data.partition(":")[2]
    model = load_model(args.model, args.weights, args.num_classes, fashion_mnist_dir=fashion_mnist_dir)
    if args.command == "analyze":
        _analyze(args, model, data, device)
    elif args.command == "quantize":
        _quantize(args, model, plan)
    else:
        _evaluate(args, model, data, device, plan)


def _analyze(args, model, data, device) -> None:
    from .steps import analyze, write_document

    document = analyze(
        model, data, args.bits, calibration_size=args.calibration_size, batch_size=args.batch_size,
        lanczos_steps=args.lanczos_steps, top_k=args.top_k, trace_probes=args.trace_probes, seed=args.seed,
        device=device, model_spec=args.model,
    )
    write_document(document, args.output)
    for name, reason in document["skipped"].items():
        _say(args, f"skipped {name}: {reason}")
    _say(args, f"wrote {args.output}: {len(document['layers'])} layers analysed on {args.calibration_size} samples, "
               f"costs for bit widths {document['bit_widths']}")


def _allocate(args) -> None:
    from .steps import allocate, read_analysis, write_document

    plan = allocate(read_analysis(args.analysis), target_ratio=args.target_ratio, tolerance=args.tolerance,
                    method=args.method, bit_widths=args.bits)
    write_document(plan, args.output)
    counts = {}
    for bits in plan["bit_widths"].values():
        counts[bits] = counts.get(bits, 0) + 1
    layout = ", ".join(f"{count} layers at {bits} bits" for bits, count in sorted(counts.items()))
    _say(args, f"wrote {args.output}: weight compression {plan['weight_compression_ratio']:.2f}x, "
               f"predicted loss change {plan['predicted_cost']:.4g} ({layout})")


def _quantize(args, model, plan) -> None:
    from .steps import quantize

    info = quantize(model, plan, args.output)
    _say(args, f"wrote {args.output}: {info.file_bytes:,} bytes, {info.file_compression_ratio:.2f}x smaller than "
               f"the float32 state dict ({info.fp32_state_dict_bytes:,} bytes); weights {info.weight_compression_ratio:.2f}x")


def _evaluate(args, model, data, device, plan) -> None:
    from .steps import check_output_classes, evaluate, simulated_model, write_document

    variant = "float32"
    if plan is not None:
        model = simulated_model(model, plan)
        variant = f"simulated quantized ({args.plan})"
    elif args.packed is not None:
        from ..export import load_packed

        model = load_packed(args.packed, model)
        variant = f"packed ({args.packed})"
    model = model.to(device)
    check_output_classes(model, data, device)
    accuracy, count = evaluate(model, data.evaluation, args.batch_size, device, args.workers, progress=not args.quiet)
    print(f"top-1 accuracy {accuracy:.2f}% on {count} samples of {args.data}, {variant} model")
    if args.output is not None:
        write_document({"format": "cet-accuracy/1", "model": args.model, "data": args.data, "variant": variant,
                        "accuracy": accuracy, "num_samples": count}, args.output)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cet`` command line; return the exit code listed in ``cet --help``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.quiet)

    from ..allocate import InfeasibleTargetError
    from .steps import OutputError

    errors = sys.stderr
    try:
        # Progress bars write to the sys.stderr of the moment they start, so --quiet points it at
        # os.devnull for the run. Errors go to the real stream below.
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull if args.quiet else errors):
            _run(args)
    except KeyboardInterrupt:
        print("cet: interrupted; any existing output file was left unchanged", file=errors)
        return EXIT_INTERRUPTED
    except OutputError as error:
        print(f"cet {args.command}: error: {error}", file=errors)
        return EXIT_OUTPUT
    except InfeasibleTargetError as error:
        print(f"cet {args.command}: error: {error}", file=errors)
        return EXIT_INFEASIBLE
    except (ValueError, OSError, FloatingPointError) as error:
        print(f"cet {args.command}: error: {error}", file=errors)
        return EXIT_INPUT
    return EXIT_OK
