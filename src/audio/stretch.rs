//! Speech rate without pitch change: WSOLA (waveform-similarity overlap-add). Output frames of
//! 20 ms are laid every 10 ms with Hann windows; each is read from the input near
//! `rate × output time`, shifted by up to 5 ms to best continue the previous frame, so pitch
//! periods line up and the result has no phase jumps. Works on a stream of chunks.

/// Output hop (samples at 24 kHz: 10 ms); frames are twice as long.
const HOP: usize = 240;
const FRAME: usize = 2 * HOP;
/// How far a frame may move to match its predecessor.
const SEEK: usize = 120;

/// Speaking rates (1.0 = as generated): a quarter of the speed to four times it.
pub const MIN_RATE: f32 = 0.25;
pub const MAX_RATE: f32 = 4.0;

pub struct Stretcher {
    rate: f64,
    window: Vec<f32>,
    /// Input not yet consumed, starting at absolute input index `base`.
    input: Vec<f32>,
    base: usize,
    /// Output frames emitted so far.
    frames: usize,
    /// Where the previous frame was read (absolute), for the similarity search.
    prev: Option<usize>,
    /// Second half of the last frame, to overlap with the next.
    tail: Vec<f32>,
    total_in: usize,
    total_out: usize,
}

impl Stretcher {
    /// `rate` > 1 speaks faster. Clamped to [`MIN_RATE`, `MAX_RATE`].
    pub fn new(rate: f32) -> Self {
        Self::with_factor(rate.clamp(MIN_RATE, MAX_RATE))
    }

    /// Any factor WSOLA handles (0.125 to 8), for rates combined with a pitch change.
    pub fn with_factor(factor: f32) -> Self {
        let rate = factor.clamp(0.125, 8.0) as f64;
        // Periodic Hann: overlapping halves sum to exactly 1.
        let window = (0..FRAME)
            .map(|i| {
                (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / FRAME as f64).cos()) as f32
            })
            .collect();
        Self {
            rate,
            window,
            input: Vec::new(),
            base: 0,
            frames: 0,
            prev: None,
            tail: vec![0.0; HOP],
            total_in: 0,
            total_out: 0,
        }
    }

    pub fn is_identity(&self) -> bool {
        (self.rate - 1.0).abs() < 1e-6
    }

    /// Stretches `input`, appending finished output to `out`.
    pub fn push(&mut self, input: &[f32], out: &mut Vec<f32>) {
        self.total_in += input.len();
        if self.is_identity() {
            out.extend_from_slice(input);
            self.total_out += input.len();
            return;
        }
        self.input.extend_from_slice(input);
        self.run(out, false);
    }

    /// Flushes the rest: the output then holds `round(input / rate)` samples in all.
    pub fn finish(&mut self, out: &mut Vec<f32>) {
        if self.is_identity() {
            return;
        }
        let target = (self.total_in as f64 / self.rate).round() as usize;
        // Silence after the end lets the last frames be read.
        self.input
            .extend(std::iter::repeat_n(0.0, FRAME + 2 * SEEK + HOP));
        self.run(out, true);
        out.extend_from_slice(&self.tail);
        self.total_out += HOP;
        if self.total_out > target {
            let extra = (self.total_out - target).min(out.len());
            out.truncate(out.len() - extra);
        } else {
            out.extend(std::iter::repeat_n(0.0, target - self.total_out));
        }
        self.total_out = target;
    }

    fn run(&mut self, out: &mut Vec<f32>, flushing: bool) {
        loop {
            let nominal = (self.frames as f64 * HOP as f64 * self.rate).round() as usize;
            let lo = nominal.saturating_sub(SEEK).max(self.base);
            let hi = nominal + SEEK;
            let end = self.base + self.input.len();
            if hi + FRAME > end {
                break;
            }
            let pos = match self.prev {
                None => nominal.max(self.base),
                Some(p) => {
                    // The natural continuation of the previous frame.
                    let target = p + HOP;
                    let tgt = &self.input[target - self.base..target - self.base + HOP];
                    let mut best = (lo, f32::MIN);
                    for cand in lo..=hi {
                        let seg = &self.input[cand - self.base..cand - self.base + HOP];
                        let score: f32 = seg.iter().zip(tgt).map(|(a, b)| a * b).sum();
                        if score > best.1 {
                            best = (cand, score);
                        }
                    }
                    best.0
                }
            };
            let frame = &self.input[pos - self.base..pos - self.base + FRAME];
            let (w_head, w_tail) = self.window.split_at(HOP);
            out.extend(
                self.tail
                    .iter()
                    .zip(&frame[..HOP])
                    .zip(w_head)
                    .map(|((t, x), w)| t + x * w),
            );
            for ((t, x), w) in self.tail.iter_mut().zip(&frame[HOP..]).zip(w_tail) {
                *t = x * w;
            }
            self.total_out += HOP;
            self.frames += 1;
            self.prev = Some(pos);
            // Drop input no later frame can reach.
            let next_lo = ((self.frames as f64 * HOP as f64 * self.rate).round() as usize)
                .saturating_sub(SEEK)
                .min(pos + HOP);
            if next_lo > self.base + 4096 && !flushing {
                let drop = next_lo - self.base;
                self.input.drain(..drop);
                self.base += drop;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::test_signal::{crossings, sine};

    fn stretch(x: &[f32], rate: f32, chunk: usize) -> Vec<f32> {
        let mut s = Stretcher::new(rate);
        let mut out = Vec::new();
        for c in x.chunks(chunk) {
            s.push(c, &mut out);
        }
        s.finish(&mut out);
        out
    }

    #[test]
    fn identity_is_exact() {
        let x = sine(10_000, 220.0);
        assert_eq!(stretch(&x, 1.0, 777), x);
    }

    #[test]
    fn faster_and_slower_keep_pitch_and_continuity() {
        let x = sine(48_000, 200.0); // 2 s
        for rate in [0.25f32, 0.5, 0.8, 1.5, 2.0, 3.0, 4.0] {
            let y = stretch(&x, rate, 1920 * 5 + 3);
            let want = (x.len() as f32 / rate).round() as usize;
            assert_eq!(y.len(), want, "rate {rate}");
            // Same pitch: crossings per second unchanged (edges aside).
            let core = &y[2400..y.len() - 2400];
            let f = crossings(core) as f32 / (core.len() as f32 / 24000.0);
            assert!((f - 200.0).abs() < 6.0, "rate {rate}: {f} Hz");
            // No clicks: a 200 Hz sine at amplitude 0.5 moves < 0.03 per sample.
            let step = core
                .windows(2)
                .map(|w| (w[1] - w[0]).abs())
                .fold(0.0, f32::max);
            assert!(step < 0.04, "rate {rate}: step {step}");
            // Level kept (no gaps, no doubling).
            let rms = (core.iter().map(|v| v * v).sum::<f32>() / core.len() as f32).sqrt();
            assert!((rms - 0.3535).abs() < 0.03, "rate {rate}: rms {rms}");
        }
    }
}
