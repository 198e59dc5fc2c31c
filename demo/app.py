"""The DDPM demo page (Gradio Blocks): the layout, and callbacks that hand every request to `backends`.

Run it with `ddpm demo [--model DIR ...]`, or as a Hugging Face Space with `python app.py` (the same flags).
Requests are queued (`--concurrency` at a time, at most `--queue-size` waiting). Every value reaches the engine
unchecked by Gradio and is validated there, so a rejected request (a wrong type, NaN, a fraction of a step, an
unknown model, a file that is not a picture, too few values) shows a message in the page and the API, never a
traceback. Models are chosen by name among the configured folders; picture inputs read only this run's uploads,
whatever path a client names. Request bodies are bounded and uploads are pictures
within a pixel budget, kept only until the request that uses them ends (`uploads`); each run starts with an
empty file folder of its own, so the server serves the pictures it generated and, until their request, the
pictures visitors uploaded, and nothing else.

Named API endpoints (`gradio_client.Client(url).view_api()` lists them):
`/generate` (model, backend, sampler, variance_type, steps, num_images, seed, eta) -> (gallery, progression,
summary), `/interpolate` (model, image_a, image_b, timestep, num_lambdas, seed) -> (picture, summary),
`/bits_per_dim` (model, image, seed) -> (picture, summary) and `/models` () -> the models, backends and limits.
"""

from __future__ import annotations

import os
import argparse
import inspect
import random
import shutil
import signal
import sys
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import gradio as gr
from PIL import Image
from starlette.middleware import Middleware

from ddpm_plugin.demo.backends import (
    BACKEND_NAMES,
    CONCURRENCY_LIMIT,
    MAX_IMAGES,
    MAX_LAMBDAS,
    MAX_SEED,
    QUEUE_SIZE,
    DemoEngine,
    GenerationRequest,
    gallery_images,
    training_summary,
    interpolation_picture,
    progression_picture,
)
from ddpm_plugin.demo.options import MAX_PORT
from ddpm_plugin.demo.uploads import MAX_FILE_SIZE, UploadGuard, UploadStore, picture_path
from ddpm_plugin.demo.web.site import WEB_PATH, mount_page
from ddpm_plugin.vocabulary import PAPER_VARIANCE_TYPES, SAMPLERS

DDPM_STEPS = 1000  # the paper samples with all T steps
# Steps each sampler starts with (DDPM: all T). The demo opens on DPM-Solver++: the fastest sampler within 5% of
# DDIM-50's classifier Frechet distance on MNIST (docs/results/dpmsolver_mnist.md).
DEFAULT_SAMPLER = "dpmsolver++"
FEW_STEPS = {"ddim": 50, "dpmsolver++": 10}
DELETE_CACHE = (600, 3600)  # every 10 minutes, delete generated pictures older than an hour
# Generation, interpolation and bits/dim share one concurrency limit: together they never run more than
# `--concurrency` model requests at once (and generation never needs more ONNX sessions than the engine holds).
MODEL_QUEUE = "model"

BACKEND_LABELS = BACKEND_NAMES
SAMPLER_LABELS = {"ddpm": "DDPM (ancestral, paper)", "ddim": "DDIM", "dpmsolver++": "DPM-Solver++"}
VARIANCE_LABELS = {"fixed_large": "fixed_large (σ² = β_t)", "fixed_small": "fixed_small (σ² = β̃_t)"}

INTRO = """# Denoising Diffusion Probabilistic Models
This app turns random noise into pictures, step by step: a network trained on handwritten digits removes a
little noise at each step until a digit appears. **Generate** makes new pictures, **Interpolate** blends two
pictures into each other, and **Bits/dim** scores how likely the model finds a picture (lower is more likely).
The same seed gives the same pictures.

For readers of the paper (Ho, Jain, Abbeel 2020): the DDPM sampler is ancestral sampling over all T = 1000 steps
(Algorithm 2); DDIM reaches similar images with far fewer steps. The progression shows x_t (odd rows) and the
predicted x̂₀ (even rows) from t = T to 0, as in the paper's Fig. 6."""

INTERPOLATE_HELP = """Blends image A into image B: both are first blurred with the same noise, mixed in steps, and
cleaned up again, so the middle pictures share features of both. For the paper's terms: both images are noised
to x_t with the same noise, mixed as (1 − λ) x_t + λ x'_t and denoised with the same noise for every λ (paper
Fig. 8-9). Uploads are converted to the model's size and colours. Runs on PyTorch."""

BPD_HELP = """How surprising the model finds a picture, in bits per pixel value: lower means the picture looks more
like what the model learned. For the paper's terms: the negative log-likelihood bound of one 8-bit image in
bits/dim (paper Eq. 5), rate (the KL terms L_T ... L_1) plus distortion (the decoder L_0), over all T steps.
Uploads are converted to the model's size and colours. Runs on PyTorch."""

# What each control does, in plain words (Gradio shows it under the control's label).
HINTS = {
    "model": "Which trained network draws the pictures.",
    "backend": "The software that runs the network; all give the same kind of pictures. The first is the fastest here.",
    "sampler": "DDPM is the paper's slow, careful way (1000 steps); DDIM gets similar pictures in far fewer steps, "
               "DPM-Solver++ in fewer still.",
    "variance": "How much fresh noise DDPM adds back at each step (the paper tried both).",
    "eta": "0 gives the same picture for the same seed and noise; 1 adds fresh noise like DDPM.",
    "steps": "More steps take longer and usually look cleaner.",
    "num_images": "How many pictures to make at once.",
    "seed": "The starting noise: the same seed gives the same pictures.",
    "num_lambdas": "How many blended pictures to show between A and B.",
    "interpolation_seed": "The noise used for blurring and cleaning up: the same seed gives the same row.",
    "bpd_seed": "The noise used to measure: the score changes a little with it.",
}
def _choices(labels: dict[str, str], values: Sequence[str]) -> list[tuple[str, str]]:
    return [(labels[value], value) for value in values]


def checked_by_the_engine(component: gr.components.Component) -> gr.components.Component:
    """`component`, whose value reaches the callback as the client sent it.

    Gradio's own input checks answer a value outside the choices with an error that logs a traceback, crash on
    a wrong type (`round(nan)`, `"a" < 0`), round 2.5 steps silently and decode an upload before anything can
    look at its size; the engine checks every value instead, with a message. The instance's `preprocess` is
    replaced rather than the class subclassed: Gradio writes a `.pyi` file beside every module that subclasses
    a component."""
    component.preprocess = lambda payload: payload
    return component


def _unchecked(component_class: type) -> Any:
    return lambda *args, **kwargs: checked_by_the_engine(component_class(*args, **kwargs))


# The page's inputs, each made by Gradio's class and handed to the engine unchecked (see above).
Dropdown, Radio, Number, Slider, Picture = map(_unchecked, (gr.Dropdown, gr.Radio, gr.Number, gr.Slider, gr.Image))


@contextmanager
def shown_in_page() -> Iterator[None]:
    """A rejected control (`ValueError`) becomes a message in the page instead of a traceback."""
    try:
        yield
    except ValueError as error:
        raise gr.Error(str(error), print_exception=False) from None


def stamped(pictures: list[Image.Image], description: str) -> list[Image.Image]:
    """`pictures` with the request written into their PNG text chunks, with a fresh request id.

    Besides recording how a download was made, this keeps pictures of different requests distinct: Gradio
    stores outputs under the hash of their bytes and rewrites the file in place, so two requests with the same
    seed at the same moment would otherwise truncate a file that the other one's client is downloading."""
    request_id = uuid.uuid4().hex
    for picture in pictures:
        picture.info.update({"Software": "ddpm-plugin demo", "Description": description, "Request": request_id})
    return pictures


def _gallery_files(gallery: list | None, count: int) -> list[Any]:
    """The first `count` pictures of the gallery, as the client sent them."""
    if not isinstance(gallery, list) or len(gallery) < count:
        raise gr.Error(f"Generate at least {count} image(s) first.", print_exception=False)
    return [item[0] if isinstance(item, (list, tuple)) and item else item for item in gallery[:count]]


def checked_on_arrival(demo: gr.Blocks, pictures: Sequence[gr.components.Component]) -> None:
    """Replace Gradio's first look at a request's values (`validate_inputs`, before any value is processed):

    - a request with fewer values than its endpoint takes is answered with a message that names them, instead of
      Gradio's error (hidden from the client, and logged with a traceback);
    - a value of the `pictures` inputs is reduced to the path it names (a string, or none), without Gradio's file
      tag, so Gradio neither copies nor judges that path nor refuses a malformed value (each a logged traceback):
      `UploadStore.read` judges every path, with one message.
    """
    gradio_check = demo.validate_inputs
    picture_ids = {picture._id for picture in pictures}

    def validate_inputs(block_fn: Any, inputs: list[Any]) -> None:
        try:
            gradio_check(block_fn, inputs)
        except ValueError:
            names = [name for name in inspect.signature(block_fn.fn).parameters if name != "progress"]
            raise gr.Error(f"/{block_fn.api_name} takes {len(names)} values ({', '.join(names)}), got {len(inputs)}.",
                           print_exception=False) from None
        for k, block in enumerate(block_fn.inputs):
            if block._id in picture_ids and inputs[k] is not None:
                path = picture_path(inputs[k])
                inputs[k] = {"path": path if isinstance(path, str) else None}

    demo.validate_inputs = validate_inputs


def build_demo(engine: DemoEngine, uploads: UploadStore) -> gr.Blocks:
    """The page for `engine`'s models. Call `.queue(...)` and `.launch(...)` on it, as [`launch`] does.

    Picture inputs read only the uploads in `uploads`, each deleted when the request that reads it ends."""

    @contextmanager
    def reading(*pictures: Any) -> Iterator[None]:
        try:
            with shown_in_page():
                yield
        finally:
            for picture in pictures:
                uploads.discard(picture_path(picture))

    def use_samples(gallery: list | None) -> list[str]:
        with shown_in_page():
            return [uploads.adopt(picture_path(picture)) for picture in _gallery_files(gallery, 2)]

    def use_sample(gallery: list | None) -> str:
        with shown_in_page():
            return uploads.adopt(picture_path(_gallery_files(gallery, 1)[0]))

    def generate(
        model: str, backend: str, sampler: str, variance_type: str, steps: float, num_images: float, seed: float,
        eta: float, progress: gr.Progress = gr.Progress(),
    ) -> tuple[list, Any, str]:
        request = GenerationRequest(model, backend, sampler, variance_type, steps, num_images, seed, eta)
        with shown_in_page():
            request = engine.check(request)
        progress(0.0, desc="denoising")
        generation = engine.generate(request, on_step=lambda done, total: progress((done, total), desc="denoising"))
        captions = [f"seed {request.seed}, image {k + 1}" for k in range(request.num_images)]
        *samples, progression = stamped(
            [*gallery_images(generation.images), progression_picture(generation)], str(request)
        )
        timesteps = ", ".join(map(str, generation.timesteps))
        summary = (
            f"{request.num_images} image(s) of {request.model}, seed {request.seed}, "
            f"{request.num_inference_steps} {SAMPLER_LABELS[request.sampler]} steps "
            f"on {BACKEND_LABELS[request.backend]} in {generation.seconds:.2f} s. Progression columns: t = {timesteps}."
        )
        return list(zip(samples, captions)), progression, summary

    def interpolate(
        model: str, image_a: Any, image_b: Any, timestep: float, num_lambdas: float, seed: float,
        progress: gr.Progress = gr.Progress(track_tqdm=True),
    ) -> tuple[Any, str]:
        with reading(image_a, image_b):
            arrays = [uploads.read(name, image) for name, image in (("Image A", image_a), ("Image B", image_b))]
            images, output = engine.interpolate(model, *arrays, timestep, num_lambdas, seed)
        lambdas = ", ".join(f"{value:.2f}" for value in output.lambdas)
        summary = f"Image A, the interpolants decoded from t = {output.timestep} at λ = {lambdas}, image B."
        description = f"interpolation of two uploads with {model} at t = {output.timestep}, seed {seed}"
        return stamped([interpolation_picture(images, output.images)], description)[0], summary

    def bits_per_dim(
        model: str, image: Any, seed: float, progress: gr.Progress = gr.Progress(track_tqdm=True)
    ) -> tuple[Any, str]:
        with reading(image):
            fitted, output = engine.bits_per_dim(model, uploads.read("Image", image), seed)
        summary = (
            "| bound (bits/dim) | rate L_T + ... + L_1 | distortion L_0 | prior L_T |\n|---:|---:|---:|---:|\n"
            f"| {output.total_bpd[0]:.3f} | {output.rate_bpd[0]:.3f} | {output.decoder_bpd[0]:.3f} "
            f"| {output.prior_bpd[0]:.5f} |"
        )
        return stamped(gallery_images(fitted[None] / 255.0), f"bits/dim input of {model}")[0], summary

    def model_changed(name: str) -> tuple[str, Any, str]:
        with shown_in_page():
            chosen = engine.model(name)
        return training_summary(chosen.folder), gr.update(value=chosen.interpolation_t), chosen.interpolation_hint

    def sampler_controls(sampler: str) -> tuple[Any, Any, Any]:
        return (
            gr.update(value=FEW_STEPS.get(sampler, DDPM_STEPS)),
            gr.update(visible=sampler == "ddpm"),
            gr.update(visible=sampler == "ddim"),
        )

    models = engine.model_names
    backends = engine.backends
    first = engine.models[models[0]]
    default_variance = first.variance_type
    max_t = engine.max_steps - 1
    with gr.Blocks(title="DDPM demo", analytics_enabled=False, delete_cache=DELETE_CACHE) as demo:
        gr.Markdown(INTRO, elem_id="intro")
        gr.Markdown(f"Or [sample in your own browser]({WEB_PATH}/): onnxruntime-web runs the first model on your "
                    "device, with no server compute.", elem_id="browser-link")
        if "onnxruntime" not in backends:
            reasons = "; ".join(f"{m.name}: {m.onnx_problem}" for m in engine.models.values())
            gr.Markdown(f"ONNX Runtime is unavailable ({reasons}); sampling runs on PyTorch.")
        model = Dropdown(models, value=models[0], label="Model", info=HINTS["model"], elem_id="model")
        about = gr.Markdown(training_summary(first.folder), elem_id="model-about")
        with gr.Tab("Generate", elem_id="tab-generate"):
            with gr.Row():
                with gr.Column(scale=1, min_width=280):
                    backend = Radio(_choices(BACKEND_LABELS, backends), value=backends[0], label="Backend",
                                    info=HINTS["backend"], elem_id="backend")
                    sampler = Radio(_choices(SAMPLER_LABELS, SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler",
                                    info=HINTS["sampler"], elem_id="sampler")
                    variance_type = Radio(_choices(VARIANCE_LABELS, PAPER_VARIANCE_TYPES),
                                          value=default_variance, label="Variance σ²", info=HINTS["variance"],
                                          visible=DEFAULT_SAMPLER == "ddpm", elem_id="variance")
                    eta = Slider(0.0, 1.0, value=0.0, step=0.05, label="DDIM η (0 = deterministic)",
                                 info=HINTS["eta"], visible=DEFAULT_SAMPLER == "ddim", elem_id="eta")
                    steps = Number(FEW_STEPS.get(DEFAULT_SAMPLER, DDPM_STEPS), precision=0, label=f"Steps (1..{engine.max_steps})",
                                   info=HINTS["steps"], elem_id="steps")
                    num_images = Number(4, precision=0, label=f"Number of images (1..{engine.max_images})",
                                        info=HINTS["num_images"], elem_id="num-images")
                    seed = Number(0, precision=0, label=f"Seed (0..{MAX_SEED})", info=HINTS["seed"], elem_id="seed")
                    random_seed = gr.Button("Random seed", size="sm", elem_id="random-seed")
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column(scale=2):
                    gallery = gr.Gallery(label="Samples", columns=4, height="auto", format="png",
                                         object_fit="contain", buttons=["download", "download_all", "fullscreen"],
                                         interactive=False, elem_id="gallery")
                    progression = gr.Image(label="Denoising progression", format="png", type="pil",
                                           interactive=False, elem_id="progression", buttons=["download", "fullscreen"])
                    summary = gr.Markdown(label="Summary", elem_id="summary")
        with gr.Tab("Interpolate", elem_id="tab-interpolate"):
            gr.Markdown(INTERPOLATE_HELP)
            with gr.Row():
                image_a = Picture(label="Image A (λ = 0)",
                                  sources=["upload", "clipboard"], elem_id="image-a")
                image_b = Picture(label="Image B (λ = 1)",
                                  sources=["upload", "clipboard"], elem_id="image-b")
            with gr.Row():
                use_two = gr.Button("Use samples 1 and 2 from the gallery", size="sm")
                timestep = Number(first.interpolation_t, precision=0, label=f"Interpolation step t (0..{max_t})",
                                  info="How far both images are blurred before mixing: more mixes more.",
                                  elem_id="interpolation-t")
                num_lambdas = Number(9, precision=0, label=f"Interpolants (2..{MAX_LAMBDAS})",
                                     info=HINTS["num_lambdas"], elem_id="num-lambdas")
                interpolation_seed = Number(0, precision=0, label="Seed", info=HINTS["interpolation_seed"],
                                            elem_id="interpolation-seed")
            interpolation_hint = gr.Markdown(first.interpolation_hint, elem_id="interpolation-hint")
            run_interpolation = gr.Button("Interpolate", variant="primary", elem_id="interpolate")
            interpolation = gr.Image(label="Interpolation", format="png", type="pil", interactive=False,
                                     elem_id="interpolation", buttons=["download", "fullscreen"])
            interpolation_summary = gr.Markdown(label="Summary", elem_id="interpolation-summary")
        with gr.Tab("Bits/dim", elem_id="tab-bpd"):
            gr.Markdown(BPD_HELP)
            with gr.Row():
                bpd_image = Picture(label="Image", sources=["upload", "clipboard"],
                                    elem_id="bpd-image")
                bpd_fitted = gr.Image(label="As the model sees it", format="png", type="pil", interactive=False,
                                      elem_id="bpd-fitted")
            with gr.Row():
                use_one = gr.Button("Use sample 1 from the gallery", size="sm")
                bpd_seed = Number(0, precision=0, label="Seed", info=HINTS["bpd_seed"], elem_id="bpd-seed")
            run_bpd = gr.Button("Compute bits/dim", variant="primary", elem_id="bits-per-dim")
            bpd_summary = gr.Markdown(label="Bound", elem_id="bpd-summary")

        run.click(
            generate, [model, backend, sampler, variance_type, steps, num_images, seed, eta],
            [gallery, progression, summary], api_name="generate", concurrency_id=MODEL_QUEUE,
            api_description="Sample images; returns the gallery, the denoising progression and a summary.",
        )
        run_interpolation.click(
            interpolate, [model, image_a, image_b, timestep, num_lambdas, interpolation_seed],
            [interpolation, interpolation_summary], api_name="interpolate", concurrency_id=MODEL_QUEUE,
            api_description="Interpolate two images in x_t (paper Fig. 8); returns the row of images and a summary.",
        )
        run_bpd.click(
            bits_per_dim, [model, bpd_image, bpd_seed], [bpd_fitted, bpd_summary], api_name="bits_per_dim",
            concurrency_id=MODEL_QUEUE,
            api_description="The variational bound of an image in bits/dim with its rate and distortion.",
        )
        sampler.change(sampler_controls, sampler, [steps, variance_type, eta], api_visibility="private")
        model.change(model_changed, model, [about, timestep, interpolation_hint], api_visibility="private")
        random_seed.click(lambda: random.randint(0, MAX_SEED), None, seed, api_visibility="private", queue=False)
        use_two.click(use_samples, gallery, [image_a, image_b], api_visibility="private")
        use_one.click(use_sample, gallery, bpd_image, api_visibility="private")
        gr.api(engine.describe, api_name="models", api_description="The configured models, backends and limits.")
    checked_on_arrival(demo, [image_a, image_b, bpd_image])
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
    if port is not None and not 0 <= port <= MAX_PORT:
        raise ValueError(f"`port` must be in 0..{MAX_PORT}, got {port}.")
    if num_threads is None:
        num_threads = max(1, (os.cpu_count() or 1) // concurrency)
    engine = DemoEngine(models, max_images=max_images, num_threads=num_threads, onnx=onnx, concurrency=concurrency)
    with run_folder() as folder:
        uploads = UploadStore(folder)
        demo = build_demo(engine, uploads)
        demo.queue(max_size=queue_size, default_concurrency_limit=concurrency)
        # No allowed_paths: Gradio serves only its file folder, where this run's pictures are written.
        demo.launch(
            server_name=host, server_port=port, ssr_mode=False, show_error=False, footer_links=["api", "gradio"],
            max_file_size=MAX_FILE_SIZE, app_kwargs={"middleware": [Middleware(UploadGuard, store=uploads)]},
            prevent_thread_lock=True,  # Gradio makes its app in launch(): the browser page is mounted after
        )
        first = engine.models[engine.model_names[0]]
        mount_page(demo.app, first.onnx_folder or first.folder)
        demo.block_thread()


@contextmanager
def run_folder() -> Iterator[Path]:
    """A fresh folder for Gradio's files (uploads and generated pictures) under `GRADIO_TEMP_DIR` (else the
    system's temporary folder), deleted when the server stops, also on SIGTERM: nothing of an earlier run is
    ever served. Gradio reads the variable when components are made, so the block builds the page."""
    root = os.environ.get("GRADIO_TEMP_DIR")
    if root:
        Path(root).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="ddpm-demo-", dir=root))
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    previous_handler = signal.signal(signal.SIGTERM, _interrupt)  # Gradio closes the server on KeyboardInterrupt
    # Uploads are judged by `uploads.check_picture` against a far smaller budget; Pillow's warning is noise.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    try:
        yield folder
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if root:
            os.environ["GRADIO_TEMP_DIR"] = root
        else:
            os.environ.pop("GRADIO_TEMP_DIR")
        shutil.rmtree(folder, ignore_errors=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`python app.py [flags]`: the same flags as `ddpm demo`; a refused model or value prints one line."""
    from ddpm_plugin.bundled import BUNDLED_MODELS, DEFAULT_MODEL_NAME
    from ddpm_plugin.demo.options import add_arguments, run

    parser = argparse.ArgumentParser(prog="app.py", description="Serve the DDPM demo.")
    model_help = f"a pipeline folder or a bundled model ({', '.join(BUNDLED_MODELS)}) (default: {DEFAULT_MODEL_NAME})"
    args = add_arguments(parser, model_help).parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as error:
        parser.exit(2, f"app.py: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
