//! The search for a clip's codes: continuous parameters per frame (a semantic vector and 36
//! acoustic values through `tanh`) that the decoder hears as they are at first and that are
//! then pulled onto their codes (the nearest codebook entry, the nearest of the 21 levels;
//! straight-through), Adam with global-norm clipping and a cosine learning rate, random crops
//! with their left context, the best codes by a full-clip decode kept throughout, and the
//! discrete refinement of [`super::refine`] at the end.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Result, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

use super::decoder::TrainDecoder;
use super::loss::{LossWeights, Spectral};
use super::refine::{model_side, RefineOptions, Refiner};
use crate::model::codec::CodecDecoder;
use crate::model::config::SPECIAL_CODES;

/// How the search runs; the defaults are the ones `voxtrald voice create` uses.
#[derive(Debug, Clone)]
pub struct SearchOptions {
    pub steps: usize,
    pub seed: u64,
    /// Learning rate at the start and the end of the cosine schedule.
    pub lr: f64,
    pub lr_end: f64,
    /// Frames optimised per step (their left context is decoded too); `None`: the whole clip.
    pub crop_frames: Option<usize>,
    /// Global gradient norm limit.
    pub clip_grad: f64,
    /// When quantisation starts to harden, as a fraction of the steps: before it the decoder
    /// hears the continuous parameters themselves; from it the latent moves linearly towards
    /// the snapped and rounded values (straight-through) and is exactly the codes at the last
    /// step. 1.0: continuous throughout (codes are read by snapping); 0.0: hard from the start.
    pub harden_from: f64,
    /// Steps between full-clip decodes that pick the best codes so far (and at the end).
    pub eval_every: usize,
    pub weights: LossWeights,
    /// The discrete pass over the frames after the gradient steps.
    pub refine: RefineOptions,
}

impl Default for SearchOptions {
    fn default() -> Self {
        Self {
            steps: 600,
            seed: 0,
            lr: 0.1,
            lr_end: 0.01,
            crop_frames: Some(32),
            clip_grad: 1.0,
            harden_from: 0.5,
            eval_every: 50,
            weights: LossWeights::default(),
            refine: RefineOptions::default(),
        }
    }
}

/// Reported after each step.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Gradient steps, then frames visited by the refinement, counted on from them.
    pub step: usize,
    pub steps: usize,
    /// This step's crop loss.
    pub loss: f32,
    /// The best full-clip loss so far.
    pub best_loss: f32,
    pub elapsed: Duration,
}

/// What the search found.
#[derive(Debug, Clone)]
pub struct Found {
    /// Model-side codes (with the +2 offset), `[T][37]`.
    pub codes: Vec<Vec<u32>>,
    /// Full-clip loss of these codes.
    pub loss: f32,
    /// Their decoding's STFT distance to the clip.
    pub stft_distance: f32,
    /// The same for random codes of the same length: the scale `stft_distance` is read on.
    pub random_stft_distance: f32,
    /// Gradient steps taken.
    pub steps_done: usize,
    /// Whole refinement passes over the frames.
    pub sweeps_done: usize,
    /// Stopped by the caller before the end.
    pub interrupted: bool,
}

/// Per-frame parameters and how they become a latent and codes.
pub struct FrameParams {
    pub semantic: Var,
    pub acoustic: Var,
}

impl FrameParams {
    /// Semantic vectors start at random codebook entries, acoustic values near the middle
    /// level (`0.1 * N(0, 1)` before `tanh`).
    pub fn random(dec: &TrainDecoder, frames: usize, rng: &mut impl Rng) -> Result<Self> {
        let k = dec.codebook().dim(0)?;
        let idx: Vec<u32> = (0..frames).map(|_| rng.random_range(0..k as u32)).collect();
        let idx = Tensor::new(idx.as_slice(), dec.device())?;
        let semantic = Var::from_tensor(&dec.codebook().index_select(&idx, 0)?)?;
        let ac: Vec<f32> = (0..frames * dec.n_acoustic())
            .map(|_| 0.1 * Distribution::<f32>::sample(&StandardNormal, rng))
            .collect();
        let ac = Tensor::from_vec(ac, (frames, dec.n_acoustic()), dec.device())?;
        let acoustic = Var::from_tensor(&ac.to_dtype(dec.dtype())?)?;
        Ok(Self { semantic, acoustic })
    }

    /// Nearest codebook rows of `s` `[T, sd]`.
    fn nearest(dec: &TrainDecoder, s: &Tensor) -> Result<Tensor> {
        let c = dec.codebook();
        let d = c
            .sqr()?
            .sum(1)?
            .unsqueeze(0)?
            .broadcast_sub(&(s.matmul(&c.t()?)? * 2.0)?)?; // |c|² - 2 s·c per row
        d.argmin(D::Minus1)
    }

    /// Acoustic values rounded to the levels, in `-1..=1`, and their level indices.
    fn levels(dec: &TrainDecoder, y: &Tensor) -> Result<(Tensor, Tensor)> {
        let top = (dec.levels() - 1) as f64;
        let k = ((y + 1.0)? * (top / 2.0))?.round()?.clamp(0.0, top)?;
        let v = ((&k * (2.0 / top))? - 1.0)?;
        Ok((v, k))
    }

    /// The latent `[len, sd + 36]` of frames `start..start + len`: forward, the raw values
    /// moved `hardness` of the way to the snapped and rounded ones (1: the codes exactly);
    /// backward, the identity.
    pub fn latent(
        &self,
        dec: &TrainDecoder,
        start: usize,
        len: usize,
        hardness: f64,
    ) -> Result<Tensor> {
        let s = self.semantic.as_tensor().narrow(0, start, len)?;
        let sd = s.detach();
        let idx = Self::nearest(dec, &sd)?;
        let q = dec.codebook().index_select(&idx, 0)?;
        let s = (&s + ((q - sd)? * hardness)?)?;
        let y = self.acoustic.as_tensor().narrow(0, start, len)?.tanh()?;
        let yd = y.detach();
        let (v, _) = Self::levels(dec, &yd)?;
        let y = (&y + ((v - yd)? * hardness)?)?;
        Tensor::cat(&[&s, &y], 1)
    }

    /// The current hard codes, model-side (+2).
    pub fn codes(&self, dec: &TrainDecoder) -> Result<Vec<Vec<u32>>> {
        let s = self.semantic.as_tensor().detach();
        let sem = Self::nearest(dec, &s)?.to_vec1::<u32>()?;
        let y = self.acoustic.as_tensor().detach().tanh()?;
        let (_, k) = Self::levels(dec, &y)?;
        let ac = k.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let off = SPECIAL_CODES as u32;
        Ok(sem
            .into_iter()
            .zip(ac)
            .map(|(s, a)| {
                let mut f = Vec::with_capacity(1 + a.len());
                f.push(s + off);
                f.extend(a.into_iter().map(|c| c + off));
                f
            })
            .collect())
    }
}

/// Adam (`beta = 0.9, 0.999`) with the gradients' global norm clipped.
pub struct Adam {
    params: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: i32,
    clip: f64,
}

impl Adam {
    pub fn new(params: Vec<Var>, clip: f64) -> Result<Self> {
        let m = params
            .iter()
            .map(|p| p.as_tensor().zeros_like())
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            v: m.clone(),
            m,
            params,
            t: 0,
            clip,
        })
    }

    /// One step at learning rate `lr`; returns the gradient norm before clipping.
    pub fn step(&mut self, grads: &candle_core::backprop::GradStore, lr: f64) -> Result<f64> {
        let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
        let gs = self
            .params
            .iter()
            .map(|p| match grads.get(p.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => p.as_tensor().zeros_like(),
            })
            .collect::<Result<Vec<_>>>()?;
        let mut sq = 0f64;
        for g in &gs {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        let norm = sq.sqrt();
        let scale = if norm.is_finite() && norm > self.clip {
            self.clip / norm
        } else {
            1.0
        };
        if !norm.is_finite() {
            // A non-finite gradient would poison the moments: skip the step.
            return Ok(norm);
        }
        self.t += 1;
        let c1 = 1.0 - b1.powi(self.t);
        let c2 = 1.0 - b2.powi(self.t);
        for (i, g) in gs.iter().enumerate() {
            let g = (g * scale)?;
            self.m[i] = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
            self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let update = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + eps)?)?;
            let p = &self.params[i];
            p.set(&(p.as_tensor() - (update * lr)?)?)?;
        }
        Ok(norm)
    }
}

/// How far step `step`'s latent is moved towards the codes (see `harden_from`).
pub fn hardness(o: &SearchOptions, step: usize) -> f64 {
    let from = o.harden_from.clamp(0.0, 1.0) * o.steps as f64;
    let last = o.steps.saturating_sub(1) as f64;
    if from >= last {
        return if o.harden_from >= 1.0 { 0.0 } else { 1.0 };
    }
    ((step as f64 - from) / (last - from)).clamp(0.0, 1.0)
}

/// Cosine decay from `lr` to `lr_end` over `steps`.
pub fn learning_rate(o: &SearchOptions, step: usize) -> f64 {
    let f = if o.steps <= 1 {
        0.0
    } else {
        step as f64 / (o.steps - 1) as f64
    };
    o.lr_end + 0.5 * (o.lr - o.lr_end) * (1.0 + (std::f64::consts::PI * f).cos())
}

/// Searches codes whose decoding sounds like `clip` (mono, at the codec's rate). The clip's
/// tail short of a whole frame is left out. `progress` hears every step; setting `stop`
/// ends the search early with the best codes so far.
pub fn search_codes(
    codec: &CodecDecoder,
    clip: &[f32],
    opts: &SearchOptions,
    progress: &mut dyn FnMut(&Progress),
    stop: &AtomicBool,
) -> crate::Result<Found> {
    let dec = TrainDecoder::new(codec, DType::F32)?;
    Ok(search_with(codec, &dec, clip, opts, progress, stop)?)
}

fn search_with(
    codec: &CodecDecoder,
    dec: &TrainDecoder,
    clip: &[f32],
    opts: &SearchOptions,
    progress: &mut dyn FnMut(&Progress),
    stop: &AtomicBool,
) -> Result<Found> {
    let spf = dec.samples_per_frame();
    let frames = clip.len() / spf;
    if frames == 0 {
        candle_core::bail!(
            "the clip is {} samples, shorter than one frame ({spf})",
            clip.len()
        );
    }
    let started = Instant::now();
    let device = dec.device().clone();
    let target = Tensor::new(&clip[..frames * spf], &device)?.to_dtype(dec.dtype())?;
    let crop = opts.crop_frames.unwrap_or(frames).clamp(1, frames);
    let context = dec.receptive_frames();
    let crop_loss = Spectral::weighted(crop * spf, 24_000, opts.weights, dec.dtype(), &device)?;
    let full_loss = Spectral::weighted(frames * spf, 24_000, opts.weights, dec.dtype(), &device)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let params = FrameParams::random(dec, frames, &mut rng)?;
    let mut adam = Adam::new(
        vec![params.semantic.clone(), params.acoustic.clone()],
        opts.clip_grad,
    )?;

    // Full-clip decodes run on the inference path (windowed attention, memory linear in T).
    let judge = |codes: &[Vec<u32>]| -> Result<(f32, Tensor)> {
        let audio = codec
            .decode_frames(codes, None)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let audio = Tensor::new(&audio[..frames * spf], &device)?.to_dtype(dec.dtype())?;
        let l = full_loss
            .loss(&audio, &target)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        Ok((l, audio))
    };
    let mut best_codes = params.codes(dec)?;
    let (mut best_loss, _) = judge(&best_codes)?;
    // Codes replace the best ones if their full-clip loss is lower.
    let offer = |codes: Vec<Vec<u32>>, best: &mut Vec<Vec<u32>>, loss: &mut f32| -> Result<()> {
        let (l, _) = judge(&codes)?;
        if l < *loss {
            *loss = l;
            *best = codes;
        }
        Ok(())
    };
    let mut done = 0;
    let mut interrupted = false;
    let total = opts.steps + opts.refine.sweeps * frames;
    for step in 0..opts.steps {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let start = if crop == frames {
            0
        } else {
            rng.random_range(0..=frames - crop)
        };
        let from = start.saturating_sub(context);
        let hardness = hardness(opts, step);
        let latent = params.latent(dec, from, start + crop - from, hardness)?;
        let audio = dec.forward(&latent)?;
        let pred = audio.narrow(0, (start - from) * spf, crop * spf)?;
        let loss = crop_loss.loss(&pred, &target.narrow(0, start * spf, crop * spf)?)?;
        let grads = loss.backward()?;
        adam.step(&grads, learning_rate(opts, step))?;
        done = step + 1;
        if done % opts.eval_every.max(1) == 0 || done == opts.steps {
            offer(params.codes(dec)?, &mut best_codes, &mut best_loss)?;
        }
        progress(&Progress {
            step: done,
            steps: total,
            loss: loss.to_dtype(DType::F32)?.to_scalar::<f32>()?,
            best_loss,
            elapsed: started.elapsed(),
        });
    }
    if interrupted && done % opts.eval_every.max(1) != 0 {
        offer(params.codes(dec)?, &mut best_codes, &mut best_loss)?;
    }
    let mut sweeps_done = 0;
    if !interrupted && opts.refine.sweeps > 0 {
        let off = SPECIAL_CODES as u32;
        let mut raw: Vec<Vec<u32>> = best_codes
            .iter()
            .map(|f| f.iter().map(|c| c - off).collect())
            .collect();
        let mut refiner = Refiner::new(codec, dec, &target, opts.weights, opts.refine);
        let mut visited = 0;
        'sweeps: for _ in 0..opts.refine.sweeps {
            let mut changed = 0;
            refiner.restart();
            for _ in 0..frames {
                if stop.load(Ordering::SeqCst) {
                    interrupted = true;
                    break 'sweeps;
                }
                changed += refiner.improve_next(&mut raw)? as usize;
                visited += 1;
                progress(&Progress {
                    step: opts.steps + visited,
                    steps: total,
                    loss: best_loss,
                    best_loss,
                    elapsed: started.elapsed(),
                });
            }
            offer(model_side(&raw), &mut best_codes, &mut best_loss)?;
            sweeps_done += 1;
            if changed == 0 {
                break;
            }
        }
        if interrupted {
            // Changes of the unfinished pass count if they help the whole clip.
            offer(model_side(&raw), &mut best_codes, &mut best_loss)?;
        }
    }
    let (_, audio) = judge(&best_codes)?;
    let stft_distance = full_loss.distance(&audio, &target)?;
    let (_, random) = judge(&random_codes(codec, frames, opts.seed ^ 0x5eed_c0de))?;
    let random_stft_distance = full_loss.distance(&random, &target)?;
    Ok(Found {
        codes: best_codes,
        loss: best_loss,
        stft_distance,
        random_stft_distance,
        steps_done: done,
        sweeps_done,
        interrupted,
    })
}

/// The level (RMS, dBFS) the codec speaks at: that of random codes' decoding (4 s). A clip
/// is brought to it before the search, so that the codes are not asked for a loudness the
/// decoder does not make (a random decoder's level is far from a recording's).
pub fn speaking_level_dbfs(codec: &CodecDecoder) -> crate::Result<f32> {
    let audio = codec.decode_frames(&random_codes(codec, 50, 7), None)?;
    let ms = audio.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / audio.len().max(1) as f64;
    Ok((10.0 * ms.max(1e-20).log10()) as f32)
}

/// Random valid codes (model-side), as many frames as asked: the yardstick a found voice's
/// distance is read against.
pub fn random_codes(codec: &CodecDecoder, frames: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let off = SPECIAL_CODES as u32;
    (0..frames)
        .map(|_| {
            let mut f = vec![off + rng.random_range(0..codec.semantic_size as u32)];
            f.extend((0..codec.n_acoustic).map(|_| off + rng.random_range(0..codec.levels as u32)));
            f
        })
        .collect()
}
