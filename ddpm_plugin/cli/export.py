"""`ddpm export`: the pipeline's UNet as a validated ONNX folder for `OnnxDDPMPipeline`."""

from __future__ import annotations

import argparse

from ddpm_plugin.export.quantize import (
    DEFAULT_BOUND_BUDGET,
    DEFAULT_FLOAT32_BELOW_T,
    DEFAULT_KEEP_FLOAT,
    LAYER_GROUPS,
    Int8Settings,
)

from .arguments import MODEL_HELP, finite_float, whole_number


def layer_groups(text: str) -> tuple[str, ...]:
    """An argparse type: a comma-separated list of int8 layer groups ("" for none)."""
    groups = tuple(group.strip() for group in text.split(",") if group.strip())
    unknown = [group for group in groups if group not in LAYER_GROUPS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown layer group(s) {', '.join(unknown)}; choose from {', '.join(LAYER_GROUPS)}")
    return groups


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], such as 0.02 for 2%, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a pipeline's UNet to ONNX, validated against PyTorch",
        description="Writes OUT/model.onnx, OUT/scheduler/scheduler_config.json and OUT/ddpm_onnx.json. "
        "Use --output MODEL/onnx to ship the export inside the pipeline folder. With --quantize int8 the validated "
        "float32 graph is quantized (static QDQ, per-channel int8 weights), calibrated on x_t of real training "
        "images across the whole t range, and refused if its eps error rises beyond --quality-budget.",
    )
    parser.add_argument("--model", help=MODEL_HELP)
    parser.add_argument("--output", required=True, help="folder to write the export to")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                        help="torch.onnx.export(dynamo=True) (needs onnxscript), or the deprecated TorchScript exporter")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset (default: 18 with dynamo, 17 with torchscript)")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true",
                           help="float16 weights for GPUs (float32 inputs/outputs); slower than float32 on CPU")
    precision.add_argument("--quantize", choices=("int8",), default=None, help="static int8 quantization for CPUs")
    parser.add_argument("--tolerance", type=finite_float, default=None, help="max abs error allowed against PyTorch")
    parser.add_argument("--calibration-data", default=None,
                        help="int8: training images to calibrate on (a `ddpm train --dataset` value; default: the "
                        "dataset in the model's training_config.json)")
    parser.add_argument("--keep-float", type=layer_groups, default=None,
                        help=f"int8: comma-separated layer groups left in float32, of {', '.join(LAYER_GROUPS)} "
                        f"(default: {','.join(DEFAULT_KEEP_FLOAT)})")
    parser.add_argument("--quality-budget", type=fraction, default=None,
                        help="int8: largest relative rise of the Eq. 12-weighted eps error over float32 on held-out "
                        f"x_t (default: {DEFAULT_BOUND_BUDGET})")
    parser.add_argument("--calibration-inputs", type=whole_number(1), default=None,
                        help=f"int8: x_t to calibrate on (default: {Int8Settings.calibration_inputs})")
    parser.add_argument("--float32-below-t", type=whole_number(0), default=None,
                        help="int8: run the float32 graph (kept beside the int8 one) for timesteps t below this, where "
                        f"the bound weighs eps errors most; 0: int8 at every t (default: {DEFAULT_FLOAT32_BELOW_T})")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ddpm_plugin.bundled import resolve_model
    from ddpm_plugin.export.onnx_export import export_onnx

    int8_flags = {"calibration_data": args.calibration_data, "keep_float": args.keep_float,
                  "budget": args.quality_budget, "calibration_inputs": args.calibration_inputs,
                  "float32_below_t": args.float32_below_t}
    int8_flags = {name: value for name, value in int8_flags.items() if value is not None}
    if int8_flags and args.quantize is None:
        raise ValueError("--calibration-data, --keep-float, --quality-budget, --calibration-inputs and "
                         "--float32-below-t only apply with --quantize int8.")
    quantize = Int8Settings(**int8_flags) if args.quantize == "int8" else None
    model = resolve_model(args.model)
    try:
        report = export_onnx(model, args.output, opset=args.opset, fp16=args.fp16, exporter=args.exporter,
                             tolerance=args.tolerance, quantize=quantize)
    except RuntimeError as error:  # the exporter's and onnxruntime's own failures: a message, not a traceback
        raise ValueError(f"the export of {model} failed ({type(error).__name__}): {error}") from None
    print(
        f"wrote {report.model_path} ({report.precision}, {report.exporter} exporter, opset {report.opset}, "
        f"preset {report.preset}); "
        f"max |eps_onnx - eps_torch| = {report.max_abs_error:.2e} <= {report.tolerance:.0e} "
        f"in {report.export_seconds:.1f} s"
    )
    if report.quality is not None:
        quality = report.quality
        print(
            f"int8 against float32 on {quality['num_inputs']} held-out x_t: eps error (Eq. 12-weighted) "
            f"{quality['bound_rise']:+.2%} (budget {quality['budget']:.0%}), L_simple {quality['loss_rise']:+.2%}, "
            f"relative RMS change of eps {quality['eps_relative_rms']:.2%}"
            + (f"; the float32 graph runs for t < {quality['float32_below_t']} (int8 at every t: "
               f"{quality['int8_everywhere_bound_rise']:+.2%})" if quality.get("float32_below_t") else "")
        )
    return 0
