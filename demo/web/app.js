// The browser page: loads onnxruntime-web and the model's ONNX export from this host, checks the controls with
// the Gradio demo's limits, samples with sampler.js and draws the samples and the Fig. 6 progression.
//
// URL parameters: `model` (folder of the export, relative to the page; default "model/"), `backend` ("auto",
// "wasm" or "webgpu"), `threads` (WASM threads; default: up to 4 when the page is cross-origin isolated, else 1)
// and `autorun=0` (do not sample when the page opens).
//
// Page-level API for tests and benchmarks: `window.ddpm` (see the bottom of this file).

import { batchedNormal, dpmSolverTimesteps, inferenceTimesteps, replayedNormal, sample, seededNormal } from "./sampler.js";

// The Gradio demo's limits (demo/backends.py: MAX_IMAGES, MAX_SEED; eta in 0..1; steps 1..T).
// tests/test_web_sampler.py checks these against the Python constants.
export const LIMITS = { maxImages: 16, maxSeed: 2 ** 31 - 1, maxEta: 1.0 };
const NUM_SNAPSHOTS = 8;        // columns of the progression, as the Gradio demo
const PROGRESSION_IMAGES = 4;   // images whose progression is drawn (two rows each)
const GALLERY_PIXELS = 128;     // samples are upscaled by nearest neighbour to at least this size
const PROGRESSION_PIXELS = 64;  // the same for each tile of the progression
const PAINT_EVERY_MS = 50;      // yield to the browser this often so the progress bar moves
// Images after the first are sampled this many at a time: a batch of 4 took 8-9% less time per image than one
// at a time on WASM (1 and 2 threads, MNIST 28x28), and each batch goes on screen as soon as it is done.
const IMAGES_PER_BATCH = 4;
const SAMPLERS = ["ddpm", "ddim", "dpmsolver++"];
// Steps each sampler starts with (DDPM: all T). The page opens on DPM-Solver++: the fastest sampler within 5% of
// DDIM-50's classifier Frechet distance on MNIST (docs/results/dpmsolver_mnist.md).
const DEFAULT_STEPS = { ddim: 50, "dpmsolver++": 10 };

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
// ms since the page started loading (performance.now): onnxruntime-web loaded, the model downloaded, the session
// ready, the first image and all images of the first request on screen.
const timings = { runtime: null, modelFetched: null, ready: null, firstImage: null, allImages: null };

// --- Loading. ---

async function hasWebGPU() {
  try {
    return Boolean(navigator.gpu && (await navigator.gpu.requestAdapter()));
  } catch {
    return false;
  }
}

async function loadRuntime() {
  const requested = params.get("backend") || "auto";
  if (!["auto", "wasm", "webgpu"].includes(requested)) {
    throw new Error(`backend must be auto, wasm or webgpu, got '${requested}'.`);
  }
  const backend = requested !== "wasm" && (await hasWebGPU()) ? "webgpu" : "wasm";
  // Each bundle loads its own .wasm from beside it (ort/ on this host); the WebGPU one also runs WASM kernels.
  // It asks for it only when the first session is created, after the model has downloaded: a preload (in
  // fetch()'s mode, so that request reuses it) downloads it beside the model instead.
  const preload = Object.assign(document.createElement("link"), {
    rel: "preload", as: "fetch", crossOrigin: "anonymous",
    href: `ort/ort-wasm-simd-threaded${backend === "webgpu" ? ".asyncify" : ""}.wasm`,
  });
  document.head.append(preload);
  const ort = await import(backend === "webgpu" ? "./ort/ort.webgpu.min.mjs" : "./ort/ort.wasm.min.mjs");
  const maxThreads = self.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
  const threads = params.has("threads") ? Number(params.get("threads")) : maxThreads;
  if (!Number.isInteger(threads) || threads < 1 || threads > 64) {
    throw new Error(`threads must be a whole number in 1..64, got '${params.get("threads")}'.`);
  }
  if (threads > 1 && !self.crossOriginIsolated) {
    throw new Error("WASM threads need a cross-origin isolated page (COOP/COEP headers); use threads=1.");
  }
  ort.env.wasm.numThreads = threads;
  timings.runtime = performance.now();
  return { ort, backend, threads, fellBack: requested === "webgpu" && backend !== "webgpu" };
}

async function fetchBytes(url, onProgress) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  const total = Number(response.headers.get("Content-Length")) || 0;
  const reader = response.body.getReader();
  const chunks = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    received += value.length;
    if (total) onProgress(received / total);
  }
  const bytes = new Uint8Array(received);
  let offset = 0;
  for (const chunk of chunks) { bytes.set(chunk, offset); offset += chunk.length; }
  return bytes;
}

async function fetchJson(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response.json();
}

/** The export's metadata, coefficients and ONNX bytes, fetched while onnxruntime-web loads. */
async function fetchModelFiles(base) {
  const [metadata, coefficients] = await Promise.all([
    fetchJson(new URL("ddpm_onnx.json", base)), fetchJson(new URL("diffusion_coefficients.json", base)),
  ]);
  const bytes = await fetchBytes(new URL(metadata.model_file, base), (fraction) => showProgress(fraction, "downloading the model"));
  timings.modelFetched = performance.now();
  return { metadata, coefficients, bytes };
}

async function createSession(runtime, { metadata, coefficients, bytes }) {
  const executionProviders = runtime.backend === "webgpu" ? ["webgpu", "wasm"] : ["wasm"];
  const session = await runtime.ort.InferenceSession.create(bytes, { executionProviders, graphOptimizationLevel: "all" });
  return { session, ort: runtime.ort, metadata, coefficients, modelBytes: bytes.length };
}

// --- Controls: the Gradio demo's checks and messages. ---

function integerIn(name, value, low, high) {
  const number = Number(value);
  if (value === "" || !Number.isFinite(number) || !Number.isInteger(number)) {
    throw new Error(`${name} must be a whole number in ${low}..${high}, got '${value}'.`);
  }
  if (number < low || number > high) throw new Error(`${name} must be in ${low}..${high}, got ${number}.`);
  return number;
}

/** The request the controls describe, or an Error naming the rejected control; with the model's `scheduler`
 * configuration, a DPM-Solver++ step count whose timesteps would repeat is refused too. */
export function checkRequest(values, numTrainTimesteps, scheduler = null) {
  if (!SAMPLERS.includes(values.sampler)) throw new Error(`Sampler must be one of ${SAMPLERS.join(", ")}; got '${values.sampler}'.`);
  if (!["fixed_large", "fixed_small"].includes(values.varianceType)) {
    throw new Error(`Variance must be one of fixed_large, fixed_small; got '${values.varianceType}'.`);
  }
  const eta = Number(values.eta);
  if (values.eta === "" || !Number.isFinite(eta) || eta < 0 || eta > LIMITS.maxEta) {
    throw new Error(`Eta must be a number in 0..${LIMITS.maxEta}, got '${values.eta}'.`);
  }
  const request = {
    sampler: values.sampler,
    varianceType: values.varianceType,
    eta,
    numInferenceSteps: integerIn("Steps", values.steps, 1, numTrainTimesteps),
    numImages: integerIn("Number of images", values.numImages, 1, LIMITS.maxImages),
    seed: integerIn("Seed", values.seed, 0, LIMITS.maxSeed),
  };
  if (request.sampler === "dpmsolver++" && scheduler !== null) dpmSolverTimesteps(scheduler, request.numInferenceSteps);
  return request;
}

function controlValues() {
  return {
    sampler: $("sampler").value, varianceType: $("variance").value, eta: $("eta").value,
    steps: $("steps").value, numImages: $("num-images").value, seed: $("seed").value,
  };
}

// --- Drawing. ---

/** NCHW values in [-1, 1] of image b as RGBA bytes (gray images repeat their channel). */
function toRgba(x, shape, b) {
  const [, channels, height, width] = shape;
  const plane = height * width;
  const rgba = new Uint8ClampedArray(plane * 4);
  for (let p = 0; p < plane; p++) {
    for (let c = 0; c < 3; c++) {
      const value = x[(b * channels + Math.min(c, channels - 1)) * plane + p];
      rgba[p * 4 + c] = Math.round(Math.min(Math.max(value / 2 + 0.5, 0), 1) * 255);  // to_uint8
    }
    rgba[p * 4 + 3] = 255;
  }
  return new ImageData(rgba, width, height);
}

/** A canvas of `tiles` (ImageData, all the same size) in rows of `perRow`, 1-pixel white gaps, upscaled by
 * nearest neighbour `scale` times (as `make_grid`). */
function gridCanvas(tiles, perRow, padding, scale) {
  const { width, height } = tiles[0];
  const rows = Math.ceil(tiles.length / perRow);
  const small = document.createElement("canvas");
  small.width = perRow * (width + padding) + padding;
  small.height = rows * (height + padding) + padding;
  const context = small.getContext("2d");
  context.fillStyle = "#fff";
  context.fillRect(0, 0, small.width, small.height);
  tiles.forEach((tile, k) => {
    context.putImageData(tile, padding + (k % perRow) * (width + padding), padding + Math.floor(k / perRow) * (height + padding));
  });
  const big = document.createElement("canvas");
  big.width = small.width * scale;
  big.height = small.height * scale;
  const bigContext = big.getContext("2d");
  bigContext.imageSmoothingEnabled = false;
  bigContext.drawImage(small, 0, 0, big.width, big.height);
  return big;
}

/** Append the images of a batch (NCHW `x`) to the gallery; `images` are their numbers in the request. */
function showSamples(x, shape, request, images) {
  const scale = Math.max(1, Math.ceil(GALLERY_PIXELS / shape[2]));
  images.forEach((image, b) => {
    const canvas = gridCanvas([toRgba(x, shape, b)], 1, 0, scale);
    const link = document.createElement("a");
    link.href = canvas.toDataURL("image/png");
    link.download = `ddpm-seed${request.seed}-${request.sampler}${request.numInferenceSteps}-${image + 1}.png`;
    link.title = `seed ${request.seed}, image ${image + 1}: click to download`;
    link.className = "sample";
    link.append(canvas);
    $("gallery").append(link);
  });
}

/** Fig. 6: per image, a row of x_t tiles and a row of predicted x_0 tiles (ImageData) at the kept steps. */
function showProgression(rows) {
  const tiles = rows.flatMap(({ xT, x0 }) => [...xT, ...x0]);
  const { height } = tiles[0];
  const canvas = gridCanvas(tiles, rows[0].xT.length, 1, Math.max(1, Math.ceil(PROGRESSION_PIXELS / height)));
  const link = $("progression-link");
  link.replaceChildren(canvas);
  link.href = canvas.toDataURL("image/png");
}

function showProgress(fraction, what) {
  $("progress").value = fraction;
  $("progress-label").textContent = `${what} ${Math.round(fraction * 100)}%`;
}

function showStatus(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
  status.setAttribute("role", isError ? "alert" : "status");
}

// --- Sampling from the page. ---

/** The steps whose x_t and predicted x_0 the progression keeps: NUM_SNAPSHOTS evenly spaced, first and last
 * included (the Gradio demo's `ProgressionRecorder`). */
function snapshotSteps(numInferenceSteps) {
  const count = Math.min(NUM_SNAPSHOTS, numInferenceSteps);
  const steps = new Set();
  for (let k = 0; k < count; k++) {
    steps.add(count > 1 ? Math.round((k * (numInferenceSteps - 1)) / (count - 1)) : 0);
  }
  return steps;
}

/** The request's images in the batches they are sampled in: the first alone, so it is on screen after one
 * image's steps, then IMAGES_PER_BATCH at a time. */
function imageBatches(numImages) {
  const batches = [[0]];
  for (let first = 1; first < numImages; first += IMAGES_PER_BATCH) {
    batches.push(Array.from({ length: Math.min(IMAGES_PER_BATCH, numImages - first) }, (_, k) => first + k));
  }
  return batches;
}

async function generate(model, request) {
  const keep = snapshotSteps(request.numInferenceSteps);
  const snapshotTimesteps = [];
  const progression = [];  // per drawn image: its x_t and x_0 tiles at the kept steps
  const started = performance.now();
  let firstImageMs = null;
  let stepsDone = 0;
  let painted = started;
  $("gallery").replaceChildren();
  for (const images of imageBatches(request.numImages)) {
    const drawn = images.filter((image) => image < PROGRESSION_IMAGES);
    drawn.forEach(() => progression.push({ xT: [], x0: [] }));
    const rows = progression.slice(progression.length - drawn.length);
    const result = await sample(model, {
      batchSize: images.length, numInferenceSteps: request.numInferenceSteps, sampler: request.sampler,
      eta: request.eta, varianceType: request.varianceType,
      normal: batchedNormal(images.map((image) => seededNormal(request.seed, image))),  // image k: the seed's k-th stream
      onStep: async (i, t, x, x0) => {
        if (keep.has(i)) {
          if (images[0] === 0) snapshotTimesteps.push(t);
          const shape = [images.length, model.metadata.in_channels, model.metadata.sample_size, model.metadata.sample_size];
          rows.forEach((row, b) => { row.xT.push(toRgba(x, shape, b)); row.x0.push(toRgba(x0, shape, b)); });
        }
        if (performance.now() - painted > PAINT_EVERY_MS) {
          showProgress((stepsDone + (i + 1) * images.length) / (request.numImages * request.numInferenceSteps), "denoising");
          await new Promise((resolve) => setTimeout(resolve, 0));
          painted = performance.now();
        }
      },
    });
    stepsDone += images.length * request.numInferenceSteps;
    showSamples(result.sample, result.shape, request, images);
    if (rows.length) showProgression(progression);
    if (firstImageMs === null) firstImageMs = performance.now() - started;
    if (timings.firstImage === null) timings.firstImage = performance.now();
  }
  showProgress(1, "denoising");
  if (timings.allImages === null) timings.allImages = performance.now();
  const label = { ddpm: `DDPM (${request.varianceType})`, ddim: `DDIM (eta ${request.eta})`, "dpmsolver++": "DPM-Solver++" }[request.sampler];
  showStatus(`${request.numImages} image(s), seed ${request.seed}, ${request.numInferenceSteps} ${label} steps in ` +
    `${((performance.now() - started) / 1000).toFixed(2)} s, the first image after ${(firstImageMs / 1000).toFixed(2)} s. ` +
    `Progression columns: t = ${snapshotTimesteps.join(", ")}.`);
}

let busy = false;

async function onGenerate(model) {
  if (busy) return;
  let request;
  try {
    const { scheduler } = model.coefficients;
    request = checkRequest(controlValues(), scheduler.num_train_timesteps, scheduler);
  } catch (error) {
    showStatus(error.message, true);  // nothing is cleared: the previous samples stay
    return;
  }
  busy = true;
  $("generate").disabled = true;
  try {
    await generate(model, request);
  } catch (error) {
    showStatus(`Sampling failed: ${error.message}`, true);
  } finally {
    busy = false;
    $("generate").disabled = false;
  }
}

function setUpControls(model) {
  const T = model.coefficients.scheduler.num_train_timesteps;
  $("steps").max = T;
  $("steps-label").textContent = `Steps (1..${T})`;
  $("num-images").max = LIMITS.maxImages;
  $("num-images-label").textContent = `Number of images (1..${LIMITS.maxImages})`;
  $("seed").max = LIMITS.maxSeed;
  $("seed-label").textContent = `Seed (0..${LIMITS.maxSeed})`;
  $("variance").value = model.coefficients.scheduler.variance_type.startsWith("fixed_small") ? "fixed_small" : "fixed_large";
  const samplerChanged = () => {
    const sampler = $("sampler").value;
    $("steps").value = sampler === "ddpm" ? T : DEFAULT_STEPS[sampler];
    $("variance-row").hidden = sampler !== "ddpm";
    $("eta-row").hidden = sampler !== "ddim";
  };
  samplerChanged();
  $("sampler").addEventListener("change", samplerChanged);
  $("random-seed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * (LIMITS.maxSeed + 1)); });
  $("generate").addEventListener("click", () => onGenerate(model));
  $("generate").disabled = false;
}

function describe(runtime, model) {
  const { metadata } = model;
  const threads = runtime.backend === "wasm" ? `, ${runtime.threads} thread(s)` : "";
  const fallback = runtime.fellBack ? " (WebGPU is unavailable in this browser)" : "";
  return `${metadata.preset || "model"} ${metadata.sample_size}x${metadata.sample_size}x${metadata.in_channels}, ` +
    `${(model.modelBytes / 1e6).toFixed(1)} MB, on ${runtime.backend.toUpperCase()}${threads}${fallback}` +
    `${self.crossOriginIsolated ? "" : "; not cross-origin isolated, so one thread"}.`;
}

async function main() {
  // Started together: the model downloads while onnxruntime-web's module loads.
  const [runtime, files] = await Promise.all([
    loadRuntime(), fetchModelFiles(new URL(params.get("model") || "model/", location.href)),
  ]);
  const model = await createSession(runtime, files);
  setUpControls(model);
  $("model-info").textContent = describe(runtime, model);
  timings.ready = performance.now();
  showProgress(0, "ready");
  if (params.get("autorun") !== "0") await onGenerate(model);
  return { runtime, model };
}

function fromBase64(text) {
  const bytes = Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
  return new Float32Array(bytes.buffer);
}

function toBase64(values) {
  const bytes = new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

const loaded = main();
loaded.catch((error) => showStatus(`The page could not start: ${error.message}`, true));

// The page-level API. `sample` runs the loop on given float32 noise (base64 of little-endian bytes): `latents`
// is x_T (NCHW) and `noise` every later draw in order, consumed as the Python sampler draws it.
window.ddpm = {
  ready: loaded.then(({ runtime, model }) => ({
    backend: runtime.backend, threads: runtime.threads, crossOriginIsolated: self.crossOriginIsolated,
    metadata: model.metadata, modelBytes: model.modelBytes, limits: LIMITS,
  })),
  timings,
  checkRequest: async (values) => {
    const { scheduler } = (await loaded).model.coefficients;
    return checkRequest(values, scheduler.num_train_timesteps, scheduler);
  },
  timesteps: async (n) => inferenceTimesteps((await loaded).model.coefficients.scheduler, n),
  async sample({ sampler = "ddpm", numInferenceSteps = 1000, eta = 0.0, varianceType, batchSize = 1, latents, noise = "" }) {
    const { model } = await loaded;
    const normal = replayedNormal(fromBase64(noise));
    const result = await sample(model, {
      batchSize, numInferenceSteps, sampler, eta, normal,
      varianceType: varianceType || model.coefficients.scheduler.variance_type,
      latents: latents === undefined ? undefined : fromBase64(latents),
    });
    return {
      sample: toBase64(result.sample), shape: result.shape, stepMs: result.stepMs, unetMs: result.unetMs,
      unusedNoise: normal.remaining,
    };
  },
};
