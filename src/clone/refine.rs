//! The discrete refinement after the gradient search: frame by frame from the start, the
//! gradient of the loss at the current codes ranks single-code changes (another semantic
//! entry, one acoustic value one level up or down) by the gain it predicts, the best few are
//! decoded exactly on a short window (the inference decoder's streaming state carries the
//! frames before, so a candidate costs only its window), and the best real gain is kept.
//! Gradient descent through snapped codes finds the region; this finds the codes in it (the
//! semantic code, one of thousands, sets most of a frame's sound and a straight-through step
//! rarely lands on the right one).

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor, Var};

use super::decoder::TrainDecoder;
use super::loss::{LossWeights, Spectral};
use crate::model::codec::{CodecDecoder, CodecState};
use crate::model::config::SPECIAL_CODES;

/// How the refinement runs.
#[derive(Debug, Clone, Copy)]
pub struct RefineOptions {
    /// Passes over all frames (0: none).
    pub sweeps: usize,
    /// Semantic entries tried per frame, best predicted first.
    pub semantic_candidates: usize,
    /// Single acoustic moves tried per frame.
    pub acoustic_candidates: usize,
    /// Frames of audio from the changed one on that judge a change.
    pub window_frames: usize,
}

impl Default for RefineOptions {
    fn default() -> Self {
        Self {
            // One pass: on the full-size codec a pass costs about as much as 250 gradient
            // steps for a 10 s clip (CPU); tiny codecs gain from a second.
            sweeps: 1,
            semantic_candidates: 8,
            acoustic_candidates: 8,
            window_frames: 4,
        }
    }
}

/// Raw codes (no offset) of one frame: the semantic index, then the acoustic level indices.
pub type FrameCodes = Vec<u32>;

/// A change to one frame.
#[derive(Debug, Clone, Copy)]
enum Move {
    Semantic(u32),
    Acoustic { dim: usize, level: u32 },
}

/// The decoder, the clip and the per-length losses a refinement works with.
pub struct Refiner<'a> {
    codec: &'a CodecDecoder,
    dec: &'a TrainDecoder,
    /// The inference decoder's state after frames `..at` of the current codes.
    state: CodecState,
    at: usize,
    target: &'a Tensor,
    weights: LossWeights,
    /// One loss per window length (the last windows are shorter).
    losses: HashMap<usize, Spectral>,
    opts: RefineOptions,
}

impl<'a> Refiner<'a> {
    pub fn new(
        codec: &'a CodecDecoder,
        dec: &'a TrainDecoder,
        target: &'a Tensor,
        weights: LossWeights,
        opts: RefineOptions,
    ) -> Self {
        Self {
            codec,
            dec,
            state: codec.start(),
            at: 0,
            target,
            weights,
            losses: HashMap::new(),
            opts,
        }
    }

    /// The latent rows `[len, sd + na]` of raw frame codes: the inference decoder's own.
    pub fn latent(&self, frames: &[FrameCodes]) -> Result<Tensor> {
        self.codec
            .latent(&model_side(frames))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?
            .squeeze(0)?
            .to_dtype(self.dec.dtype())?
            .contiguous()
    }

    fn loss_for(&mut self, samples: usize) -> Result<&Spectral> {
        if !self.losses.contains_key(&samples) {
            let s = Spectral::weighted(
                samples,
                24_000,
                self.weights,
                self.dec.dtype(),
                self.dec.device(),
            )?;
            self.losses.insert(samples, s);
        }
        Ok(&self.losses[&samples])
    }

    /// Loss of frames `t..end` decoded from `latent` (rows `from..end`).
    fn window_loss(
        &mut self,
        latent: &Tensor,
        from: usize,
        t: usize,
        end: usize,
    ) -> Result<Tensor> {
        let spf = self.dec.samples_per_frame();
        let audio = self.dec.forward(latent)?;
        let pred = audio.narrow(0, (t - from) * spf, (end - t) * spf)?;
        let target = self.target.narrow(0, t * spf, (end - t) * spf)?;
        self.loss_for((end - t) * spf)?.loss(&pred, &target)
    }

    /// Frames `t..end` decoded after the current state: their loss against the clip.
    fn streamed_loss(&mut self, frames: &[FrameCodes], t: usize) -> Result<f32> {
        let audio = self
            .codec
            .decode_chunk(&mut self.state.clone(), &model_side(frames), None)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let spf = self.dec.samples_per_frame();
        let n = frames.len() * spf;
        let pred = Tensor::new(&audio[..n.min(audio.len())], self.dec.device())?
            .to_dtype(self.dec.dtype())?;
        let target = self.target.narrow(0, t * spf, pred.dim(0)?)?;
        let l = self.loss_for(pred.dim(0)?)?.loss(&pred, &target)?;
        scalar(&l)
    }

    /// Starts a pass from the first frame.
    pub fn restart(&mut self) {
        self.state = self.codec.start();
        self.at = 0;
    }

    /// The next frame of the pass (frames are visited in order from [`Self::restart`]):
    /// ranks moves by the gradient, decodes the best few, applies the best real gain.
    /// Returns whether the frame changed.
    pub fn improve_next(&mut self, codes: &mut [FrameCodes]) -> Result<bool> {
        let t = self.at;
        let frames = codes.len();
        let from = t.saturating_sub(self.dec.receptive_frames());
        let end = (t + self.opts.window_frames.max(1)).min(frames);
        // The gradient at the current codes, through the differentiable decoder.
        let var = Var::from_tensor(&self.latent(&codes[from..end])?)?;
        let grads = self
            .window_loss(var.as_tensor(), from, t, end)?
            .backward()?;
        let mut best: Option<(f32, Move)> = None;
        if let Some(g) = grads.get(var.as_tensor()) {
            let g = g.get(t - from)?.to_dtype(DType::F32)?;
            let sd = self.dec.semantic_dim();
            let gs = g.narrow(0, 0, sd)?;
            let ga = g.narrow(0, sd, g.dim(0)? - sd)?;
            let moves = self.candidates(&codes[t], &gs, &ga)?;
            let l0 = self.streamed_loss(&codes[t..end], t)?;
            let mut window = codes[t..end].to_vec();
            for m in moves {
                window[0] = codes[t].clone();
                apply(&mut window[0], m);
                let l = self.streamed_loss(&window, t)?;
                if l < best.map_or(l0, |b| b.0) {
                    best = Some((l, m));
                }
            }
        }
        if let Some((_, m)) = best {
            apply(&mut codes[t], m);
        }
        // Carry the decided frame into the state.
        self.codec
            .decode_chunk(&mut self.state, &model_side(&codes[t..=t]), None)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        self.at += 1;
        Ok(best.is_some())
    }

    /// Moves whose first-order gain `g · (new - current)` is most negative.
    fn candidates(&self, frame: &FrameCodes, gs: &Tensor, ga: &Tensor) -> Result<Vec<Move>> {
        let mut moves = Vec::new();
        if self.opts.semantic_candidates > 0 {
            let cb = self.dec.codebook().to_dtype(DType::F32)?;
            // g · c_k for every entry; the current entry's term is the same for all.
            let scores = cb.matmul(&gs.unsqueeze(1)?)?.squeeze(1)?;
            let order = scores.arg_sort_last_dim(true)?.to_vec1::<u32>()?;
            moves.extend(
                order
                    .into_iter()
                    .filter(|&k| k != frame[0])
                    .take(self.opts.semantic_candidates)
                    .map(Move::Semantic),
            );
        }
        let top = (self.dec.levels() - 1) as u32;
        let step = 2.0 / top as f32;
        let ga = ga.to_vec1::<f32>()?;
        let mut ac: Vec<(f32, Move)> = Vec::new();
        for (dim, &g) in ga.iter().enumerate() {
            let k = frame[1 + dim];
            if k < top {
                ac.push((g * step, Move::Acoustic { dim, level: k + 1 }));
            }
            if k > 0 {
                ac.push((-g * step, Move::Acoustic { dim, level: k - 1 }));
            }
        }
        ac.sort_by(|a, b| a.0.total_cmp(&b.0));
        moves.extend(
            ac.into_iter()
                .take(self.opts.acoustic_candidates)
                .map(|(_, m)| m),
        );
        Ok(moves)
    }
}

/// Raw frame codes shifted to the model's side (+2).
pub fn model_side(raw: &[FrameCodes]) -> Vec<Vec<u32>> {
    let off = SPECIAL_CODES as u32;
    raw.iter()
        .map(|f| f.iter().map(|c| c + off).collect())
        .collect()
}

fn apply(frame: &mut FrameCodes, m: Move) {
    match m {
        Move::Semantic(k) => frame[0] = k,
        Move::Acoustic { dim, level } => frame[1 + dim] = level,
    }
}

fn scalar(t: &Tensor) -> Result<f32> {
    t.to_dtype(DType::F32)?.to_scalar::<f32>()
}
