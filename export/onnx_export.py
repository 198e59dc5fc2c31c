"""Export a pipeline's UNet to ONNX, validate it against PyTorch, and write a self-describing folder.

The folder written by [`export_onnx`] (and `ddpm export --model DIR --output OUT`):

```
OUT/
├── model.onnx                      # eps_theta: inputs `sample` float32 [B, C, H, W] and `timestep` int64 [B],
│                                   #   output `noise_pred` float32 [B, C, H, W]; B is dynamic
├── model.onnx.data                 # only when the exporter writes the weights as external data (> 2 GB)
├── scheduler/scheduler_config.json # copied from the pipeline folder (the training schedule)
└── ddpm_onnx.json                  # metadata: format, sample_size, in_channels, opset, fp16, max_abs_error,
                                    #   tolerance, preset (or null), source_model, ddpm_plugin_version, ...
```

A pipeline folder may carry its export in an `onnx/` sub-folder (`ddpm export --model DIR --output DIR/onnx`);
the demo and the Hub publisher look there. [`OnnxDDPMPipeline`] loads such a folder without torch.

Only the UNet is exported: the sampling loop stays in Python (an ONNX `Loop` around the UNet measured 24-50%
slower on CPU and rules out CUDA graphs). The legacy TorchScript exporter is used: it takes seconds (the
`dynamo=True` exporter takes 25-45 s for cifar10, needs onnxscript, and gives the same speed).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_pipeline import FORMAT_VERSION, METADATA_FILE, MODEL_FILE, SCHEDULER_CONFIG

INPUT_NAMES = ("sample", "timestep")
OUTPUT_NAME = "noise_pred"
DEFAULT_OPSET = 17
# Max |eps_onnx - eps_torch| allowed on random inputs; fp32 exports measure <= 7.5e-6 for the paper UNets.
DEFAULT_TOLERANCE = {False: 1e-4, True: 5e-2}
EXPORT_BATCH_SIZE = 2  # the traced example batch; validation uses another size to prove the batch axis dynamic


class OnnxValidationError(ValueError):
    """The exported model disagrees with PyTorch beyond the tolerance."""


@dataclass(frozen=True)
class OnnxExportReport:
    """What [`export_onnx`] wrote and how well it agrees with PyTorch.

    Args:
        output_dir (`Path`): The export folder.
        model_path (`Path`): `output_dir / "model.onnx"`.
        opset (`int`): The ONNX opset of the model.
        fp16 (`bool`): Whether the weights and activations are float16 (inputs and outputs stay float32).
        max_abs_error (`float`): Max |eps_onnx - eps_torch| over the validation inputs.
        tolerance (`float`): The bound `max_abs_error` was checked against.
        preset (`str` or `None`): The `ddpm_plugin.PRESETS` name whose architecture the UNet has, if any.
        export_seconds (`float`): Wall time of export plus validation.
    """

    output_dir: Path
    model_path: Path
    opset: int
    fp16: bool
    max_abs_error: float
    tolerance: float
    preset: str | None
    export_seconds: float


class _EpsilonModel:
    """Builds the `torch.nn.Module` that maps (sample, timestep) to eps_theta as a plain tensor."""

    @staticmethod
    def wrap(unet: Any, fp16: bool) -> Any:
        import torch

        class EpsilonModel(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.unet = unet.half() if fp16 else unet

            def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
                # float32 in and out even for fp16 weights, so the NumPy sampler never sees float16.
                return self.unet(sample.to(self.unet.dtype), timestep).sample.float()

        return EpsilonModel().eval()


def detect_preset(unet_config: dict[str, Any]) -> str | None:
    """The preset whose architecture `unet_config` has (dropout and sample size ignored), or None."""
    from ddpm_plugin.presets import PRESETS

    def normalise(value: Any) -> Any:
        return list(value) if isinstance(value, tuple) else value

    ignored = {"dropout"}
    for name, preset in PRESETS.items():
        wanted = preset.unet_config()
        if all(normalise(unet_config.get(k)) == normalise(v) for k, v in wanted.items() if k not in ignored):
            return name
    return None


def export_onnx(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    opset: int | None = None,
    fp16: bool = False,
    *,
    tolerance: float | None = None,
    validation_batch_size: int = 3,
    seed: int | None = None,
) -> OnnxExportReport:
    r"""
    Export the UNet of the pipeline in `model_dir` to `output_dir/model.onnx`, validate it, write the folder.

    Args:
        model_dir (`str` or `os.PathLike`):
            A pipeline folder (`unet/` and `scheduler/`), as `DDPMPaperPipeline.save_pretrained` writes it.
        output_dir (`str` or `os.PathLike`):
            Where to write the export (created; existing export files are replaced).
        opset (`int`, *optional*, defaults to 17):
            The ONNX opset (7..20 with the TorchScript exporter).
        fp16 (`bool`, *optional*, defaults to `False`):
            Float16 weights and activations for GPUs; the model's inputs and outputs stay float32.
        tolerance (`float`, *optional*):
            Max allowed |eps_onnx - eps_torch|; defaults to 1e-4 (fp32) or 5e-2 (fp16).
        validation_batch_size (`int`, *optional*, defaults to 3):
            Batch size of the validation inputs; differs from the traced batch so the batch axis is tested.
        seed (`int`, *optional*):
            Seed of the validation inputs; fresh random inputs when None.

    Returns:
        [`OnnxExportReport`]: paths, opset, the measured max abs error and the tolerance.

    Raises:
        `OnnxValidationError`: the export disagrees with PyTorch beyond `tolerance` (nothing is left behind).
    """
    import torch
    from diffusers import UNet2DModel

    import ddpm_plugin

    started = time.perf_counter()
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    scheduler_config = model_dir / SCHEDULER_CONFIG
    if not (model_dir / "unet").is_dir() or not scheduler_config.is_file():
        raise FileNotFoundError(f"{model_dir} is not a pipeline folder (it needs unet/ and {SCHEDULER_CONFIG}).")
    if output_dir.resolve() == model_dir.resolve():
        raise ValueError(f"write the export to its own folder, such as {model_dir / 'onnx'}, not into {model_dir}.")
    opset = DEFAULT_OPSET if opset is None else int(opset)
    tolerance = DEFAULT_TOLERANCE[fp16] if tolerance is None else float(tolerance)
    unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet", use_safetensors=True).eval()
    sample_size = unet.config.sample_size
    if not isinstance(sample_size, int):
        raise ValueError(f"only square UNets are supported, got `sample_size` {sample_size!r}.")
    image_shape = (unet.config.in_channels, sample_size, sample_size)
    reference = _EpsilonModel.wrap(UNet2DModel.from_config(unet.config).eval(), fp16=False)
    reference.unet.load_state_dict(unet.state_dict())

    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(f"{MODEL_FILE}*"):
        stale.unlink()
    model_path = output_dir / MODEL_FILE
    _trace_to_onnx(_EpsilonModel.wrap(unet, fp16), image_shape, model_path, opset)
    _freeze_reshape_targets(model_path)
    try:
        max_abs_error = _max_abs_error(model_path, reference, image_shape, validation_batch_size, seed)
        if not max_abs_error <= tolerance:
            raise OnnxValidationError(
                f"the ONNX model disagrees with PyTorch: max |eps_onnx - eps_torch| = {max_abs_error:.3g} exceeds "
                f"the tolerance {tolerance:.3g} (opset {opset}, fp16={fp16})."
            )
    except Exception:
        for written in output_dir.glob(f"{MODEL_FILE}*"):
            written.unlink()
        raise

    (output_dir / SCHEDULER_CONFIG).parent.mkdir(exist_ok=True)
    shutil.copyfile(scheduler_config, output_dir / SCHEDULER_CONFIG)
    preset = detect_preset(dict(unet.config))
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_file": MODEL_FILE,
        "input_names": list(INPUT_NAMES),
        "output_name": OUTPUT_NAME,
        "sample_size": sample_size,
        "in_channels": unet.config.in_channels,
        "opset": opset,
        "fp16": fp16,
        "max_abs_error": max_abs_error,
        "tolerance": tolerance,
        "preset": preset,
        "source_model": _source_model(model_dir, output_dir),
        "ddpm_plugin_version": ddpm_plugin.__version__,
        "torch_version": torch.__version__,
    }
    (output_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    report = OnnxExportReport(
        output_dir=output_dir, model_path=model_path, opset=opset, fp16=fp16, max_abs_error=max_abs_error,
        tolerance=tolerance, preset=preset, export_seconds=time.perf_counter() - started,
    )
    return report


def _source_model(model_dir: Path, output_dir: Path) -> str:
    """The pipeline folder as a path relative to the export when the export lives inside it (`DIR/onnx`), so
    the pair can move (the bundled model, a Hub repo); else its absolute path."""
    source, output = model_dir.resolve(), output_dir.resolve()
    return os.path.relpath(source, output) if output.is_relative_to(source) else str(source)


def _trace_to_onnx(model: Any, image_shape: tuple[int, int, int], path: Path, opset: int) -> None:
    """TorchScript-trace `model` at batch EXPORT_BATCH_SIZE with a dynamic batch axis."""
    import torch

    dtype = next(model.parameters()).dtype
    example = (
        torch.randn(EXPORT_BATCH_SIZE, *image_shape, dtype=torch.float32),
        torch.randint(0, 1000, (EXPORT_BATCH_SIZE,), dtype=torch.int64),
    )
    batch = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy exporter's deprecation notice and diffusers' shape asserts (TracerWarning) are expected.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, example, str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAMES[0]: batch, INPUT_NAMES[1]: batch, OUTPUT_NAME: batch},
        )
    if dtype == torch.float16:
        _check_float32_interface(path)


def _freeze_reshape_targets(path: Path) -> int:
    """Replace every `Reshape` target computed at run time (Shape -> Gather -> Unsqueeze -> Concat) by a
    constant, with 0 ("copy the input's dim") for the batch axis, and drop the nodes that computed it.

    The TorchScript exporter computes most reshape targets from the input's shape because the batch axis is
    dynamic: one such chain per GroupNorm and attention reshape. On small images these chains cost more than
    the convolutions (digits: Reshape/Shape/Concat/Gather/Unsqueeze were 57% of ORT's kernel time, Conv 11%).
    Returns the number of targets frozen; validation afterwards checks the result at another batch size.
    """
    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path))
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = {
        value.name: [dim.dim_value if dim.HasField("dim_value") else dim.dim_param for dim in value.type.tensor_type.shape.dim]
        for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    constants = {init.name for init in model.graph.initializer} | {
        node.output[0] for node in model.graph.node if node.op_type == "Constant"
    }
    frozen = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.input[1] in constants:
            continue
        if any(attribute.name == "allowzero" and attribute.i for attribute in node.attribute):
            continue
        source, target = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not source or not target:
            continue
        dims = []
        for axis, dim in enumerate(target):
            if isinstance(dim, int) and dim > 0:
                dims.append(dim)
            elif axis == 0 and dim == source[0]:
                dims.append(0)  # Reshape copies the input's (dynamic) batch size
            else:
                dims.append(-1)
        if dims.count(-1) > 1:
            continue
        name = f"{node.output[0]}__frozen_shape"
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(dims, dtype=np.int64), name))
        node.input[1] = name
        frozen += 1
    _remove_dead_nodes(model.graph)
    onnx.save(model, str(path))
    return frozen


def _remove_dead_nodes(graph: Any) -> None:
    """Drop nodes and initializers no graph output depends on."""
    needed = {output.name for output in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(output in needed for output in node.output):
            kept.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [init for init in graph.initializer if init.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _check_float32_interface(path: Path) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value in [*model.graph.input, *model.graph.output]:
        if value.name != INPUT_NAMES[1] and value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise RuntimeError(f"the fp16 export's {value.name!r} is not float32; the wrapper's casts were lost.")


def _max_abs_error(
    model_path: Path, reference: Any, image_shape: tuple[int, int, int], batch_size: int, seed: int | None
) -> float:
    """Max |eps_onnx - eps_torch| on fresh N(0, I) samples at random timesteps, on ORT's CPU provider with
    the same optimisations the sampler uses."""
    import onnxruntime as ort
    import torch

    from .providers import CPU, session_options

    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch_size, *image_shape), dtype=np.float32)
    timestep = rng.integers(0, 1000, size=batch_size, dtype=np.int64)
    with torch.no_grad():
        expected = reference(torch.from_numpy(sample), torch.from_numpy(timestep)).numpy()
    session = ort.InferenceSession(str(model_path), session_options(), providers=[CPU])
    (actual,) = session.run(None, {INPUT_NAMES[0]: sample, INPUT_NAMES[1]: timestep})
    return float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))


def report_as_dict(report: OnnxExportReport) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value for key, value in asdict(report).items()}
