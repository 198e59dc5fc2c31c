// The DDPM sampler (Ho et al. 2020, Algorithm 2), DDIM (Song et al. 2021) and DPM-Solver++ (Lu et al. 2022, second
// order multistep) around one onnxruntime-web session.
//
// This is `OnnxDDPMPipeline` (export/onnx_pipeline.py) in JavaScript, step for step: the same timesteps, the
// same float64 coefficients (read from the export's `diffusion_coefficients.json`, never re-typed here) and
// the same order of operations. x_t, eps and the noise are float32; every step is computed in float64 (JS
// numbers) and rounded to float32 when it is written back, exactly where NumPy rounds. Given the same x_T and
// per-step noise the two agree to the UNet's own WASM-vs-native rounding. No DOM here: `app.js` draws.

// --- Timesteps and the respaced schedule, as `inference_timesteps` and `respace` compute them. ---

/** The descending timesteps diffusers' `set_timesteps` chooses (`inference_timesteps` in Python). */
export function inferenceTimesteps(scheduler, numInferenceSteps) {
  const T = scheduler.num_train_timesteps;
  const n = numInferenceSteps;
  const spacing = scheduler.timestep_spacing;
  const timesteps = [];
  if (spacing === "linspace") {
    // np.linspace(0, T - 1, n).round()[::-1]: linspace's step is (T - 1) / (n - 1), its last value exact.
    const step = n > 1 ? (T - 1) / (n - 1) : 0;
    for (let i = 0; i < n; i++) timesteps.push(i === n - 1 && n > 1 ? T - 1 : roundHalfEven(i * step));
    return timesteps.reverse();
  }
  if (spacing === "leading") {
    const stepRatio = Math.floor(T / n);
    for (let i = n - 1; i >= 0; i--) timesteps.push(i * stepRatio + scheduler.steps_offset);
    return timesteps;
  }
  if (spacing === "trailing") {
    // np.round(np.arange(T, 0, -T / n)) - 1: arange's i-th value is T + i * (-T / n).
    const stepRatio = T / n;
    const count = Math.ceil(T / stepRatio);
    for (let i = 0; i < count; i++) timesteps.push(roundHalfEven(T + i * -stepRatio) - 1);
    return timesteps;
  }
  throw new Error(`timestep_spacing must be 'linspace', 'leading' or 'trailing', got '${spacing}'.`);
}

function roundHalfEven(x) {  // NumPy's round
  const floor = Math.floor(x);
  const diff = x - floor;
  if (diff !== 0.5) return Math.round(x);
  return floor % 2 === 0 ? floor : floor + 1;
}

/** The posterior coefficients of the ancestral step at step k = 0..n-1 of the (respaced) schedule, k = 0 being
 * the smallest kept timestep: the arrays of `GaussianDiffusion`, or those of `respace(diffusion, timesteps)`
 * (Nichol & Dhariwal 2021, App. B) computed as `GaussianDiffusion.from_betas` does. */
export function respacedSchedule(coefficients, timesteps) {
  const T = coefficients.scheduler.num_train_timesteps;
  const ascending = [...timesteps].reverse();
  if (ascending.length === T && ascending.every((t, k) => t === k)) return coefficients;
  const keptAlphasCumprod = ascending.map((t) => coefficients.alphas_cumprod[t]);
  const betas = keptAlphasCumprod.map((a, k) => 1.0 - a / (k === 0 ? 1.0 : keptAlphasCumprod[k - 1]));
  const alphas = betas.map((beta) => 1.0 - beta);
  const alphasCumprod = [];
  alphas.reduce((product, alpha) => { const next = product * alpha; alphasCumprod.push(next); return next; }, 1.0);
  const alphasCumprodPrev = [1.0, ...alphasCumprod.slice(0, -1)];
  const schedule = { scheduler: coefficients.scheduler, betas, alphas_cumprod: alphasCumprod };
  schedule.sqrt_recip_alphas_cumprod = alphasCumprod.map((a) => Math.sqrt(1.0 / a));
  schedule.sqrt_recipm1_alphas_cumprod = alphasCumprod.map((a) => Math.sqrt(1.0 / a - 1.0));
  schedule.posterior_variance = betas.map((beta, k) => beta * (1.0 - alphasCumprodPrev[k]) / (1.0 - alphasCumprod[k]));
  schedule.posterior_mean_coef1 = betas.map((beta, k) => beta * Math.sqrt(alphasCumprodPrev[k]) / (1.0 - alphasCumprod[k]));
  schedule.posterior_mean_coef2 = alphas.map(
    (alpha, k) => (1.0 - alphasCumprodPrev[k]) * Math.sqrt(alpha) / (1.0 - alphasCumprod[k]));
  return schedule;
}

/** The descending timesteps of diffusers' `DPMSolverMultistepScheduler` (`dpm_solver_timesteps` in Python): for
 * "linspace" and "leading" those of n + 1 steps without the last (the final step goes to sigma = 0), for
 * "trailing" those of n steps. A step count whose timesteps would repeat or pass T - 1 is refused. */
export function dpmSolverTimesteps(scheduler, numInferenceSteps) {
  const T = scheduler.num_train_timesteps;
  const timesteps = scheduler.timestep_spacing === "trailing"
    ? inferenceTimesteps(scheduler, numInferenceSteps)
    : inferenceTimesteps(scheduler, numInferenceSteps + 1).slice(0, -1);
  if (new Set(timesteps).size !== timesteps.length || Math.max(...timesteps) >= T) {
    throw new Error(`Steps ${numInferenceSteps} is too many for DPM-Solver++ with timestep_spacing ` +
      `'${scheduler.timestep_spacing}' over ${T} training steps; use fewer steps.`);
  }
  return timesteps;
}

/** sigma_t(eta) of Song et al. (2021), Eq. 16 (`ddim_sigma` in Python). */
export function ddimSigma(alphaBarT, alphaBarPrev, eta) {
  return eta * Math.sqrt((1.0 - alphaBarPrev) / (1.0 - alphaBarT) * (1.0 - alphaBarT / alphaBarPrev));
}

// --- One step of each sampler: (x_t, eps) -> (x_{t-1} as float32, predicted x_0 as float64). ---

function predictStartFromNoise(schedule, k, xT, eps, clipRange) {
  // Eq. 15: x_0 = sqrt(1/alpha_bar) x_t - sqrt(1/alpha_bar - 1) eps, clipped to [-r, r].
  const a = schedule.sqrt_recip_alphas_cumprod[k];
  const b = schedule.sqrt_recipm1_alphas_cumprod[k];
  const x0 = new Float64Array(xT.length);
  for (let j = 0; j < xT.length; j++) {
    const value = a * xT[j] - b * eps[j];
    x0[j] = clipRange === null ? value : Math.min(Math.max(value, -clipRange), clipRange);
  }
  return x0;
}

function ddpmStepFunction(coefficients, timesteps, varianceType, clipRange) {
  const schedule = respacedSchedule(coefficients, timesteps);
  const n = timesteps.length;
  // sigma_t^2 as diffusers applies it: beta_t (fixed_large) or beta_tilde_t floored at 1e-20 (fixed_small).
  const sigmas = varianceType.startsWith("fixed_large")
    ? schedule.betas.map(Math.sqrt)
    : schedule.posterior_variance.map((v) => Math.sqrt(Math.max(v, 1e-20)));
  return (i, xT, eps, normal) => {
    const k = n - 1 - i;
    const x0 = predictStartFromNoise(schedule, k, xT, eps, clipRange);
    // Eq. 7: mu_tilde(x_t, x_0), then + sigma_t z for t > 0.
    const c1 = schedule.posterior_mean_coef1[k];
    const c2 = schedule.posterior_mean_coef2[k];
    const z = timesteps[i] > 0 ? normal.standardNormal(xT.length) : null;
    const xPrev = new Float32Array(xT.length);
    for (let j = 0; j < xT.length; j++) {
      const mean = c1 * x0[j] + c2 * xT[j];
      xPrev[j] = z === null ? mean : mean + sigmas[k] * z[j];
    }
    return [xPrev, x0];
  };
}

function ddimStepFunction(coefficients, timesteps, eta, clipRange) {
  const scheduler = coefficients.scheduler;
  const stepRatio = Math.floor(scheduler.num_train_timesteps / timesteps.length);
  const finalAlphaCumprod = scheduler.set_alpha_to_one ? 1.0 : coefficients.alphas_cumprod[0];
  return (i, xT, eps, normal) => {
    const t = timesteps[i];
    const prevT = t - stepRatio;
    const alphaBarT = coefficients.alphas_cumprod[t];
    const alphaBarPrev = prevT >= 0 ? coefficients.alphas_cumprod[prevT] : finalAlphaCumprod;
    const x0 = predictStartFromNoise(coefficients, t, xT, eps, clipRange);
    const sigma = ddimSigma(alphaBarT, alphaBarPrev, eta);
    const sigma32 = Math.fround(sigma);  // NumPy multiplies the float32 noise by a Python float in float32
    const a = Math.sqrt(alphaBarPrev);
    const b = Math.sqrt(1.0 - alphaBarPrev - sigma ** 2);
    const z = eta > 0 ? normal.standardNormal(xT.length) : null;
    const xPrev = new Float32Array(xT.length);
    for (let j = 0; j < xT.length; j++) {
      // x_{t-1} = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps + sigma z (Song et al. 2021, Eq. 12).
      const value = a * x0[j] + b * eps[j];
      xPrev[j] = z === null ? value : value + Math.fround(sigma32 * z[j]);
    }
    return [xPrev, x0];
  };
}

/** DPM-Solver++(2M) (Lu et al. 2022; `dpm_solver_step_function` in Python): with alpha = sqrt(alpha_bar),
 * sigma = sqrt(1 - alpha_bar) and lambda = log(alpha / sigma), a step from s to t (h = lambda_t - lambda_s) is
 * x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D, with D the predicted x_0 (first order: the first step)
 * or (1 + 1/(2r)) x_0(s) - 1/(2r) x_0(s') (second order, r = (lambda_s - lambda_s') / h); the last step goes to
 * sigma = 0 and returns x_0. x_0 is not clipped (diffusers' solver ignores clip_sample); no noise is drawn. */
function dpmSolverStepFunction(coefficients, timesteps) {
  const n = timesteps.length;
  const alphas = [...timesteps.map((t) => Math.sqrt(coefficients.alphas_cumprod[t])), 1.0];
  const sigmas = [...timesteps.map((t) => Math.sqrt(1.0 - coefficients.alphas_cumprod[t])), 0.0];
  const lambdas = alphas.map((alpha, k) => Math.log(alpha) - Math.log(sigmas[k]));  // +Infinity at the clean end
  let previous = null;  // x_0 predicted at the step before
  return (i, xT, eps) => {
    if (i === 0) previous = null;
    const x0 = new Float64Array(xT.length);
    for (let j = 0; j < xT.length; j++) x0[j] = (xT[j] - sigmas[i] * eps[j]) / alphas[i];
    const xPrev = new Float32Array(xT.length);
    if (i === n - 1) {
      xPrev.set(x0);
    } else {
      const h = lambdas[i + 1] - lambdas[i];
      const ratio = sigmas[i + 1] / sigmas[i];
      const coefficient = alphas[i + 1] * Math.expm1(-h);
      const r = previous === null ? null : (lambdas[i] - lambdas[i - 1]) / h;
      for (let j = 0; j < xT.length; j++) {
        const data = r === null ? x0[j] : (1.0 + 0.5 / r) * x0[j] - (0.5 / r) * previous[j];
        xPrev[j] = ratio * xT[j] - coefficient * data;
      }
    }
    previous = x0;
    return [xPrev, x0];
  };
}

// --- Noise sources: seeded for the page, replayed for the parity test. ---

/** N(0, I) float32 draws from a seeded xoshiro128** stream (Box-Muller). The same seed gives the same images
 * in every browser; it is not NumPy's stream, so the server's images for a seed differ. `image` picks one of
 * the seed's independent streams: image 0 is the seed's stream as a single image draws it. */
export function seededNormal(seed, image = 0) {
  let s = [0x9e3779b9, 0x243f6a88, (0xb7e15162 ^ image) >>> 0, seed >>> 0];
  for (let i = 0; i < 16; i++) nextUint32();  // mix the seed through the state
  function nextUint32() {
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]; s[2] ^= t; s[3] = rotl(s[3], 11);
    return result;
  }
  function rotl(x, k) { return (x << k) | (x >>> (32 - k)); }
  const uniform = () => (nextUint32() + 1) / 4294967297;  // in (0, 1)
  return {
    standardNormal(length) {
      const out = new Float32Array(length);
      for (let j = 0; j < length; j += 2) {
        const r = Math.sqrt(-2.0 * Math.log(uniform()));
        const theta = 2.0 * Math.PI * uniform();
        out[j] = r * Math.cos(theta);
        if (j + 1 < length) out[j + 1] = r * Math.sin(theta);
      }
      return out;
    },
  };
}

/** The noise of a batch whose image b draws from `streams[b]` (NCHW: each draw splits evenly over the images),
 * so an image is the same whichever batch it is sampled in. */
export function batchedNormal(streams) {
  return {
    standardNormal(length) {
      const perImage = length / streams.length;
      const out = new Float32Array(length);
      streams.forEach((stream, b) => out.set(stream.standardNormal(perImage), b * perImage));
      return out;
    },
  };
}

/** The draws of `values` (one flat Float32Array) handed out in order, as the Python test's generator does. */
export function replayedNormal(values) {
  let offset = 0;
  return {
    standardNormal(length) {
      if (offset + length > values.length) {
        throw new Error(`the replayed noise ran out: ${values.length - offset} values left, ${length} asked for.`);
      }
      offset += length;
      return values.subarray(offset - length, offset);
    },
    get remaining() { return values.length - offset; },
  };
}

// --- The loop. ---

/**
 * Generate images from x_T down to x_0 with `session`, the export's UNet.
 *
 * @param {object} model - `{session, ort, metadata, coefficients}` as `loadModel` in app.js returns it.
 * @param {object} options
 * @param {number} options.batchSize - the number of images.
 * @param {number} options.numInferenceSteps - denoising steps, 1..T.
 * @param {string} options.sampler - "ddpm" (ancestral, Algorithm 2), "ddim" or "dpmsolver++".
 * @param {number} options.eta - DDIM's stochasticity; ignored by "ddpm" and "dpmsolver++".
 * @param {string} options.varianceType - "fixed_large" or "fixed_small" ("ddpm" only).
 * @param {object} options.normal - the noise source (`batchedNormal` of `seededNormal`s, or `replayedNormal`).
 * @param {Float32Array} [options.latents] - x_T (NCHW); drawn from `normal` when not given.
 * @param {function} [options.onStep] - awaited after every step as onStep(i, t, xPrev, predictedX0).
 * @returns {Promise<{sample: Float32Array, shape: number[], stepMs: number[], unetMs: number[]}>} the final x_0
 *   (NCHW, model space) and the wall time of each step and of its UNet call.
 */
export async function sample(model, options) {
  const { session, ort, metadata, coefficients } = model;
  const { batchSize, numInferenceSteps, sampler, eta, varianceType, normal, onStep } = options;
  const scheduler = coefficients.scheduler;
  if (scheduler.prediction_type !== "epsilon") {
    throw new Error(`only eps-prediction models are supported, the scheduler says '${scheduler.prediction_type}'.`);
  }
  const shape = [batchSize, metadata.in_channels, metadata.sample_size, metadata.sample_size];
  const size = shape.reduce((a, b) => a * b, 1);
  const timesteps = sampler === "dpmsolver++"
    ? dpmSolverTimesteps(scheduler, numInferenceSteps)
    : inferenceTimesteps(scheduler, numInferenceSteps);
  const clipRange = scheduler.clip_sample ? scheduler.clip_sample_range : null;
  const step = {
    ddpm: () => ddpmStepFunction(coefficients, timesteps, varianceType, clipRange),
    ddim: () => ddimStepFunction(coefficients, timesteps, eta, clipRange),
    "dpmsolver++": () => dpmSolverStepFunction(coefficients, timesteps),
  }[sampler]();
  const [inputName, timestepName] = metadata.input_names;

  // 1. x_T ~ N(0, I).
  let x = options.latents ? Float32Array.from(options.latents) : normal.standardNormal(size);
  if (x.length !== size) throw new Error(`latents must hold ${size} values (${shape.join("x")}), got ${x.length}.`);
  const stepMs = [];
  const unetMs = [];
  for (let i = 0; i < timesteps.length; i++) {
    const t = timesteps[i];
    // 2. eps_theta(x_t, t).
    const feeds = {
      [inputName]: new ort.Tensor("float32", x, shape),
      [timestepName]: new ort.Tensor("int64", new BigInt64Array(batchSize).fill(BigInt(t)), [batchSize]),
    };
    const started = performance.now();
    const outputs = await session.run(feeds);
    unetMs.push(performance.now() - started);
    const eps = outputs[metadata.output_name].data;
    // 3. x_{t-1} from x_t and eps.
    const [xPrev, x0] = step(i, x, eps, normal);
    x = xPrev;
    stepMs.push(performance.now() - started);
    if (onStep) await onStep(i, t, x, x0);
  }
  return { sample: x, shape, stepMs, unetMs };
}
