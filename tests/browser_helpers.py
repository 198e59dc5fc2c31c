"""Helpers shared by the browser sampler's tests and benchmark (test code, kept out of the package): headless
Debian Chromium, the page-level JS API (`window.ddpm.sample`) and the same noise handed to the Python sampler.

Chromium is Debian's package driven by Playwright (no `playwright install`, which downloads a browser).
"""

from __future__ import annotations

import base64
import shutil
from typing import Any

import numpy as np

CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]


def launch_chromium(playwright: Any) -> Any:
    """Headless Debian `chromium` (raises `FileNotFoundError` when the package is not installed)."""
    executable = shutil.which("chromium")
    if executable is None:
        raise FileNotFoundError("Debian's `chromium` is not installed (`apt-get install chromium`).")
    return playwright.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)


def to_base64(values: np.ndarray) -> str:
    """float32 values as base64 of their little-endian bytes, the page API's format."""
    return base64.b64encode(np.ascontiguousarray(values, dtype="<f4").tobytes()).decode("ascii")


def from_base64(text: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype="<f4").reshape(shape)


class ReplayedNoise:
    """A NumPy-generator stand-in for `OnnxDDPMPipeline`: hands out `values` in order, as the page's
    `replayedNormal` does, so both samplers get the same per-step noise."""

    def __init__(self, values: np.ndarray) -> None:
        self.values = np.asarray(values, dtype=np.float32).ravel()
        self.offset = 0

    def standard_normal(self, shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
        count = int(np.prod(shape))
        if self.offset + count > self.values.size:
            raise ValueError(f"the replayed noise ran out: {self.values.size - self.offset} left, {count} asked for.")
        self.offset += count
        return self.values[self.offset - count : self.offset].reshape(shape).astype(dtype)


def browser_sample(page: Any, latents: np.ndarray, noise: np.ndarray, **options: Any) -> dict[str, Any]:
    """Run `window.ddpm.sample` on x_T = `latents` (NCHW) and the flat per-step `noise`; `options` are the API's
    (`sampler`, `numInferenceSteps`, `eta`, `varianceType`). Returns its result with `sample` as a NumPy array."""
    result = page.evaluate(
        "(options) => window.ddpm.sample(options)",
        {"batchSize": int(latents.shape[0]), "latents": to_base64(latents), "noise": to_base64(noise), **options},
    )
    result["sample"] = from_base64(result["sample"], tuple(result["shape"]))
    return result


def browser_replay_eps(page: Any, latents: np.ndarray, noise: np.ndarray, eps: np.ndarray, **options: Any) -> np.ndarray:
    """Run the page's loop (`sample` of `sampler.js`) with a stand-in network that returns `eps[i]` at step i
    instead of running the WASM UNet: the loop's own arithmetic, on the given x_T (`latents`, NCHW), per-step
    `noise` and eps (`[steps, *latents.shape]`). `options` as for [`browser_sample`]. Returns the final x_0."""
    result = page.evaluate(
        """async ({latents, noise, eps, options}) => {
          const { sample, replayedNormal } = await import('./sampler.js');
          const fromBase64 = (text) => new Float32Array(Uint8Array.from(atob(text), (c) => c.charCodeAt(0)).buffer);
          const metadata = await (await fetch('model/ddpm_onnx.json')).json();
          const coefficients = await (await fetch('model/diffusion_coefficients.json')).json();
          const allEps = fromBase64(eps);
          const size = allEps.length / options.numInferenceSteps;
          let step = 0;
          const session = { run: async () => ({ [metadata.output_name]: { data: allEps.subarray(size * step, size * ++step) } }) };
          const ort = { Tensor: class {} };  // the stand-in network reads no tensors
          const result = await sample({ session, ort, metadata, coefficients }, {
            eta: 0.0, varianceType: coefficients.scheduler.variance_type, ...options,
            normal: replayedNormal(fromBase64(noise)), latents: fromBase64(latents),
          });
          const bytes = new Uint8Array(result.sample.buffer);
          let text = '';
          for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
          return { sample: btoa(text), shape: result.shape };
        }""",
        {"latents": to_base64(latents), "noise": to_base64(noise), "eps": to_base64(eps),
         "options": {"batchSize": int(latents.shape[0]), **options}},
    )
    return from_base64(result["sample"], tuple(result["shape"]))
