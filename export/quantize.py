"""Static int8 quantization of an exported UNet, calibrated time-step-aware, and its quality against float32.

The UNet's activation ranges move with t: near t = T it sees almost pure noise, near t = 0 almost clean images.
So the calibration inputs are x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps (paper Eq. 4) with x_0
real training images and t stratified over the whole range 0..T-1, one t per input (the time-step-aware
calibration set of Q-Diffusion, Li et al. 2023, Sec. 4.2). onnxruntime's static quantizer then writes a QDQ
graph: int8 weights per output channel, uint8 activations with min/max ranges (the u8s8 form ORT's x86 kernels
run with VNNI/AMX), for the Conv, MatMul and Gemm nodes outside the layer groups kept in float.

Quality is measured on held-out x_t (other images, other noise): the eps error ||eps - eps_theta(x_t, t)||^2 of
the int8 graph against that of the float32 graph on the same x_t. The variational bound's terms are this error
weighted by lambda_t (paper Eq. 12), largest at small t; so the budget's measure draws t in proportion to
lambda_t, and its relative rise estimates the rise of the bound's eps-dependent part. L_simple (uniform t, the
training loss) is reported beside it. The export is refused when the rise exceeds the budget.

Time-step-aware precision (`float32_below_t`): the sampler runs the float32 graph, kept beside the int8 one, for
t < `float32_below_t` and the int8 graph above, since int8 costs most at small t; the quality measure prices the
schedule the sampler runs. The default threshold rests on docs/results/precision_quality_mnist.md.

This module needs `onnx` and `onnxruntime` (and NumPy), imported where used so that `ddpm export --help` reads
its constants quickly; never torch.
"""

from __future__ import annotations

import ast
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ddpm_plugin.pipelines.gaussian_diffusion import GaussianDiffusion

QUANTIZED_OP_TYPES = ("Conv", "MatMul", "Gemm")
# The layer groups that can be kept in float32, named after the UNet's modules; `first_down_block` and
# `last_up_block` are the encoder and decoder blocks at full resolution (their resnets and the first block's
# downsampler; their time projections and attention stay in their own groups).
LAYER_GROUPS = ("conv_in", "conv_out", "time_embedding", "attention", "first_down_block", "last_up_block")
# Kept in float by default: the two convolutions at full resolution (docs/results/precision_quality_digits_int8.md).
DEFAULT_KEEP_FLOAT: tuple[str, ...] = ("conv_in", "conv_out")
# Max relative rise of the Eq. 12-weighted eps error over the float32 graph on held-out x_t (0.03 = 3%).
DEFAULT_BOUND_BUDGET = 0.03
# Timesteps t < this run the float32 graph; 0: the int8 graph at every t (docs/results/precision_quality_mnist.md).
DEFAULT_FLOAT32_BELOW_T = 10
NUM_T_BANDS = 4  # the quality report gives L_simple per quarter of the t range as well
CALIBRATION_BATCH_SIZE = 16


@dataclass(frozen=True)
class Int8Settings:
    """How `ddpm export --quantize int8` calibrates and what quality it demands.

    Args:
        calibration_data (`str`, *optional*):
            The training images x_0 (any `ddpm train --dataset` value: `"digits"`, `"mnist"`, a folder, ...);
            defaults to the `dataset` of the pipeline's `training_config.json`.
        keep_float (`tuple[str]`, *optional*, defaults to `DEFAULT_KEEP_FLOAT`):
            Layer groups (of `LAYER_GROUPS`) left in float32.
        budget (`float`, *optional*, defaults to `DEFAULT_BOUND_BUDGET`):
            The largest relative rise of the Eq. 12-weighted eps error over the float32 graph (0.03 = 3%).
        calibration_inputs (`int`, *optional*, defaults to 256): x_t the ranges are calibrated on.
        quality_inputs (`int`, *optional*, defaults to 1024): held-out x_t in each of the two quality sets.
        seed (`int`, *optional*, defaults to 0): Seed of the image choice, the t and the noise.
        float32_below_t (`int`, *optional*, defaults to `DEFAULT_FLOAT32_BELOW_T`):
            Timesteps t < this run the float32 graph, kept in the export beside the int8 one; 0 keeps only int8.
    """

    calibration_data: str | None = None
    keep_float: tuple[str, ...] = DEFAULT_KEEP_FLOAT
    budget: float = DEFAULT_BOUND_BUDGET
    calibration_inputs: int = 256
    quality_inputs: int = 1024
    seed: int = 0
    float32_below_t: int = DEFAULT_FLOAT32_BELOW_T

    def __post_init__(self) -> None:
        unknown = sorted(set(self.keep_float) - set(LAYER_GROUPS))
        if unknown:
            raise ValueError(f"`keep_float` names unknown layer groups {unknown}; the groups are {list(LAYER_GROUPS)}.")
        if not (self.budget > 0 and np.isfinite(self.budget)):
            raise ValueError(f"the int8 quality `budget` must be a positive fraction, got {self.budget!r}.")
        for name, least in (("calibration_inputs", 1), ("quality_inputs", 1), ("float32_below_t", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"`{name}` must be an integer >= {least}, got {value!r}.")


@dataclass(frozen=True)
class DenoisingInputs:
    """(x_t, t) pairs with the noise eps that made them, so L_simple can be measured.

    Args:
        sample (`np.ndarray` float32 `[N, C, H, W]`): x_t.
        timestep (`np.ndarray` int64 `[N]`): t, stratified over 0..T-1.
        noise (`np.ndarray` float32 `[N, C, H, W]`): eps in x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
    """

    sample: np.ndarray
    timestep: np.ndarray
    noise: np.ndarray

    def __len__(self) -> int:
        return len(self.timestep)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for start in range(0, len(self), batch_size):
            yield {"sample": self.sample[start:start + batch_size], "timestep": self.timestep[start:start + batch_size]}


def denoising_inputs(
    images: np.ndarray, diffusion: GaussianDiffusion, num_inputs: int, seed: int, t_weights: np.ndarray | None = None
) -> DenoisingInputs:
    """`num_inputs` x_t (Eq. 4) from uint8 NHWC `images`, with t stratified over 0..T-1 in proportion to
    `t_weights` (uniformly when None): input i has t at the (i + u_i) / N quantile of that distribution.

    Every part of the t range is covered whatever `num_inputs` is, which plain random t does not promise for a
    few dozen inputs. The images are drawn with replacement; eps ~ N(0, I).
    """
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"`images` must be a non-empty uint8 NHWC array, got {images.dtype} {images.shape}.")
    if num_inputs < 1:
        raise ValueError(f"`num_inputs` must be a positive integer, got {num_inputs!r}.")
    rng = np.random.default_rng(seed)
    num_timesteps = diffusion.num_timesteps
    weights = np.ones(num_timesteps) if t_weights is None else np.asarray(t_weights, dtype=np.float64)
    cumulative = np.cumsum(weights) / weights.sum()
    quantiles = (np.arange(num_inputs) + rng.random(num_inputs)) / num_inputs
    t = np.minimum(np.searchsorted(cumulative, quantiles, side="right"), num_timesteps - 1).astype(np.int64)
    x_start = images[rng.integers(0, len(images), num_inputs)].transpose(0, 3, 1, 2) / 127.5 - 1.0
    noise = rng.standard_normal(x_start.shape)
    x_t = diffusion.q_sample(x_start, t, noise)
    order = rng.permutation(num_inputs)  # calibration batches mix all t
    return DenoisingInputs(
        sample=x_t[order].astype(np.float32), timestep=t[order], noise=noise[order].astype(np.float32)
    )


# --- Which node belongs to which layer group. ---


def module_path(node: Any) -> str:
    """The UNet module a node was exported from, as a dotted path (`unet.down_blocks.1.attentions.0.to_q`).

    The dynamo exporter records the module scopes in the node's `pkg.torch.onnx.name_scopes` metadata; the
    TorchScript exporter names nodes `/unet/down_blocks.1/attentions.0/to_q/MatMul`.
    """
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = [scope for scope in ast.literal_eval(prop.value) if scope.startswith("unet")]
            return scopes[-1] if scopes else ""
    return ".".join(part for part in node.name.split("/")[1:-1])


def layer_group(node: Any, last_up_block: int | None = None) -> str | None:
    """The `LAYER_GROUPS` entry a Conv/MatMul/Gemm node belongs to, or None for the rest of the network.
    `last_up_block` is the index of the UNet's last up block (`last_up_block_index`)."""
    path = module_path(node)
    parts = path.split(".")
    if path == "unet.conv_in":
        return "conv_in"
    if path == "unet.conv_out":
        return "conv_out"
    if "time_embedding" in parts or "time_emb_proj" in parts:
        return "time_embedding"
    if "attentions" in parts:
        return "attention"
    if parts[1:3] == ["down_blocks", "0"]:
        return "first_down_block"
    if last_up_block is not None and parts[1:3] == ["up_blocks", str(last_up_block)]:
        return "last_up_block"
    return None


def last_up_block_index(model: Any) -> int | None:
    """The index of the last `up_blocks` entry among the nodes of `model` (an `onnx.ModelProto`), if any."""
    indices = [int(parts[2]) for parts in (module_path(node).split(".") for node in model.graph.node)
               if parts[1:2] == ["up_blocks"] and len(parts) > 2 and parts[2].isdigit()]
    return max(indices, default=None)


def nodes_kept_in_float(model: Any, keep_float: Sequence[str]) -> list[str]:
    """Names of the Conv/MatMul/Gemm nodes of `model` (an `onnx.ModelProto`) in the `keep_float` groups."""
    last_up_block = last_up_block_index(model)
    return [
        node.name for node in model.graph.node
        if node.op_type in QUANTIZED_OP_TYPES and layer_group(node, last_up_block) in keep_float
    ]


# --- Quantization. ---


def quantize_int8(
    model_path: Path, output_path: Path, calibration: DenoisingInputs, keep_float: Sequence[str] = DEFAULT_KEEP_FLOAT
) -> dict[str, Any]:
    """Write the static QDQ int8 graph of the float32 `model_path` to `output_path`; returns what was done
    (for `ddpm_onnx.json`): node counts, kept groups, calibration size and t range."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class CalibrationReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = calibration.batches(CALIBRATION_BATCH_SIZE)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    model = onnx.load(str(model_path))
    excluded = nodes_kept_in_float(model, keep_float)
    candidates = [node for node in model.graph.node if node.op_type in QUANTIZED_OP_TYPES]
    with tempfile.TemporaryDirectory(prefix="ddpm-quantize-") as scratch:
        # The calibrator writes an augmented copy of the model next to it: keep that out of the export folder.
        source = Path(scratch) / "model.onnx"
        onnx.save(model, str(source))
        quantize_static(
            str(source), str(output_path), CalibrationReader(), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=list(QUANTIZED_OP_TYPES),
            nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
        )
    return {
        "method": "onnxruntime static QDQ, per-channel int8 weights, uint8 activations (min/max)",
        "op_types": list(QUANTIZED_OP_TYPES),
        "quantized_nodes": len(candidates) - len(excluded),
        "float_nodes": len(excluded),
        "keep_float": list(keep_float),
        "calibration_inputs": len(calibration),
        "calibration_timesteps": [int(calibration.timestep.min()), int(calibration.timestep.max())],
    }


# --- Quality against float32. ---


def eps_error_weights(diffusion: GaussianDiffusion, variance_type: str) -> np.ndarray:
    """lambda_t of paper Eq. 12: L_{t-1} = lambda_t E ||eps - eps_theta(x_t, t)||^2 + C, with
    lambda_t = beta_t^2 / (2 sigma_t^2 alpha_t (1 - alpha_bar_t)), in nats per squared unit, for t = 0..T-1.

    At t = 0 the bound's term is the discretized decoder, not a KL; its weight here is the KL's formula with
    the decoder's sigma, which is what a small change of the mean costs there as well.
    """
    sigma_squared = np.exp(diffusion.model_log_variance(variance_type))
    alphas = 1.0 - diffusion.betas
    return diffusion.betas**2 / (2.0 * sigma_squared * alphas * (1.0 - diffusion.alphas_cumprod))


@dataclass(frozen=True)
class QuantizationQuality:
    """The int8 graph against the float32 graph on the same held-out x_t.

    Args:
        loss (`float`): L_simple of the int8 graph (uniform t), mean ||eps - eps_theta||^2 per dimension.
        reference_loss (`float`): L_simple of the float32 graph on the same x_t.
        loss_rise (`float`): loss / reference_loss - 1.
        bound_rise (`float`): The same rise on x_t with t drawn in proportion to lambda_t (Eq. 12): the relative
            rise of the eps-dependent part of the bound. The budget's measure.
        band_loss_rise (`list[float]`): `loss_rise` in each quarter of the t range (t = 0..T/4-1 first).
        eps_relative_rms (`float`): ||eps_int8 - eps_fp32|| / ||eps_fp32|| (uniform t).
        budget (`float`): The largest `bound_rise` allowed.
        num_inputs (`int`): Held-out x_t in each of the two sets (uniform t, lambda_t-weighted t).
        float32_below_t (`int`): The schedule measured: eps from the float32 graph for t below it; every measure
            above is of that schedule.
        int8_everywhere_bound_rise (`float`): `bound_rise` with the int8 graph at every t, for comparison.
    """

    loss: float
    reference_loss: float
    loss_rise: float
    bound_rise: float
    band_loss_rise: list[float]
    eps_relative_rms: float
    budget: float
    num_inputs: int
    float32_below_t: int = 0
    int8_everywhere_bound_rise: float | None = None

    @property
    def within_budget(self) -> bool:
        return self.bound_rise <= self.budget

    def as_dict(self) -> dict[str, Any]:
        measure = "relative rise of the eps error over the float32 graph on held-out x_t, t drawn by lambda_t (Eq. 12)"
        return {"measure": measure, **asdict(self)}


def predict_eps(model_path: Path, inputs: DenoisingInputs, batch_size: int = 64, num_threads: int | None = None) -> np.ndarray:
    """eps_theta(x_t, t) of an ONNX UNet on every input, on ORT's CPU provider."""
    import onnxruntime as ort

    from .providers import CPU, session_options

    session = ort.InferenceSession(str(model_path), session_options(num_threads), providers=[CPU])
    return np.concatenate([session.run(None, batch)[0] for batch in inputs.batches(batch_size)])


def squared_eps_error(eps: np.ndarray, inputs: DenoisingInputs) -> np.ndarray:
    """||eps - eps_theta(x_t, t)||^2 per input, averaged over dimensions, in float64."""
    assert eps.shape == inputs.noise.shape
    return ((eps.astype(np.float64) - inputs.noise) ** 2).reshape(len(inputs), -1).mean(axis=1)


def scheduled_eps(inputs: DenoisingInputs, int8_eps: np.ndarray, float32_eps: np.ndarray, float32_below_t: int) -> np.ndarray:
    """The eps the time-step-aware sampler gets: the float32 graph's for t < `float32_below_t`, else int8's."""
    low = (inputs.timestep < float32_below_t).reshape(-1, *([1] * (int8_eps.ndim - 1)))
    return np.where(low, float32_eps, int8_eps)


def quantization_quality(
    uniform: DenoisingInputs, uniform_eps: tuple[np.ndarray, np.ndarray],
    weighted: DenoisingInputs, weighted_eps: tuple[np.ndarray, np.ndarray], num_timesteps: int, budget: float,
    float32_below_t: int = 0,
) -> QuantizationQuality:
    """Compare (int8 eps, float32 eps) on `uniform` (t uniform) and on `weighted` (t drawn by lambda_t), with the
    float32 graph's eps standing in for t < `float32_below_t`."""
    int8_everywhere = squared_eps_error(weighted_eps[0], weighted).sum() / squared_eps_error(weighted_eps[1], weighted).sum() - 1.0
    uniform_eps = (scheduled_eps(uniform, *uniform_eps, float32_below_t), uniform_eps[1])
    weighted_eps = (scheduled_eps(weighted, *weighted_eps, float32_below_t), weighted_eps[1])
    squared, reference_squared = (squared_eps_error(eps, uniform) for eps in uniform_eps)
    bands = np.minimum(uniform.timestep * NUM_T_BANDS // num_timesteps, NUM_T_BANDS - 1)
    band_rise = [
        float(squared[bands == band].sum() / reference_squared[bands == band].sum() - 1.0)
        for band in range(NUM_T_BANDS) if np.any(bands == band)
    ]
    weighted_squared, weighted_reference = (squared_eps_error(eps, weighted).sum() for eps in weighted_eps)
    eps, reference_eps = (eps.astype(np.float64).ravel() for eps in uniform_eps)
    return QuantizationQuality(
        loss=float(squared.mean()), reference_loss=float(reference_squared.mean()),
        loss_rise=float(squared.sum() / reference_squared.sum() - 1.0),
        bound_rise=float(weighted_squared / weighted_reference - 1.0), band_loss_rise=band_rise,
        eps_relative_rms=float(np.linalg.norm(eps - reference_eps) / np.linalg.norm(reference_eps)),
        budget=float(budget), num_inputs=len(uniform), float32_below_t=int(float32_below_t),
        int8_everywhere_bound_rise=float(int8_everywhere),
    )


def quantize_and_measure(
    model_path: Path, output_path: Path, images: np.ndarray, scheduler_config: dict[str, Any], settings: Int8Settings
) -> tuple[dict[str, Any], QuantizationQuality]:
    """Quantize the float32 graph `model_path` to `output_path` calibrated on half of `images` (uint8 NHWC),
    and measure it against the float32 graph on x_t from the other half. Returns the quantization record and
    the quality; checking the budget is the caller's."""
    diffusion = GaussianDiffusion.from_config(scheduler_config)
    order = np.random.default_rng(settings.seed).permutation(len(images))
    half = max(1, len(images) // 2)
    calibration_images, quality_images = images[order[:half]], images[order[half:]] if len(images) > 1 else images
    calibration = denoising_inputs(calibration_images, diffusion, settings.calibration_inputs, settings.seed)
    lambda_t = eps_error_weights(diffusion, scheduler_config.get("variance_type") or "fixed_small")
    uniform = denoising_inputs(quality_images, diffusion, settings.quality_inputs, settings.seed + 1)
    weighted = denoising_inputs(quality_images, diffusion, settings.quality_inputs, settings.seed + 2, t_weights=lambda_t)
    record = quantize_int8(model_path, output_path, calibration, settings.keep_float)
    record["calibration_data"] = settings.calibration_data
    record["float32_below_t"] = settings.float32_below_t
    quality = quantization_quality(
        uniform, (predict_eps(output_path, uniform), predict_eps(model_path, uniform)),
        weighted, (predict_eps(output_path, weighted), predict_eps(model_path, weighted)),
        diffusion.num_timesteps, settings.budget, settings.float32_below_t,
    )
    return record, quality
