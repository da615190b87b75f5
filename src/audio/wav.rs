//! WAV files, streamed to a temporary file beside the target and renamed into place when
//! complete, so a failed or interrupted run never leaves half a file.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use super::pcm::to_i16;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum WavFormat {
    /// 16-bit signed PCM.
    #[default]
    Pcm16,
    /// 32-bit float.
    Float32,
}

/// The 44-byte header of a 16-bit mono WAV stream of unknown length: the RIFF and data sizes
/// are 0xFFFFFFFF ("as long as it goes"), which players and decoders read as a stream.
pub fn streaming_header(sample_rate: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // PCM
    h.extend_from_slice(&1u16.to_le_bytes()); // mono
    h.extend_from_slice(&sample_rate.to_le_bytes());
    h.extend_from_slice(&(sample_rate * 2).to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    h
}

/// A mono WAV being written.
pub struct WavSink {
    writer: hound::WavWriter<BufWriter<File>>,
    /// The same file, to sync it before the rename (the writer keeps its own handle).
    synced: File,
    tmp: tempfile::TempPath,
    path: PathBuf,
    format: WavFormat,
}

impl WavSink {
    pub fn create(path: &Path, sample_rate: u32, format: WavFormat) -> Result<Self> {
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
        let synced = file.try_clone().map_err(|e| Error::io(path, e))?;
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate,
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
            synced,
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
        self.synced.sync_all().map_err(|e| Error::io(&path, e))?;
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
