//! WAV files, always written through a temporary file and renamed into place.

use std::path::Path;

use crate::error::Result;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WavFormat {
    /// 16-bit signed PCM.
    #[default]
    Pcm16,
    /// 32-bit float.
    Float32,
}

/// Float sample to 16-bit PCM, clipped to [-1, 1].
pub fn to_i16(s: f32) -> i16 {
    let s = if s.is_nan() { 0.0 } else { s.clamp(-1.0, 1.0) };
    (s * i16::MAX as f32).round() as i16
}

/// Writes mono `samples` at `rate` to `path` atomically.
pub fn write_wav(path: &Path, samples: &[f32], rate: u32, format: WavFormat) -> Result<()> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: if format == WavFormat::Pcm16 { 16 } else { 32 },
        sample_format: if format == WavFormat::Pcm16 {
            hound::SampleFormat::Int
        } else {
            hound::SampleFormat::Float
        },
    };
    crate::atomic::write_atomic(path, |w| {
        let mut wr = hound::WavWriter::new(w, spec).map_err(std::io::Error::other)?;
        for &s in samples {
            match format {
                WavFormat::Pcm16 => wr.write_sample(to_i16(s)),
                WavFormat::Float32 => wr.write_sample(s),
            }
            .map_err(std::io::Error::other)?;
        }
        wr.finalize().map_err(std::io::Error::other)
    })
}
