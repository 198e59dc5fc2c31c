"""`open_sampler`: the one way to open a model folder for sampling, on PyTorch or ONNX Runtime.

The `ddpm` command, the demo, `ddpm push`'s card grid and the benchmarks open their samplers here. onnxruntime is
imported only for the ONNX Runtime backend, OpenVINO only for its own and torch only for the PyTorch one, so each
works without the others.
"""

from __future__ import annotations

import os
from typing import Any

from ddpm_plugin.bundled import resolve_model
from ddpm_plugin.sampling import (
    ImageSampler,
    OnnxImageSampler,
    TorchImageSampler,
    check_seed,
    load_pipeline,
    loaded_files,
)
from ddpm_plugin.vocabulary import BF16_FLOAT32_BELOW_T, Backend, Precision, Sampler, check_eta, check_sampler, check_steps

from .engine_choice import choose_engine
from .numpy_sampler import dpm_solver_timesteps


def open_sampler(
    model: str | os.PathLike,
    backend: Backend | None = None,
    scheduler: Sampler = "ddpm",
    num_inference_steps: int = 1000,
    eta: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    num_threads: int | None = None,
    session_options: Any = None,
    progress_bar: bool = True,
    precision: Precision | None = None,
    batch_size: int = 1,
) -> ImageSampler:
    r"""
    An [`ImageSampler`] for a pipeline folder (or an export folder), holding what it loaded (`loaded`: the files
    with their SHA-256 and the resolved schedule), its backend and its precision.

    Args:
        model (`str` or `os.PathLike`): The pipeline folder, an export folder for ONNX Runtime, a `ddpm train` run
            folder, or a bundled model's name (`"mnist"`, `"digits"`), as [`ddpm_plugin.bundled.resolve_model`] reads it.
        backend (`str`, *optional*): `"onnxruntime"`, `"openvino"` (the export on OpenVINO's CPU runtime) or
            `"pytorch"`; when None, the engine table picks the fastest for this machine and `batch_size`
            ([`choose_engine`], whose `reason` says why).
        scheduler (`str`, *optional*, defaults to `"ddpm"`): `"ddpm"` (Algorithm 2), `"ddim"` or `"dpmsolver++"`.
        num_inference_steps (`int`, *optional*, defaults to 1000): Denoising steps, 1..T.
        eta (`float`, *optional*, defaults to 0.0): DDIM's stochasticity; must be 0 with `"ddpm"` and `"dpmsolver++"`.
        seed (`int`, *optional*, defaults to 0): The run's seed, 0..2**63-1.
        device (`str`, *optional*, defaults to `"cpu"`): `"cpu"`, `"cuda"`, `"cuda:N"`, or `"auto"` (CUDA when
            usable here, else the CPU).
        num_threads (`int`, *optional*): Threads of ONNX Runtime or OpenVINO on CPU (PyTorch follows
            `OMP_NUM_THREADS`); defaults to the engine choice's.
        session_options (`onnxruntime.SessionOptions`, *optional*): ONNX Runtime's session options, in place of
            `export.providers.session_options(num_threads)`.
        progress_bar (`bool`, *optional*, defaults to `True`): A progress bar over each batch's steps.
        precision (`str`, *optional*): `"fp32"` or `"bf16"` (OpenVINO and PyTorch, with float32 below t =
            `BF16_FLOAT32_BELOW_T`; onnxruntime runs the export's own precision); when None, the engine choice's.
        batch_size (`int`, *optional*, defaults to 1): The batch size the caller will draw, which the engine
            choice weighs (the sampler draws any batch size).
    """
    model = resolve_model(model)
    check_sampler(scheduler)
    check_seed(seed)
    check_eta(scheduler, eta)
    choice = choose_engine(model, batch_size, backend, precision)
    backend, num_threads = choice.backend, num_threads or choice.num_threads
    precision = None if backend == "onnxruntime" else choice.precision
    loaded = loaded_files(model, backend)  # before loading: a link or a device is refused, never read
    if backend == "pytorch":
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = load_pipeline(model, scheduler).to(device)
        below = 0
        if precision == "bf16":  # bf16 weights in channels-last, oneDNN's fastest bf16 convolutions
            import torch

            pipe.unet.bfloat16()  # Module.bfloat16: diffusers' `to(dtype)` warns about an empty list of modules
            pipe.unet.to(memory_format=torch.channels_last)
            below = BF16_FLOAT32_BELOW_T
        pipe.set_progress_bar_config(leave=False, disable=not progress_bar)
        check_steps(num_inference_steps, pipe.scheduler.config.num_train_timesteps)
        if scheduler == "dpmsolver++":  # refuses a step count whose timesteps repeat
            dpm_solver_timesteps(pipe.scheduler.config, num_inference_steps)
        return TorchImageSampler(pipe, num_inference_steps, seed, scheduler, eta, loaded, float32_below_t=below)
    from .onnx_pipeline import OnnxDDPMPipeline

    provider: Any = "auto" if device == "auto" else "cpu"
    if device.startswith("cuda"):
        device_id = int(device.partition(":")[2] or 0)
        provider = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
    if backend == "openvino":
        if device != "cpu":
            raise ValueError(f"the OpenVINO backend runs on the CPU; `device` {device!r} is onnxruntime's or PyTorch's.")
        pipe = OnnxDDPMPipeline.from_pretrained(model, engine="openvino", precision=precision,
                                                num_threads=num_threads)
    else:
        pipe = OnnxDDPMPipeline.from_pretrained(model, provider=provider, num_threads=num_threads,
                                                session_options=session_options)
    check_steps(num_inference_steps, pipe.diffusion.num_timesteps)
    if scheduler == "dpmsolver++":
        dpm_solver_timesteps(pipe.scheduler_config, num_inference_steps)
    return OnnxImageSampler(pipe, num_inference_steps, seed, scheduler, eta, loaded, progress_bar, backend)

