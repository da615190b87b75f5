//! How far decoded audio is from the clip: multi-resolution STFT (spectral convergence and
//! log-magnitude), a log-mel term and a small waveform term. STFTs are matmuls of frames with
//! Hann-windowed cos/sin tables; frames are four shifted copies of the signal cut in hops
//! (every FFT size is four hops), so the whole loss is differentiable with candle's ops.

use candle_core::{DType, Device, Result, Tensor};

/// FFT sizes (hop = size / 4), after the public inversion recipe's 2296 .. 76, each rounded
/// to a multiple of four.
pub const FFT_SIZES: [usize; 8] = [2296, 1416, 876, 544, 336, 208, 128, 76];
const MEL_FFT: usize = 2048;
const MEL_BANDS: usize = 128;

/// How much each term counts in the training loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossWeights {
    /// Mean absolute sample difference. Not small: through a decoder that can make the clip's
    /// own waveform it is the term that leads the search to the right codes (on a random
    /// decoder, recovering 11 of 12 semantic codes where the spectral terms alone found none).
    pub wave: f64,
    /// Spectral convergence plus log-magnitude L1, averaged over the FFT sizes.
    pub stft: f64,
    /// Log-mel L1 (128 bands, FFT 2048).
    pub mel: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            wave: 1.0,
            stft: 1.0,
            mel: 1.0,
        }
    }
}
/// The smallest floor, for silent targets.
const MAG_FLOOR: f64 = 1e-5;
/// Log-magnitude floor relative to the target's peak: -60 dB.
pub const FLOOR_BELOW_PEAK: f64 = 1e-3;

struct Resolution {
    size: usize,
    /// `[size, 2 * bins]`: windowed cos then sin.
    dft: Tensor,
    bins: usize,
}

impl Resolution {
    fn new(size: usize, dtype: DType, device: &Device) -> Result<Self> {
        let bins = size / 2 + 1;
        let mut t = vec![0f32; size * 2 * bins];
        for n in 0..size {
            let w = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / size as f64).cos();
            for k in 0..bins {
                let a = 2.0 * std::f64::consts::PI * (n * k % size) as f64 / size as f64;
                t[n * 2 * bins + k] = (w * a.cos()) as f32;
                t[n * 2 * bins + bins + k] = (-w * a.sin()) as f32;
            }
        }
        let dft = Tensor::from_vec(t, (size, 2 * bins), device)?.to_dtype(dtype)?;
        Ok(Self { size, dft, bins })
    }

    /// Magnitudes `[frames, bins]` of `x` `[N]` (zero-padded to whole hops).
    fn magnitude(&self, x: &Tensor) -> Result<Tensor> {
        let hop = self.size / 4;
        let n = x.dim(0)?;
        let rows = n.div_ceil(hop).max(4);
        let x = x
            .pad_with_zeros(0, 0, rows * hop - n)?
            .reshape((rows, hop))?;
        let frames = rows - 3;
        let parts = (0..4)
            .map(|i| x.narrow(0, i, frames))
            .collect::<Result<Vec<_>>>()?;
        let spec = Tensor::cat(&parts, 1)?.matmul(&self.dft)?;
        let re = spec.narrow(1, 0, self.bins)?;
        let im = spec.narrow(1, self.bins, self.bins)?;
        ((re.sqr()? + im.sqr()?)? + 1e-10)?.sqrt()
    }
}

/// The loss's fixed tables, built once per search.
pub struct Spectral {
    resolutions: Vec<Resolution>,
    mel: Resolution,
    /// `[bins, MEL_BANDS]` triangular filters.
    mel_filters: Tensor,
    weights: LossWeights,
}

/// HTK mel scale.
fn mel(hz: f64) -> f64 {
    2595.0 * (1.0 + hz / 700.0).log10()
}

fn mel_filters(size: usize, rate: f64, bands: usize) -> Vec<f32> {
    let bins = size / 2 + 1;
    let top = mel(rate / 2.0);
    let edges: Vec<f64> = (0..bands + 2)
        .map(|i| {
            let m = top * i as f64 / (bands + 1) as f64;
            700.0 * (10f64.powf(m / 2595.0) - 1.0)
        })
        .collect();
    let mut w = vec![0f32; bins * bands];
    for k in 0..bins {
        let f = k as f64 * rate / size as f64;
        for b in 0..bands {
            let (lo, mid, hi) = (edges[b], edges[b + 1], edges[b + 2]);
            let v = if f > lo && f <= mid {
                (f - lo) / (mid - lo)
            } else if f > mid && f < hi {
                (hi - f) / (hi - mid)
            } else {
                0.0
            };
            w[k * bands + b] = v as f32;
        }
    }
    w
}

impl Spectral {
    /// Tables for signals of `samples` samples at `rate` Hz: FFT sizes longer than the
    /// signal are left out.
    pub fn new(samples: usize, rate: u32, dtype: DType, device: &Device) -> Result<Self> {
        Self::weighted(samples, rate, LossWeights::default(), dtype, device)
    }

    pub fn weighted(
        samples: usize,
        rate: u32,
        weights: LossWeights,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let mut resolutions = FFT_SIZES
            .iter()
            .filter(|&&s| s <= samples)
            .map(|&s| Resolution::new(s, dtype, device))
            .collect::<Result<Vec<_>>>()?;
        if resolutions.is_empty() {
            resolutions.push(Resolution::new(
                FFT_SIZES[FFT_SIZES.len() - 1],
                dtype,
                device,
            )?);
        }
        let mel = Resolution::new(MEL_FFT, dtype, device)?;
        let mel_filters = Tensor::from_vec(
            mel_filters(MEL_FFT, rate as f64, MEL_BANDS),
            (MEL_FFT / 2 + 1, MEL_BANDS),
            device,
        )?
        .to_dtype(dtype)?;
        Ok(Self {
            resolutions,
            mel,
            mel_filters,
            weights,
        })
    }

    /// The training loss of `pred` against `target` (both `[N]`), a scalar tensor.
    pub fn loss(&self, pred: &Tensor, target: &Tensor) -> Result<Tensor> {
        let w = self.weights;
        let mut total = ((pred - target)?.abs()?.mean_all()? * w.wave)?;
        if w.stft != 0.0 {
            let r = self.resolutions.len() as f64;
            for res in &self.resolutions {
                let p = res.magnitude(pred)?;
                let t = res.magnitude(target)?;
                let sc = ((&p - &t)?.sqr()?.sum_all()?.sqrt()? / t.sqr()?.sum_all()?.sqrt()?)?;
                let lm = log_l1(&p, &t)?;
                total = (total + ((sc + lm)? * (w.stft / r))?)?;
            }
        }
        if w.mel != 0.0 {
            let p = self.mel.magnitude(pred)?.sqr()?.matmul(&self.mel_filters)?;
            let t = self
                .mel
                .magnitude(target)?
                .sqr()?
                .matmul(&self.mel_filters)?;
            total = (total + (log_l1(&p, &t)? * w.mel)?)?;
        }
        Ok(total)
    }

    /// The mean log-magnitude distance over the resolutions: the figure reported as a voice's
    /// "STFT distance" (0 for the same audio; it does not depend on the level of both).
    pub fn distance(&self, pred: &Tensor, target: &Tensor) -> Result<f32> {
        let mut sum = 0f32;
        for res in &self.resolutions {
            let d = log_l1(&res.magnitude(pred)?, &res.magnitude(target)?)?;
            sum += d.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        }
        Ok(sum / self.resolutions.len() as f32)
    }
}

/// Mean `|log(p + f) - log(t + f)|`, the floor `f` [`FLOOR_BELOW_PEAK`] under the target's
/// loudest bin: differences in bins far below what is heard do not count (an absolute floor
/// let the empty band above a recording's bandwidth outweigh the speech).
fn log_l1(p: &Tensor, t: &Tensor) -> Result<Tensor> {
    let peak = t.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    let floor = (peak * FLOOR_BELOW_PEAK).max(MAG_FLOOR);
    ((p + floor)?.log()? - (t + floor)?.log()?)?
        .abs()?
        .mean_all()
}

/// The STFT distance between two signals at 24 kHz (the shorter length is compared).
pub fn stft_distance(a: &[f32], b: &[f32]) -> Result<f32> {
    let n = a.len().min(b.len());
    let dev = Device::Cpu;
    let s = Spectral::new(n, 24_000, DType::F32, &dev)?;
    let a = Tensor::new(&a[..n], &dev)?;
    let b = Tensor::new(&b[..n], &dev)?;
    s.distance(&a, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// White-ish noise in -1..1 from a hash of the index.
    pub fn hash_noise(i: usize, seed: usize) -> f32 {
        let mut h = (i as u64 ^ (seed as u64) << 32).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        h ^= h >> 29;
        h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 32;
        (h % 20_001) as f32 / 10_000.0 - 1.0
    }

    fn tone(freq: f32, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| 0.3 * (2.0 * std::f32::consts::PI * freq * i as f32 / 24_000.0).sin())
            .collect()
    }

    #[test]
    fn magnitude_peaks_at_the_tone() -> Result<()> {
        let dev = Device::Cpu;
        let r = Resolution::new(544, DType::F32, &dev)?;
        // 24000 / 544 Hz per bin: bin 20 is 882.35 Hz.
        let x = Tensor::new(tone(24_000.0 * 20.0 / 544.0, 4800).as_slice(), &dev)?;
        let m = r.magnitude(&x)?.to_vec2::<f32>()?;
        let mid = &m[m.len() / 2];
        let peak = mid
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|p| p.0);
        assert_eq!(peak, Some(20));
        // Hann window: amplitude * size / 4 at the peak.
        assert!((mid[20] - 0.3 * 544.0 / 4.0).abs() < 0.5, "{}", mid[20]);
        Ok(())
    }

    #[test]
    fn distance_is_zero_for_the_same_audio_and_grows_with_difference() -> Result<()> {
        let a = tone(440.0, 24_000);
        let b = tone(460.0, 24_000);
        let c = tone(2000.0, 24_000);
        assert!(stft_distance(&a, &a)? < 1e-6);
        let near = stft_distance(&a, &b)?;
        let far = stft_distance(&a, &c)?;
        assert!(near > 0.0 && far > near, "near {near} far {far}");
        Ok(())
    }

    #[test]
    fn loss_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let n = 4800;
        let s = Spectral::new(n, 24_000, DType::F64, &dev)?;
        let noisy = |seed: usize, f: f32| -> Result<Tensor> {
            let v: Vec<f32> = tone(f, n)
                .iter()
                .enumerate()
                .map(|(i, x)| x + 0.01 * hash_noise(i, seed))
                .collect();
            Tensor::new(v.as_slice(), &dev)?.to_dtype(DType::F64)
        };
        let target = noisy(1, 440.0)?;
        let x = candle_core::Var::from_tensor(&(noisy(7, 470.0)? * 0.7)?)?;
        let grads = s.loss(x.as_tensor(), &target)?.backward()?;
        let g = grads.get(x.as_tensor()).expect("a gradient").clone();
        // Along the gradient the loss changes at |g|² per unit step.
        let eps = 1e-8 / g.sqr()?.sum_all()?.sqrt()?.to_scalar::<f64>()?;
        let at = |d: f64| -> Result<f64> {
            s.loss(&(x.as_tensor() + (&g * d)?)?, &target)?
                .to_scalar::<f64>()
        };
        let fd = (at(eps)? - at(-eps)?) / (2.0 * eps);
        let want = g.sqr()?.sum_all()?.to_scalar::<f64>()?;
        assert!(
            (fd - want).abs() <= 1e-3 * want,
            "directional {fd} vs |g|² {want}"
        );
        Ok(())
    }
}
