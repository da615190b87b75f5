//! WAV files, streamed to a temporary file beside the target and renamed into place when
//! complete, so a failed or interrupted run never leaves half a file.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

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

/// A mono WAV being written.
pub struct WavSink {
    writer: hound::WavWriter<BufWriter<File>>,
    tmp: tempfile::TempPath,
    path: PathBuf,
    format: WavFormat,
}

impl WavSink {
    pub fn create(path: &Path, rate: u32, format: WavFormat) -> Result<Self> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let tmp = tempfile::Builder::new()
            .prefix(".voxtrald-")
            .suffix(".wav.part")
            .tempfile_in(dir)
            .map_err(|e| Error::io(dir, e))?;
        let (file, tmp) = tmp.into_parts();
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
        let writer = hound::WavWriter::new(BufWriter::new(file), spec)
            .map_err(|e| Error::io(path, std::io::Error::other(e)))?;
        Ok(Self {
            writer,
            tmp,
            path: path.into(),
            format,
        })
    }

    pub fn write(&mut self, samples: &[f32]) -> Result<()> {
        for &s in samples {
            match self.format {
                WavFormat::Pcm16 => self.writer.write_sample(to_i16(s)),
                WavFormat::Float32 => self.writer.write_sample(s),
            }
            .map_err(|e| Error::io(&self.path, std::io::Error::other(e)))?;
        }
        Ok(())
    }

    /// Completes the file and moves it into place.
    pub fn finish(self) -> Result<()> {
        let path = self.path;
        self.writer
            .finalize()
            .map_err(|e| Error::io(&path, std::io::Error::other(e)))?;
        crate::atomic::publish(&self.tmp)?;
        self.tmp
            .persist(&path)
            .map_err(|e| Error::io(&path, e.error))?;
        Ok(())
    }
}

/// Writes mono `samples` at `rate` to `path` atomically.
pub fn write_wav(path: &Path, samples: &[f32], rate: u32, format: WavFormat) -> Result<()> {
    let mut sink = WavSink::create(path, rate, format)?;
    sink.write(samples)?;
    sink.finish()
}
