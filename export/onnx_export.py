"""Export a pipeline's UNet to ONNX, validate it against PyTorch, and write a self-describing folder.

The folder written by [`export_onnx`] (and `ddpm export --model DIR --output OUT`):

```
OUT/
├── model.onnx                      # eps_theta: inputs `sample` float32 [B, C, H, W] and `timestep` int64 [B],
│                                   #   output `noise_pred` float32 [B, C, H, W]; B is dynamic
├── model.onnx.data                 # only when the exporter writes the weights as external data (> 2 GB)
├── model.float32.onnx              # int8 exports: the float32 graph, run for t < `float32_below_t`
├── scheduler/scheduler_config.json # copied from the pipeline folder (the training schedule)
└── ddpm_onnx.json                  # metadata: format, sample_size, in_channels, opset, precision, fp16,
                                    #   gflop_per_image, max_abs_error, tolerance, preset (or null), ...
```

`precision` is `"fp32"`, `"fp16"` (`fp16=True`: float16 weights and activations, for GPUs) or `"int8"`
(`quantize=Int8Settings(...)`, `ddpm export --quantize int8`: a static QDQ graph calibrated on x_t across the
whole t range, see `ddpm_plugin.export.quantize`). An int8 export's `max_abs_error` is that of the float32 graph
it was quantized from; its `quality` entry is what the int8 graph was held to instead: the relative rise of the
eps error over the float32 graph on held-out x_t, within `quality.budget`, and `quantization` says what was
quantized and calibrated on what. By default an int8 export keeps its float32 graph as `model.float32.onnx`
(`float32_model_file`) and the sampler runs it for t < `float32_below_t` (time-step-aware precision: the bound
weighs eps errors at small t most; `quality` prices this schedule). Inputs and outputs are float32 in every
precision.

A pipeline folder may carry its export in an `onnx/` sub-folder (`ddpm export --model DIR --output DIR/onnx`);
the demo and the Hub publisher look there. [`OnnxDDPMPipeline`] loads such a folder without torch.

Only the UNet is exported: the sampling loop stays in Python (an ONNX `Loop` around the UNet was slower on CPU
and rules out CUDA graphs). The maintained `torch.onnx.export(..., dynamo=True)` exporter (it needs
onnxscript) is the default; the TorchScript exporter, deprecated by torch, stays available as
`exporter="torchscript"` while torch ships it.

`ddpm_onnx.json` records the sha256 of the safetensors weights it was exported from (`source_weights_sha256`),
so a pipeline folder retrained after its export is recognised (`ddpm_plugin.export.freshness`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from ddpm_plugin.model_folder import check_pipeline_folder
from ddpm_plugin.vocabulary import (
    ONNX_FLOAT32_MODEL_FILE,
    ONNX_METADATA_FILE,
    ONNX_MODEL_FILE,
    ONNX_SUBFOLDER,
    SCHEDULER_CONFIG,
    TRAINING_CONFIG_FILE,
)

from .coefficients import write_coefficients
from .freshness import WEIGHTS_NAME, file_sha256
from .onnx_folder import FORMAT_VERSION

if TYPE_CHECKING:
    from .quantize import Int8Settings

INPUT_NAMES = ("sample", "timestep")
OUTPUT_NAME = "noise_pred"
Exporter = Literal["dynamo", "torchscript"]
EXPORTERS: tuple[str, ...] = ("dynamo", "torchscript")
# Default and supported opsets of each exporter (the dynamo exporter writes opset 18 and newer; the TorchScript
# one 7..20, and the UNet's GroupNorm/attention need 11 or newer).
DEFAULT_OPSET = {"dynamo": 18, "torchscript": 17}
OPSET_RANGE = {"dynamo": (18, 23), "torchscript": (11, 20)}
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
        exporter (`str`): `"dynamo"` or `"torchscript"`.
        fp16 (`bool`): Whether the weights and activations are float16 (inputs and outputs stay float32).
        precision (`str`): `"fp32"`, `"fp16"` or `"int8"`.
        max_abs_error (`float`): Max |eps_onnx - eps_torch| over the validation inputs (of the float32 graph,
            for an int8 export).
        tolerance (`float`): The bound `max_abs_error` was checked against.
        preset (`str` or `None`): The `ddpm_plugin.PRESETS` name whose architecture the UNet has, if any.
        export_seconds (`float`): Wall time of export plus validation.
        quality (`dict`, *optional*): For an int8 export, its measured quality against the float32 graph
            (`QuantizationQuality.as_dict()`).
    """

    output_dir: Path
    model_path: Path
    opset: int
    exporter: str
    fp16: bool
    max_abs_error: float
    tolerance: float
    preset: str | None
    export_seconds: float
    precision: str = "fp32"
    quality: dict[str, Any] | None = None


def epsilon_model(unet: Any, fp16: bool) -> Any:
    """The `torch.nn.Module` that maps (sample, timestep) to eps_theta as a plain float32 tensor."""
    import torch

    class EpsilonModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.unet = unet.half() if fp16 else unet

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            # float32 in and out even for fp16 weights, so the NumPy sampler never sees float16.
            return self.unet(sample.to(self.unet.dtype), timestep).sample.float()

    return EpsilonModel().eval()


def unet_gflop_per_image(unet: Any) -> float:
    """The UNet's GFLOP for one image at one step, as `torch.utils.flop_counter.FlopCounterMode` counts them on a
    batch of 1 (the figure the engine choice multiplies by the batch size)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    config = unet.config
    sample = torch.zeros(1, config.in_channels, config.sample_size, config.sample_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor([500]))
    return counter.get_total_flops() / 1e9


def check_export_arguments(exporter: str, opset: int, tolerance: float) -> None:
    """Refuse settings no export can satisfy, before anything is loaded or written."""
    if exporter not in EXPORTERS:
        raise ValueError(f"`exporter` must be one of {EXPORTERS}, got {exporter!r}.")
    low, high = OPSET_RANGE[exporter]
    if not low <= opset <= high:
        raise ValueError(f"the {exporter} exporter writes opsets {low}..{high}, got --opset {opset}.")
    if not (tolerance > 0 and np.isfinite(tolerance)):
        raise ValueError(f"`tolerance` (the max |eps_onnx - eps_torch| allowed) must be a positive number, got {tolerance!r}.")


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
    exporter: Exporter = "dynamo",
    tolerance: float | None = None,
    validation_batch_size: int = 3,
    seed: int | None = None,
    quantize: "Int8Settings | None" = None,
) -> OnnxExportReport:
    r"""
    Export the UNet of the pipeline in `model_dir` to `output_dir/model.onnx`, validate it, write the folder.

    Args:
        model_dir (`str` or `os.PathLike`):
            A pipeline folder (`unet/` and `scheduler/`), as `DDPMPaperPipeline.save_pretrained` writes it.
        output_dir (`str` or `os.PathLike`):
            Where to write the export (created; existing export files are replaced).
        opset (`int`, *optional*):
            The ONNX opset: 18 by default with the dynamo exporter (18..23), 17 with the TorchScript one (11..20).
        fp16 (`bool`, *optional*, defaults to `False`):
            Float16 weights and activations for GPUs; the model's inputs and outputs stay float32.
        exporter (`str`, *optional*, defaults to `"dynamo"`):
            `"dynamo"` (`torch.onnx.export(..., dynamo=True)`, needs onnxscript) or `"torchscript"` (deprecated
            by torch; kept while torch ships it).
        tolerance (`float`, *optional*):
            Max allowed |eps_onnx - eps_torch|; defaults to 1e-4 (fp32) or 5e-2 (fp16).
        validation_batch_size (`int`, *optional*, defaults to 3):
            Batch size of the validation inputs; differs from the traced batch so the batch axis is tested.
        seed (`int`, *optional*):
            Seed of the validation inputs; fresh random inputs when None.
        quantize ([`Int8Settings`], *optional*):
            Write a static int8 graph instead (`ddpm_plugin.export.quantize`): the float32 graph is exported and
            validated as above, then quantized, calibrated on x_t from `quantize.calibration_data` (default: the
            training data set named in `model_dir/training_config.json`), and held to `quantize.budget`.

    Returns:
        [`OnnxExportReport`]: paths, opset, the measured max abs error and the tolerance.

    Raises:
        `OnnxValidationError`: the export disagrees with PyTorch beyond `tolerance`, or the int8 graph's quality
        is outside its budget. Nothing is left behind
        when an export fails: a folder it created is removed, and an earlier export in `output_dir` is kept.
    """
    import torch
    from diffusers import UNet2DModel

    import ddpm_plugin

    started = time.perf_counter()
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    opset = DEFAULT_OPSET.get(exporter, 0) if opset is None else int(opset)
    tolerance = DEFAULT_TOLERANCE[fp16] if tolerance is None else float(tolerance)
    check_export_arguments(exporter, opset, tolerance)
    if fp16 and quantize is not None:
        raise ValueError("choose one precision: fp16 or int8 quantization, not both.")
    precision = "int8" if quantize is not None else "fp16" if fp16 else "fp32"
    scheduler_config = model_dir / SCHEDULER_CONFIG
    weights = model_dir / "unet" / WEIGHTS_NAME
    if not weights.is_file() or not scheduler_config.is_file():
        raise FileNotFoundError(f"{model_dir} is not a pipeline folder (it needs unet/{WEIGHTS_NAME} and {SCHEDULER_CONFIG}).")
    check_pipeline_folder(model_dir)
    if output_dir.resolve() == model_dir.resolve():
        raise ValueError(
            f"write the export to its own folder, such as {model_dir / ONNX_SUBFOLDER}, not into {model_dir}."
        )
    unet = UNet2DModel.from_pretrained(model_dir, subfolder="unet", use_safetensors=True).eval()
    sample_size = unet.config.sample_size
    if not isinstance(sample_size, int):
        raise ValueError(f"only square UNets are supported, got `sample_size` {sample_size!r}.")
    image_shape = (unet.config.in_channels, sample_size, sample_size)
    gflop_per_image = unet_gflop_per_image(unet)  # counted in float32, before the export may cast the network
    if quantize is not None:  # the data are read before any work, so a bad data set fails fast
        quantize, calibration_images = _calibration_images(model_dir, image_shape, quantize)
    reference = epsilon_model(UNet2DModel.from_config(unet.config).eval(), fp16=False)
    reference.unet.load_state_dict(unet.state_dict())

    # Written in a sibling temporary folder and moved into place only once validated.
    staging = output_dir.parent / f".{output_dir.name}.export-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        model_path = staging / ONNX_MODEL_FILE
        _export(epsilon_model(unet, fp16), image_shape, model_path, opset, exporter)
        float16_weights = _rewrite_graph(model_path, store_float16=precision == "fp32")
        max_abs_error = _max_abs_error(model_path, reference, image_shape, validation_batch_size, seed)
        if not max_abs_error <= tolerance:
            raise OnnxValidationError(
                f"the ONNX model disagrees with PyTorch: max |eps_onnx - eps_torch| = {max_abs_error:.3g} exceeds "
                f"the tolerance {tolerance:.3g} (opset {opset}, {exporter} exporter, fp16={fp16})."
            )
        if quantize is not None:
            quantization, quality = _quantize(model_path, calibration_images, scheduler_config, quantize)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    (staging / SCHEDULER_CONFIG).parent.mkdir()
    shutil.copyfile(scheduler_config, staging / SCHEDULER_CONFIG)
    preset = detect_preset(dict(unet.config))
    metadata = {
        "format_version": FORMAT_VERSION,
        "model_file": ONNX_MODEL_FILE,
        "input_names": list(INPUT_NAMES),
        "output_name": OUTPUT_NAME,
        "sample_size": sample_size,
        "in_channels": unet.config.in_channels,
        "opset": opset,
        "exporter": exporter,
        "precision": precision,
        "fp16": fp16,
        "gflop_per_image": round(gflop_per_image, 6),  # the work per image and step that the engine choice weighs
        "float16_stored_weights": float16_weights,
        "max_abs_error": max_abs_error,
        "tolerance": tolerance,
        "preset": preset,
        "source_model": _source_model(model_dir, output_dir),
        "source_weights_sha256": file_sha256(weights),
        "ddpm_plugin_version": ddpm_plugin.__version__,
        "torch_version": torch.__version__,
    }
    if quantize is not None:
        metadata.update(quantization=quantization, quality=quality.as_dict())
        if quantize.float32_below_t > 0:
            metadata.update(float32_model_file=ONNX_FLOAT32_MODEL_FILE, float32_below_t=quantize.float32_below_t)
    (staging / ONNX_METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    write_coefficients(staging)  # the float64 schedule, for samplers outside Python (the browser page)
    _replace_folder(staging, output_dir)
    return OnnxExportReport(
        output_dir=output_dir, model_path=output_dir / ONNX_MODEL_FILE, opset=opset, exporter=exporter, fp16=fp16,
        max_abs_error=max_abs_error, tolerance=tolerance, preset=preset, export_seconds=time.perf_counter() - started,
        precision=precision, quality=quality.as_dict() if quantize is not None else None,
    )


def _calibration_images(model_dir: Path, image_shape: tuple[int, int, int], settings: "Int8Settings") -> tuple["Int8Settings", np.ndarray]:
    """The settings with their data set resolved (the pipeline's training data by default), and its images."""
    from dataclasses import replace

    from ddpm_plugin.data import dataset_images

    dataset = settings.calibration_data
    if dataset is None:
        training_config = model_dir / TRAINING_CONFIG_FILE
        if training_config.is_file():
            dataset = json.loads(training_config.read_text()).get("dataset")
        if not dataset:
            raise ValueError(
                f"int8 calibration needs the training images: {model_dir} names no data set in training_config.json, "
                "so pass one (--calibration-data digits|mnist|FOLDER|FILE.npz|HF_NAME)."
            )
    images, _ = dataset_images(dataset, image_shape, None, seed=settings.seed)
    return replace(settings, calibration_data=dataset), images


def _quantize(
    model_path: Path, images: np.ndarray, scheduler_config: Path, settings: "Int8Settings"
) -> tuple[dict[str, Any], Any]:
    """Replace the validated float32 graph at `model_path` by its int8 graph, if that keeps within the budget;
    the float32 graph stays beside it as `ONNX_FLOAT32_MODEL_FILE` when the sampler runs it for small t."""
    from .quantize import LAYER_GROUPS, quantize_and_measure

    int8_path = model_path.with_name("model.int8.onnx")
    record, quality = quantize_and_measure(
        model_path, int8_path, images, json.loads(scheduler_config.read_text()), settings
    )
    if not quality.within_budget:
        raise OnnxValidationError(
            f"the int8 graph raises the eps error (Eq. 12-weighted, {quality.num_inputs} held-out x_t) by "
            f"{quality.bound_rise:.2%} over the float32 graph, beyond the budget {quality.budget:.2%} "
            f"(float32 kept for {list(settings.keep_float) or 'no layer group'} and for t < {settings.float32_below_t}); "
            f"keep more of the layer groups {', '.join(LAYER_GROUPS)} in float32 (--keep-float), run float32 for more "
            f"small t (--float32-below-t), or export float32."
        )
    if settings.float32_below_t > 0:
        os.replace(model_path, model_path.with_name(ONNX_FLOAT32_MODEL_FILE))
    os.replace(int8_path, model_path)
    return record, quality


def _replace_folder(staging: Path, output_dir: Path) -> None:
    """Move the validated export into `output_dir`, replacing the export files there (other files stay)."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*output_dir.glob(f"{ONNX_MODEL_FILE}*"), output_dir / ONNX_FLOAT32_MODEL_FILE, output_dir / ONNX_METADATA_FILE]:
        stale.unlink(missing_ok=True)
    shutil.rmtree(output_dir / Path(SCHEDULER_CONFIG).parent, ignore_errors=True)
    for item in staging.iterdir():
        os.replace(item, output_dir / item.name)
    staging.rmdir()


def _source_model(model_dir: Path, output_dir: Path) -> str:
    """The pipeline folder as a path relative to the export when the export lives inside it (`DIR/onnx`), so
    the pair can move (the bundled model, a Hub repo); else its absolute path."""
    source, output = model_dir.resolve(), output_dir.resolve()
    return os.path.relpath(source, output) if output.is_relative_to(source) else str(source)


def _export(model: Any, image_shape: tuple[int, int, int], path: Path, opset: int, exporter: str) -> None:
    """Export `model` from an example at batch EXPORT_BATCH_SIZE with a dynamic batch axis."""
    import torch

    dtype = next(model.parameters()).dtype
    example = (
        torch.randn(EXPORT_BATCH_SIZE, *image_shape, dtype=torch.float32),
        torch.randint(0, 1000, (EXPORT_BATCH_SIZE,), dtype=torch.int64),
    )
    names = {"input_names": list(INPUT_NAMES), "output_names": [OUTPUT_NAME]}
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    with warnings.catch_warnings(), torch.no_grad():
        # Expected notices: the TorchScript exporter's deprecation and diffusers' shape asserts (TracerWarning);
        # the dynamo exporter's note that torchvision's operators are not registered.
        warnings.simplefilter("ignore")
        exporter_log.setLevel(logging.ERROR)
        try:
            if exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=1 << 16)
                program = torch.onnx.export(
                    model, example, dynamo=True, opset_version=opset, verbose=False, optimize=True,
                    dynamic_shapes={INPUT_NAMES[0]: {0: batch}, INPUT_NAMES[1]: {0: batch}}, **names,
                )
                program.save(str(path))
            else:
                axes = {0: "batch"}
                torch.onnx.export(
                    model, example, str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                    dynamic_axes={INPUT_NAMES[0]: axes, INPUT_NAMES[1]: axes, OUTPUT_NAME: axes}, **names,
                )
        finally:
            exporter_log.setLevel(level)
    if dtype == torch.float16:
        _check_float32_interface(path)


def _rewrite_graph(path: Path, store_float16: bool) -> int:
    """The exported graph at `path`, loaded and saved once: its reshape targets frozen and, with `store_float16`,
    its exactly-float16 weights stored as float16. Returns the number of weights so stored."""
    import onnx

    model = onnx.load(str(path))
    _freeze_reshape_targets(model)
    float16_weights = _store_exact_float16_weights(model) if store_float16 else 0
    onnx.save(model, str(path))
    return float16_weights


def _freeze_reshape_targets(model: Any) -> int:
    """Replace every `Reshape` target computed at run time (Shape -> Gather -> Unsqueeze -> Concat) by a
    constant, with 0 ("copy the input's dim") for the batch axis, and drop the nodes that computed it.

    The TorchScript exporter computes most reshape targets from the input's shape because the batch axis is
    dynamic: one such chain per GroupNorm and attention reshape. On small images these chains cost more than
    the convolutions.

    The targets are read from the output shapes of two real runs of the graph, at batch sizes 2 and 3, not
    from shape inference (whose symbolic form differs across onnx/onnxruntime releases and gives up on some
    dynamo graphs): an axis equal in both runs is a constant, an axis 0 that follows the batch size copies the
    input's (unless `allowzero` is set, which some exporter releases write), and one other varying axis becomes
    -1. A target with two varying axes is left computed. `model` (an `onnx.ModelProto`) is changed in place;
    returns the number of targets frozen. Validation afterwards checks the result at another batch size.
    """
    import onnx

    constants = {init.name for init in model.graph.initializer} | {
        node.output[0] for node in model.graph.node if node.op_type == "Constant"
    }
    computed = [node for node in model.graph.node if node.op_type == "Reshape" and node.input[1] not in constants]
    if not computed:
        return 0
    runs = [_reshape_shapes(model, computed, batch_size) for batch_size in (2, 3)]
    frozen = 0
    for index, node in enumerate(computed):
        (source_2, output_2), (source_3, output_3) = runs[0][index], runs[1][index]
        allowzero = any(attribute.name == "allowzero" and attribute.i for attribute in node.attribute)
        dims = []
        for axis, (dim_2, dim_3) in enumerate(zip(output_2.tolist(), output_3.tolist())):
            if dim_2 == dim_3:
                dims.append(dim_2)
            elif axis == 0 and (dim_2, dim_3) == (source_2[0], source_3[0]) == (2, 3) and not allowzero:
                dims.append(0)  # Reshape copies the input's (dynamic) batch size (with allowzero, 0 is a 0)
            else:
                dims.append(-1)
        if dims.count(-1) > 1:
            continue
        name = f"{node.output[0]}__frozen_shape"
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.array(dims, dtype=np.int64), name))
        node.input[1] = name
        frozen += 1
    _remove_dead_nodes(model.graph)
    return frozen


def _store_exact_float16_weights(model: Any) -> int:
    """Store each float32 weight whose every value is a float16 (weights trained or saved in half precision)
    as float16, with a `Cast` back to float32 in front of its users: the file shrinks by up to half and every
    computation, hence every output, stays bit-identical (onnxruntime folds the casts when a session opens).
    `model` (an `onnx.ModelProto`) is changed in place. Returns the number of weights so stored; weights with any
    value float16 cannot hold stay float32.
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    kept, casts = [], []
    for init in graph.initializer:
        weights = numpy_helper.to_array(init)
        if weights.dtype != np.float32 or weights.size < 256 or not np.isfinite(weights).all():
            kept.append(init)
            continue
        half = weights.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), weights):
            kept.append(init)
            continue
        kept.append(numpy_helper.from_array(half, f"{init.name}__float16"))
        casts.append(onnx.helper.make_node("Cast", [f"{init.name}__float16"], [init.name], to=onnx.TensorProto.FLOAT))
    if casts:
        del graph.initializer[:]
        graph.initializer.extend(kept)
        nodes = casts + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return len(casts)


def _reshape_shapes(model: Any, reshapes: list, batch_size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(input shape, output shape) of each of `reshapes` in one onnxruntime run of `model` at `batch_size`."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    names = []
    for index, node in enumerate(reshapes):
        for side, tensor in (("in", node.input[0]), ("out", node.output[0])):
            names.append(f"__reshape_probe_{index}_{side}")
            probe.graph.node.append(onnx.helper.make_node("Shape", [tensor], [names[-1]]))
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None) for name in names)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for value in session.get_inputs():
        shape = [dim if isinstance(dim, int) else batch_size for dim in value.shape]
        if value.type == "tensor(int64)":
            feeds[value.name] = rng.integers(0, 1000, shape)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    values = session.run(names, feeds)
    return list(zip(values[0::2], values[1::2]))


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

