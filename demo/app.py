"""The DDPM demo page (Gradio Blocks): the layout, and callbacks that hand every request to `backends`.

Run it with `ddpm demo [--model DIR ...]`, or as a Hugging Face Space with `python app.py` (the same flags).
Requests are queued (`--concurrency` at a time, at most `--queue-size` waiting); each control is validated
and a rejected request shows a message in the page, never a traceback. Models are chosen by name among the
configured folders, and the server serves no file but the pictures it generates.

Named API endpoints (`gradio_client.Client(url).view_api()` lists them):
`/generate` (model, backend, sampler, variance_type, steps, num_images, seed, eta) -> (gallery, progression,
summary) and `/models` () -> the configured models, backends and limits.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any, Sequence

import gradio as gr

from ddpm_plugin.demo.backends import (
    MAX_IMAGES,
    MAX_SEED,
    DemoEngine,
    GenerationRequest,
    gallery_images,
    progression_picture,
)

CONCURRENCY_LIMIT = 2  # requests sampled at once; the rest wait in the queue
QUEUE_SIZE = 64  # requests that may wait; beyond that new ones are turned away with a message
DDPM_STEPS = 1000  # the paper samples with all T steps
DDIM_STEPS = 50
DELETE_CACHE = (600, 3600)  # every 10 minutes, delete generated pictures older than an hour

BACKEND_LABELS = {"onnxruntime": "ONNX Runtime", "pytorch": "PyTorch"}
SAMPLER_LABELS = {"ddpm": "DDPM (ancestral, paper)", "ddim": "DDIM"}
VARIANCE_LABELS = {"fixed_large": "fixed_large (σ² = β_t)", "fixed_small": "fixed_small (σ² = β̃_t)"}

INTRO = """# Denoising Diffusion Probabilistic Models
Samples from a DDPM (Ho, Jain, Abbeel 2020). The paper's sampler is ancestral sampling over all T = 1000 steps
(Algorithm 2); DDIM reaches similar images with far fewer steps. The same seed gives the same images on the
same backend. The progression shows x_t (odd rows) and the predicted x̂₀ (even rows) from t = T to 0, as in the
paper's Fig. 6."""


def _choices(labels: dict[str, str], values: Sequence[str]) -> list[tuple[str, str]]:
    return [(labels[value], value) for value in values]


def build_demo(engine: DemoEngine) -> gr.Blocks:
    """The page for `engine`'s models. Call `.queue(...)` and `.launch(...)` on it, as [`launch`] does."""

    def generate(
        model: str, backend: str, sampler: str, variance_type: str, steps: float, num_images: float, seed: float,
        eta: float, progress: gr.Progress = gr.Progress(),
    ) -> tuple[list, Any, str]:
        request = GenerationRequest(model, backend, sampler, variance_type, steps, num_images, seed, eta)
        try:
            request = engine.check(request)
        except ValueError as error:
            raise gr.Error(str(error), print_exception=False) from None
        progress(0.0, desc="denoising")
        generation = engine.generate(request, on_step=lambda done, total: progress((done, total), desc="denoising"))
        captions = [f"seed {request.seed}, image {k + 1}" for k in range(request.num_images)]
        timesteps = ", ".join(map(str, generation.timesteps))
        summary = (
            f"{request.num_images} image(s), {request.num_inference_steps} {SAMPLER_LABELS[request.sampler]} steps "
            f"on {BACKEND_LABELS[request.backend]} in {generation.seconds:.2f} s. Progression columns: t = {timesteps}."
        )
        return list(zip(gallery_images(generation.images), captions)), progression_picture(generation), summary

    def sampler_controls(sampler: str) -> tuple[Any, Any, Any]:
        ddpm = sampler == "ddpm"
        return (
            gr.update(value=DDPM_STEPS if ddpm else DDIM_STEPS),
            gr.update(visible=ddpm),
            gr.update(visible=not ddpm),
        )

    models = engine.model_names
    backends = engine.backends
    default_variance = engine.models[models[0]].variance_type
    with gr.Blocks(title="DDPM demo", analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(INTRO)
        if "onnxruntime" not in backends:
            reasons = "; ".join(f"{m.name}: {m.onnx_problem}" for m in engine.models.values())
            gr.Markdown(f"ONNX Runtime is unavailable ({reasons}); sampling runs on PyTorch.")
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                model = gr.Dropdown(models, value=models[0], label="Model", elem_id="model")
                backend = gr.Radio(_choices(BACKEND_LABELS, backends), value=backends[0], label="Backend",
                                   elem_id="backend")
                sampler = gr.Radio(_choices(SAMPLER_LABELS, ("ddpm", "ddim")), value="ddpm", label="Sampler",
                                   elem_id="sampler")
                variance_type = gr.Radio(_choices(VARIANCE_LABELS, ("fixed_large", "fixed_small")),
                                         value=default_variance, label="Variance σ²", elem_id="variance")
                eta = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="DDIM η (0 = deterministic)",
                                visible=False, elem_id="eta")
                steps = gr.Number(DDPM_STEPS, precision=0, label=f"Steps (1..{engine.max_steps})", elem_id="steps")
                num_images = gr.Number(4, precision=0, label=f"Number of images (1..{engine.max_images})",
                                       elem_id="num-images")
                with gr.Row():
                    seed = gr.Number(0, precision=0, label=f"Seed (0..{MAX_SEED})", elem_id="seed", scale=3)
                    random_seed = gr.Button("Random seed", elem_id="random-seed", scale=1)
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Samples", columns=4, format="png", object_fit="contain",
                                     buttons=["download", "download_all", "fullscreen"], interactive=False,
                                     elem_id="gallery")
                progression = gr.Image(label="Denoising progression",
                                       format="png", type="pil", interactive=False, elem_id="progression",
                                       buttons=["download", "fullscreen"])
                summary = gr.Markdown(label="Summary", elem_id="summary")

        run.click(
            generate, [model, backend, sampler, variance_type, steps, num_images, seed, eta],
            [gallery, progression, summary], api_name="generate",
            api_description="Sample images; returns the gallery, the denoising progression and a summary.",
        )
        sampler.change(sampler_controls, sampler, [steps, variance_type, eta], api_visibility="private")
        random_seed.click(lambda: random.randint(0, MAX_SEED), None, seed, api_visibility="private", queue=False)
        gr.api(engine.describe, api_name="models", api_description="The configured models, backends and limits.")
    return demo


def launch(
    models: Sequence[str | os.PathLike],
    host: str | None = None,
    port: int | None = None,
    max_images: int = MAX_IMAGES,
    concurrency: int = CONCURRENCY_LIMIT,
    queue_size: int = QUEUE_SIZE,
    num_threads: int | None = None,
    onnx: bool = True,
) -> None:
    """Load `models`, build the page and serve it until interrupted.

    `host`/`port` default to Gradio's (`GRADIO_SERVER_NAME`/`GRADIO_SERVER_PORT`, else 127.0.0.1:7860), which
    is how a Hugging Face Space sets them. `num_threads` defaults to the cores divided among concurrent requests.
    """
    if concurrency < 1 or queue_size < 1:
        raise ValueError(f"`concurrency` and `queue_size` must be at least 1, got {concurrency} and {queue_size}.")
    if num_threads is None:
        num_threads = max(1, (os.cpu_count() or 1) // concurrency)
    engine = DemoEngine(models, max_images=max_images, num_threads=num_threads, onnx=onnx)
    demo = build_demo(engine)
    demo.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    # No allowed_paths: Gradio serves only its own cache, where the generated pictures are written.
    demo.launch(server_name=host, server_port=port, ssr_mode=False, show_error=False, footer_links=["api", "gradio"])


def main(argv: list[str] | None = None) -> int:
    """`python app.py [flags]`: the same flags as `ddpm demo`."""
    from ddpm_plugin.cli import main as ddpm_main

    return ddpm_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
