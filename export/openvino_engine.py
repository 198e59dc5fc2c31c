"""The exported UNet on OpenVINO's CPU runtime, in float32 or in bfloat16, from the same float32 ONNX export.

OpenVINO reads `model.onnx` itself and compiles it once per batch size with static shapes (its kernels are
chosen for the shape). In `"bf16"` it runs the float32 graph with `INFERENCE_PRECISION_HINT=bf16`: on CPUs
with AMX or AVX-512 bf16 the convolutions and matrix products run in bfloat16, the rest as the plugin chooses.
As the int8 export does, bf16 keeps a float32 compilation of the same graph for t < `float32_below_t`
(time-step-aware precision), where reduced precision costs the bound most.

The input, timestep and output are OpenVINO tensors over NumPy arrays (shared memory), set on the infer
requests once, so a step is one `infer()` with nothing copied or re-set: the interface of
`onnx_pipeline.BoundUNet`.

Imported only when the OpenVINO engine is chosen (`pip install "ddpm-plugin[openvino]"`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import numpy as np
import openvino as ov

from .cpu import physical_cpu_count
from .numpy_sampler import UNetBuffers
from .onnx_folder import OnnxModelError

OpenVinoPrecision = Literal["fp32", "bf16"]
OPENVINO_PRECISIONS: tuple[OpenVinoPrecision, ...] = get_args(OpenVinoPrecision)
_HINTS = {"fp32": "f32", "bf16": "bf16"}


class OpenVinoUNet(UNetBuffers):
    """eps_theta(x_t, t) for one batch size on OpenVINO, with `sample`, `timestep` and `noise_pred` host arrays
    shared with the infer requests (write into `sample`, never replace it)."""

    def __init__(self, requests: list[ov.InferRequest], shape: tuple[int, ...], float32_below_t: int = 0) -> None:
        super().__init__(shape)
        self.float32_below_t = float32_below_t if len(requests) > 1 else 0
        for request in requests:
            request.set_input_tensor(0, ov.Tensor(self._sample, shared_memory=True))
            request.set_input_tensor(1, ov.Tensor(self._timestep, shared_memory=True))
            request.set_output_tensor(0, ov.Tensor(self._noise_pred, shared_memory=True))
        self._requests = requests

    def __call__(self, t: int) -> np.ndarray:
        self._timestep.fill(t)
        self._requests[t < self.float32_below_t].infer()
        return self._noise_pred


class OpenVinoEngine:
    r"""
    An ONNX export's UNet compiled by OpenVINO for the CPU.

    Args:
        model_path (`Path`): The export's float32 `model.onnx` (checked by `onnx_folder.open_export_folder`).
        image_shape (`tuple`): (channels, height, width) of the export's metadata.
        precision (`str`, *optional*, defaults to `"fp32"`): `"fp32"` or `"bf16"` (OpenVINO's inference precision).
        num_threads (`int`, *optional*): Inference threads; defaults to the number of physical cores.
        float32_below_t (`int`, *optional*, defaults to 0): With `"bf16"`, the t below which the float32
            compilation runs.
    """

    name = "openvino"

    def __init__(
        self, model_path: Path, image_shape: tuple[int, int, int], precision: OpenVinoPrecision = "fp32",
        num_threads: int | None = None, float32_below_t: int = 0,
    ) -> None:
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"the OpenVINO `precision` must be one of {list(OPENVINO_PRECISIONS)}, got {precision!r}.")
        if isinstance(float32_below_t, bool) or not isinstance(float32_below_t, int) or float32_below_t < 0:
            raise ValueError(f"`float32_below_t` must be an integer >= 0, got {float32_below_t!r}.")
        self.precision = precision
        self.float32_below_t = float32_below_t if precision != "fp32" else 0
        self.num_threads = num_threads or physical_cpu_count()
        self.core = ov.Core()
        try:
            self.model = self.core.read_model(str(model_path))
        except RuntimeError as error:
            raise OnnxModelError(f"OpenVINO {ov.__version__} cannot read {model_path}: {error}") from error
        inputs, outputs = self.model.inputs, self.model.outputs
        if len(inputs) != 2 or len(outputs) != 1:
            raise OnnxModelError(f"the ONNX model must take (sample, timestep) and return eps; it has "
                                 f"{len(inputs)} inputs and {len(outputs)} outputs.")
        self.image_shape = tuple(image_shape)

    @property
    def providers(self) -> list[str]:
        """What runs the network, in the words of `OnnxDDPMPipeline.providers`."""
        return [f"OpenVINO {ov.__version__.split('-')[0]} CPU ({self.precision})"]

    def _compile(self, batch_size: int, precision: OpenVinoPrecision) -> ov.InferRequest:
        model = self.model.clone()
        sample, timestep = model.inputs
        model.reshape({sample.get_any_name(): ov.PartialShape([batch_size, *self.image_shape]),
                       timestep.get_any_name(): ov.PartialShape([batch_size])})
        config = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": self.num_threads}
        return self.core.compile_model(model, "CPU", config).create_infer_request()

    def bind(self, batch_size: int) -> OpenVinoUNet:
        """The UNet compiled for `batch_size` (and its float32 compilation for t < `float32_below_t`)."""
        requests = [self._compile(batch_size, self.precision)]
        if self.float32_below_t:
            requests.append(self._compile(batch_size, "fp32"))
        return OpenVinoUNet(requests, (batch_size, *self.image_shape), self.float32_below_t)
