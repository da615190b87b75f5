//! Streaming mono resampling (rubato's FFT resampler): chunks of any size in, continuous output
//! out, with the resampler's start-up delay trimmed so output sample n lines up with input
//! time n / rate.

use rubato::audioadapter_buffers::direct::SequentialSliceOfVecs;
use rubato::{Fft, FixedSync, Indexing, Resampler};

use crate::error::{Error, Result};

const CHUNK: usize = 480;

pub struct StreamResampler {
    inner: Option<Fft<f32>>,
    pending: Vec<f32>,
    /// Output samples still to drop (the resampler's delay).
    skip: usize,
    from: u32,
    to: u32,
    consumed: u64,
    produced: u64,
}

impl StreamResampler {
    pub fn new(from: u32, to: u32) -> Result<Self> {
        let inner = if from == to {
            None
        } else {
            let r = Fft::<f32>::new(from as usize, to as usize, CHUNK, 1, FixedSync::Input)
                .map_err(|e| Error::InvalidInput(format!("resampler {from} -> {to} Hz: {e}")))?;
            Some(r)
        };
        let skip = inner.as_ref().map_or(0, |r| r.output_delay());
        Ok(Self {
            inner,
            pending: Vec::new(),
            skip,
            from,
            to,
            consumed: 0,
            produced: 0,
        })
    }

    /// Resamples `input`, appending what is ready to `out`.
    pub fn push(&mut self, input: &[f32], out: &mut Vec<f32>) -> Result<()> {
        self.consumed += input.len() as u64;
        let Some(r) = self.inner.as_mut() else {
            out.extend_from_slice(input);
            self.produced += input.len() as u64;
            return Ok(());
        };
        self.pending.extend_from_slice(input);
        while self.pending.len() >= r.input_frames_next() {
            let n = r.input_frames_next();
            let chunk: Vec<f32> = self.pending.drain(..n).collect();
            Self::run(r, chunk, None, &mut self.skip, out, &mut self.produced)?;
        }
        Ok(())
    }

    /// Flushes the tail: the output then holds exactly `input * to / from` samples (rounded).
    pub fn finish(&mut self, out: &mut Vec<f32>) -> Result<()> {
        let target = (self.consumed * self.to as u64).div_ceil(self.from as u64);
        let Some(r) = self.inner.as_mut() else {
            return Ok(());
        };
        let mut guard = 0;
        while self.produced < target && guard < 64 {
            let n = r.input_frames_next();
            let take = self.pending.len().min(n);
            let mut chunk: Vec<f32> = self.pending.drain(..take).collect();
            let partial = chunk.len();
            chunk.resize(n, 0.0);
            let idx = Indexing {
                input_offset: 0,
                output_offset: 0,
                partial_len: Some(partial),
                active_channels_mask: None,
            };
            Self::run(
                r,
                chunk,
                Some(&idx),
                &mut self.skip,
                out,
                &mut self.produced,
            )?;
            guard += 1;
        }
        if self.produced > target {
            let extra = (self.produced - target) as usize;
            out.truncate(out.len().saturating_sub(extra));
            self.produced = target;
        }
        Ok(())
    }

    fn run(
        r: &mut Fft<f32>,
        chunk: Vec<f32>,
        idx: Option<&Indexing>,
        skip: &mut usize,
        out: &mut Vec<f32>,
        produced: &mut u64,
    ) -> Result<()> {
        let n = chunk.len();
        let bufs = [chunk];
        let input = SequentialSliceOfVecs::new(&bufs[..], 1, n)
            .map_err(|e| Error::InvalidInput(format!("resampler input: {e}")))?;
        let y = r
            .process(&input, idx)
            .map_err(|e| Error::InvalidInput(format!("resampling failed: {e}")))?
            .take_data();
        let drop = (*skip).min(y.len());
        *skip -= drop;
        *produced += (y.len() - drop) as u64;
        out.extend_from_slice(&y[drop..]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dominant frequency by zero crossings.
    fn freq(x: &[f32], rate: f32) -> f32 {
        let crossings = x.windows(2).filter(|w| w[0] <= 0.0 && w[1] > 0.0).count();
        crossings as f32 / (x.len() as f32 / rate)
    }

    #[test]
    fn sine_sweep_keeps_frequency_length_and_continuity() {
        let (from, to) = (24000u32, 48000u32);
        let mut r = StreamResampler::new(from, to).unwrap();
        let mut out = Vec::new();
        // A slow sweep fed in odd-sized chunks (like codec chunks).
        let n = 24000 * 2;
        let x: Vec<f32> = (0..n)
            .map(|i| {
                let t = i as f32 / from as f32;
                (2.0 * std::f32::consts::PI * (300.0 * t + 100.0 * t * t)).sin() * 0.5
            })
            .collect();
        for chunk in x.chunks(3840 + 7) {
            r.push(chunk, &mut out).unwrap();
        }
        r.finish(&mut out).unwrap();
        assert_eq!(out.len(), n * 2);
        // Frequency preserved: the first 0.2 s is ~300-340 Hz at either rate.
        let f_in = freq(&x[..4800], from as f32);
        let f_out = freq(&out[..9600], to as f32);
        assert!((f_in - f_out).abs() < 10.0, "{f_in} vs {f_out}");
        // No discontinuity: consecutive samples of a < 1 kHz sine at 48 kHz differ by little.
        let max_step = out[100..out.len() - 100]
            .windows(2)
            .map(|w| (w[1] - w[0]).abs())
            .fold(0.0, f32::max);
        assert!(max_step < 0.08, "step {max_step}");
        // Aligned: output at time t matches the input at time t.
        for &i in &[12000usize, 30000] {
            assert!(
                (out[2 * i] - x[i]).abs() < 0.02,
                "at {i}: {} vs {}",
                out[2 * i],
                x[i]
            );
        }
    }

    #[test]
    fn same_rate_passes_through() {
        let mut r = StreamResampler::new(24000, 24000).unwrap();
        let mut out = Vec::new();
        r.push(&[0.1, 0.2], &mut out).unwrap();
        r.finish(&mut out).unwrap();
        assert_eq!(out, vec![0.1, 0.2]);
    }
}
