"""`ddpm export`: the pipeline's UNet as a validated ONNX folder for `OnnxDDPMPipeline`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a pipeline's UNet to ONNX, validated against PyTorch",
        description="Writes OUT/model.onnx, OUT/scheduler/scheduler_config.json and OUT/ddpm_onnx.json. "
        "Use --output MODEL/onnx to ship the export inside the pipeline folder.",
    )
    parser.add_argument("--model", help="pipeline folder (default: the bundled digits model)")
    parser.add_argument("--output", required=True, help="folder to write the export to")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                        help="torch.onnx.export(dynamo=True) (needs onnxscript), or the deprecated TorchScript exporter")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset (default: 18 with dynamo, 17 with torchscript)")
    parser.add_argument("--fp16", action="store_true", help="float16 weights for GPUs (float32 inputs/outputs)")
    parser.add_argument("--tolerance", type=float, default=None, help="max abs error allowed against PyTorch")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ddpm_plugin.bundled import resolve_model
    from ddpm_plugin.export.onnx_export import export_onnx

    report = export_onnx(resolve_model(args.model), args.output, opset=args.opset, fp16=args.fp16,
                         exporter=args.exporter, tolerance=args.tolerance)
    print(
        f"wrote {report.model_path} ({report.exporter} exporter, opset {report.opset}, fp16={report.fp16}, "
        f"preset {report.preset}); "
        f"max |eps_onnx - eps_torch| = {report.max_abs_error:.2e} <= {report.tolerance:.0e} "
        f"in {report.export_seconds:.1f} s"
    )
    return 0
