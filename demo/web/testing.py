"""Helpers shared by the browser sampler's tests and benchmark: headless Debian Chromium, the page-level JS API
(`window.ddpm.sample`) and the same noise handed to the Python sampler.

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
