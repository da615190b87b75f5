//! Streamed audio encodings for clients that want a file format: each encoder takes the
//! model's samples as they come and hands back bytes that can be sent at once; `finish` gives
//! the rest, so the last frame is never lost.
//!
//! The encoders, chosen for licence (Apache-2.0 compatible), a build with no C library, and
//! streaming: MP3 by `rusty_mp3` (pure Rust, Apache-2.0; CBR 64 kbps mono, MPEG-2 Layer III at
//! 24 kHz, bit reservoir off at that rate, so every frame is complete when handed out), FLAC by
//! `flacenc` (pure Rust, Apache-2.0; 16-bit, fixed 4096-sample blocks, STREAMINFO with the
//! length unknown), WAV with 0xFFFFFFFF sizes, and bare 16-bit PCM.

use flacenc::component::BitRepr;
use flacenc::error::Verify;
use flacenc::source::{Fill, FrameBuf};

use super::pcm::{s16le, to_i16};
use super::wav::streaming_header;
use crate::error::{Error, Result};

/// The formats the interfaces can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Mp3,
    Flac,
    Wav,
    /// Bare 16-bit little-endian mono.
    Pcm,
}

impl Encoding {
    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Mp3 => "audio/mpeg",
            Encoding::Flac => "audio/flac",
            Encoding::Wav => "audio/wav",
            Encoding::Pcm => "audio/pcm",
        }
    }

    pub fn encoder(self, sample_rate: u32) -> Result<Box<dyn Encoder>> {
        Ok(match self {
            Encoding::Mp3 => Box::new(Mp3::new(sample_rate)),
            Encoding::Flac => Box::new(Flac::new(sample_rate)?),
            Encoding::Wav => Box::new(Wav {
                header: Some(streaming_header(sample_rate)),
            }),
            Encoding::Pcm => Box::new(Pcm),
        })
    }
}

/// A streamed encoding of mono audio.
pub trait Encoder: Send {
    /// Bytes for these samples, as far as they can be sent now (maybe none).
    fn push(&mut self, samples: &[f32]) -> Result<Vec<u8>>;
    /// Everything still held, at the end of the audio.
    fn finish(&mut self) -> Result<Vec<u8>>;
}

struct Pcm;

impl Encoder for Pcm {
    fn push(&mut self, samples: &[f32]) -> Result<Vec<u8>> {
        Ok(s16le(samples))
    }
    fn finish(&mut self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
}

struct Wav {
    /// Sent before the first samples.
    header: Option<Vec<u8>>,
}

impl Encoder for Wav {
    fn push(&mut self, samples: &[f32]) -> Result<Vec<u8>> {
        let mut out = self.header.take().unwrap_or_default();
        out.extend(s16le(samples));
        Ok(out)
    }
    fn finish(&mut self) -> Result<Vec<u8>> {
        Ok(self.header.take().unwrap_or_default())
    }
}

struct Mp3 {
    inner: rusty_mp3::Mp3Encoder,
    sample_rate: u32,
    /// Packets handed out; the first is the encoder's Info-tag placeholder, whose counts are
    /// only known at the end: a stream leaves it out (decoders need none).
    packets: u64,
    pushed: bool,
}

impl Mp3 {
    fn new(sample_rate: u32) -> Self {
        Self {
            inner: rusty_mp3::Mp3Encoder::new(rusty_mp3::Mp3EncoderConfig {
                bitrate_kbps: 64,
                vbr_quality: None,
            }),
            sample_rate,
            packets: 0,
            pushed: false,
        }
    }

    fn drain(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        while let Ok(p) = self.inner.next_packet() {
            self.packets += 1;
            if self.packets > 1 {
                out.extend_from_slice(&p);
            }
        }
        out
    }
}

fn mp3_error(e: impl std::fmt::Display) -> Error {
    Error::Audio(format!("MP3 encoder: {e}"))
}

impl Encoder for Mp3 {
    fn push(&mut self, samples: &[f32]) -> Result<Vec<u8>> {
        self.pushed = true;
        self.inner
            .push_pcm_f32(samples, 1, self.sample_rate)
            .map_err(mp3_error)?;
        Ok(self.drain())
    }
    fn finish(&mut self) -> Result<Vec<u8>> {
        if !self.pushed {
            // The format is fixed by the first samples; an empty stream still decodes.
            self.push(&[])?;
        }
        self.inner.finish();
        Ok(self.drain())
    }
}

/// FLAC block length (samples): 170 ms at 24 kHz.
const FLAC_BLOCK: usize = 4096;
/// The shortest block flacenc writes; a shorter tail is padded with silence.
const FLAC_MIN_BLOCK: usize = 16;

struct Flac {
    config: flacenc::error::Verified<flacenc::config::Encoder>,
    info: flacenc::component::StreamInfo,
    pending: Vec<i32>,
    frames: usize,
    /// "fLaC" and STREAMINFO, sent before the first frame.
    header: Option<Vec<u8>>,
}

fn flac_error(e: impl std::fmt::Debug) -> Error {
    Error::Audio(format!("FLAC encoder: {e:?}"))
}

impl Flac {
    fn new(sample_rate: u32) -> Result<Self> {
        let config = flacenc::config::Encoder::default()
            .into_verified()
            .map_err(|(_, e)| flac_error(e))?;
        let mut stream =
            flacenc::component::Stream::new(sample_rate as usize, 1, 16).map_err(flac_error)?;
        // Block sizes are promised; the length, frame sizes and MD5 stay "unknown" (zero), as
        // the format allows for a stream.
        stream
            .stream_info_mut()
            .set_block_sizes(FLAC_MIN_BLOCK, FLAC_BLOCK)
            .map_err(flac_error)?;
        let info = stream.stream_info().clone();
        let mut sink = flacenc::bitsink::ByteSink::new();
        stream.write(&mut sink).map_err(flac_error)?;
        Ok(Self {
            config,
            info,
            pending: Vec::with_capacity(FLAC_BLOCK),
            frames: 0,
            header: Some(sink.as_slice().to_vec()),
        })
    }

    fn frame(&mut self, samples: &[i32], out: &mut Vec<u8>) -> Result<()> {
        let mut fb = FrameBuf::with_size(1, samples.len()).map_err(flac_error)?;
        fb.fill_interleaved(samples).map_err(flac_error)?;
        let frame = flacenc::encode_fixed_size_frame(&self.config, &fb, self.frames, &self.info)
            .map_err(flac_error)?;
        self.frames += 1;
        let mut sink = flacenc::bitsink::ByteSink::new();
        frame.write(&mut sink).map_err(flac_error)?;
        out.extend_from_slice(sink.as_slice());
        Ok(())
    }
}

impl Encoder for Flac {
    fn push(&mut self, samples: &[f32]) -> Result<Vec<u8>> {
        let mut out = self.header.take().unwrap_or_default();
        self.pending
            .extend(samples.iter().map(|&s| i32::from(to_i16(s))));
        while self.pending.len() >= FLAC_BLOCK {
            let block: Vec<i32> = self.pending.drain(..FLAC_BLOCK).collect();
            self.frame(&block, &mut out)?;
        }
        Ok(out)
    }
    fn finish(&mut self) -> Result<Vec<u8>> {
        let mut out = self.header.take().unwrap_or_default();
        if !self.pending.is_empty() {
            let mut tail = std::mem::take(&mut self.pending);
            tail.resize(tail.len().max(FLAC_MIN_BLOCK), 0);
            self.frame(&tail, &mut out)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(e: Encoding, chunks: &[Vec<f32>]) -> Vec<u8> {
        let mut enc = e.encoder(24000).unwrap();
        let mut out = Vec::new();
        for c in chunks {
            out.extend(enc.push(c).unwrap());
        }
        out.extend(enc.finish().unwrap());
        out
    }

    fn tone(n: usize) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.05).sin() * 0.4).collect()
    }

    #[test]
    fn mp3_decodes_back_to_the_whole_signal() {
        let chunks: Vec<Vec<f32>> = (0..7).map(|_| tone(3000)).collect();
        let bytes = encode(Encoding::Mp3, &chunks);
        assert_eq!(bytes[0], 0xff, "starts at a frame sync");
        let decoded: usize = rusty_mp3::decode_pipelined(&bytes)
            .iter()
            .map(|f| f.samples.len() / f.channels.max(1) as usize)
            .sum();
        // Every input sample is in there, plus the codec's delay and padding.
        assert!((21000..21000 + 3 * 1152).contains(&decoded), "{decoded}");
    }

    #[test]
    fn flac_and_wav_frame_the_stream() {
        let chunks: Vec<Vec<f32>> = (0..5).map(|_| tone(1000)).collect();
        let flac = encode(Encoding::Flac, &chunks);
        assert_eq!(&flac[..4], b"fLaC");
        // Two frames: one full block and the 904-sample tail.
        let syncs = flac
            .windows(2)
            .filter(|w| w[0] == 0xff && w[1] == 0xf8)
            .count();
        assert!(syncs >= 2, "{syncs}");
        let wav = encode(Encoding::Wav, &chunks);
        assert_eq!(&wav[..4], b"RIFF");
        assert_eq!(&wav[4..8], &[0xff; 4]);
        assert_eq!(wav.len(), 44 + 5000 * 2);
        assert_eq!(
            encode(Encoding::Wav, &[]).len(),
            44,
            "a header even without audio"
        );
        assert_eq!(encode(Encoding::Pcm, &chunks).len(), 10000);
    }
}
