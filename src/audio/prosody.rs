//! Speaking rate and pitch for a stream of speech. Pitch moves by resampling: played `p` times
//! faster, speech is `p` times higher and `p` times shorter, so the WSOLA stretcher first makes
//! it `p / rate` times longer (pitch kept) and the resampler then brings both the pitch and
//! the duration to where they were asked. Without a pitch change it is the stretcher alone.

use super::resample::StreamResampler;
use super::stretch::Stretcher;
pub use super::stretch::{MAX_RATE, MIN_RATE};
use crate::error::Result;

pub const MIN_PITCH: f32 = 0.5;
pub const MAX_PITCH: f32 = 2.0;

/// Pitch ratios are rounded to 1/240 so that the resampler's rates share a factor of 100 at
/// 24 kHz and its FFTs stay short; 1/240 is about 7 cents, under what ears tell apart.
const PITCH_STEPS: f32 = 240.0;

pub struct Prosody {
    stretch: Stretcher,
    shift: Option<StreamResampler>,
    stretched: Vec<f32>,
}

impl Prosody {
    /// `rate` > 1 speaks faster, `pitch` > 1 speaks higher (a frequency ratio); each is clamped
    /// to its range, [`MIN_RATE`]..=[`MAX_RATE`] and [`MIN_PITCH`]..=[`MAX_PITCH`].
    pub fn new(sample_rate: u32, rate: f32, pitch: f32) -> Result<Self> {
        let rate = rate.clamp(MIN_RATE, MAX_RATE);
        let pitch = (pitch.clamp(MIN_PITCH, MAX_PITCH) * PITCH_STEPS).round() / PITCH_STEPS;
        if pitch == 1.0 {
            return Ok(Self {
                stretch: Stretcher::new(rate),
                shift: None,
                stretched: Vec::new(),
            });
        }
        let from = (sample_rate as f64 * pitch as f64).round() as u32;
        Ok(Self {
            stretch: Stretcher::with_factor(rate / pitch),
            shift: Some(StreamResampler::new(from, sample_rate)?),
            stretched: Vec::new(),
        })
    }

    /// Shapes `input`, appending finished output to `out`.
    pub fn push(&mut self, input: &[f32], out: &mut Vec<f32>) -> Result<()> {
        let Some(shift) = self.shift.as_mut() else {
            self.stretch.push(input, out);
            return Ok(());
        };
        self.stretched.clear();
        self.stretch.push(input, &mut self.stretched);
        shift.push(&self.stretched, out)
    }

    /// Flushes the rest: the output then holds about `input / rate` samples in all.
    pub fn finish(&mut self, out: &mut Vec<f32>) -> Result<()> {
        let Some(shift) = self.shift.as_mut() else {
            self.stretch.finish(out);
            return Ok(());
        };
        self.stretched.clear();
        self.stretch.finish(&mut self.stretched);
        shift.push(&self.stretched, out)?;
        shift.finish(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audio::test_signal::{crossings, sine};

    /// Frequency from upward zero crossings, edges left out.
    fn frequency(x: &[f32]) -> f32 {
        let core = &x[2400..x.len() - 2400];
        crossings(core) as f32 / (core.len() as f32 / 24000.0)
    }

    fn shape(x: &[f32], rate: f32, pitch: f32) -> Vec<f32> {
        let mut p = Prosody::new(24000, rate, pitch).unwrap();
        let mut out = Vec::new();
        for c in x.chunks(1920 * 3 + 7) {
            p.push(c, &mut out).unwrap();
        }
        p.finish(&mut out).unwrap();
        out
    }

    #[test]
    fn pitch_moves_frequency_and_keeps_duration() {
        let x = sine(48_000, 200.0); // 2 s
        for (rate, pitch) in [
            (1.0f32, 1.5f32),
            (1.0, 0.75),
            (1.0, 2.0),
            (1.0, 0.5),
            (2.0, 1.25),
        ] {
            let y = shape(&x, rate, pitch);
            let want = x.len() as f32 / rate;
            assert!(
                (y.len() as f32 - want).abs() <= 2.0,
                "rate {rate} pitch {pitch}: {} samples, want {want}",
                y.len()
            );
            let f = frequency(&y);
            assert!(
                (f - 200.0 * pitch).abs() < 200.0 * pitch * 0.03,
                "rate {rate} pitch {pitch}: {f} Hz"
            );
            // Level kept: no gaps, no doubling.
            let core = &y[2400..y.len() - 2400];
            let rms = (core.iter().map(|v| v * v).sum::<f32>() / core.len() as f32).sqrt();
            assert!(
                (rms - 0.3535).abs() < 0.04,
                "rate {rate} pitch {pitch}: rms {rms}"
            );
        }
    }

    #[test]
    fn no_pitch_change_is_the_stretcher_alone() {
        let x = sine(10_000, 220.0);
        assert_eq!(shape(&x, 1.0, 1.0), x);
        assert_eq!(shape(&x, 1.0, 1.001), x, "below one pitch step");
    }
}
