//! Streamed audio encodings for clients that want a file format: each encoder takes the
//! model's samples as they come and hands back bytes that can be sent at once; `finish` gives
//! the rest, so the last frame is never lost.
//!
//! The encoders, chosen for licence (Apache-2.0 compatible), a build with no C library, and
//! streaming: MP3 by `rusty_mp3` (pure Rust, Apache-2.0; CBR 64 kbps mono, MPEG-2 Layer III at
//! 24 kHz, bit reservoir off at that rate, so every frame is complete when handed out), FLAC by
//! `flacenc` (pure Rust, Apache-2.0; 16-bit, fixed 4096-sample blocks, STREAMINFO with the
//! length unknown), Ogg Opus by libopus through the `opus` crate (BSD-3 library, MIT/Apache
//! bindings; 32 kbps VBR speech mode, 20 ms packets, one Ogg page per pushed chunk so nothing
//! waits for a page to fill; behind the `opus` feature, as it needs Debian's libopus-dev), WAV
//! with 0xFFFFFFFF sizes, and bare 16-bit PCM. AAC has no encoder under a fitting licence.

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
    /// Ogg Opus (RFC 7845).
    Opus,
}

impl Encoding {
    /// The API's name of the format.
    pub fn name(self) -> &'static str {
        match self {
            Encoding::Mp3 => "mp3",
            Encoding::Flac => "flac",
            Encoding::Wav => "wav",
            Encoding::Pcm => "pcm",
            Encoding::Opus => "opus",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Mp3 => "audio/mpeg",
            Encoding::Flac => "audio/flac",
            Encoding::Wav => "audio/wav",
            Encoding::Pcm => "audio/pcm",
            Encoding::Opus => "audio/ogg",
        }
    }

    pub fn encoder(self, sample_rate: u32) -> Result<Box<dyn Encoder>> {
        Ok(match self {
            Encoding::Mp3 => Box::new(Mp3::new(sample_rate)),
            #[cfg(feature = "opus")]
            Encoding::Opus => Box::new(ogg_opus::OggOpus::new(sample_rate)?),
            #[cfg(not(feature = "opus"))]
            Encoding::Opus => {
                return Err(Error::Audio(
                    "this voxtrald was built without Opus (the `opus` feature)".into(),
                ))
            }
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

/// Whether this build can encode `e`.
pub fn available(e: Encoding) -> bool {
    e != Encoding::Opus || cfg!(feature = "opus")
}

#[cfg(feature = "opus")]
mod ogg_opus {
    use ogg::writing::{PacketWriteEndInfo, PacketWriter};

    use super::Encoder;
    use crate::error::{Error, Result};

    /// 20 ms at 24 kHz.
    const PACKET: usize = 480;
    /// Ogg Opus counts granules at 48 kHz whatever the input rate.
    const GRANULE_PER_SAMPLE: u64 = 2;
    const SERIAL: u32 = 0x766f_7874;

    fn opus_error(e: impl std::fmt::Display) -> Error {
        Error::Audio(format!("Opus encoder: {e}"))
    }

    pub struct OggOpus {
        enc: opus::Encoder,
        pages: PacketWriter<'static, Vec<u8>>,
        pending: Vec<f32>,
        /// Samples encoded, at the input rate.
        encoded: u64,
        pre_skip: u64,
    }

    impl OggOpus {
        pub fn new(sample_rate: u32) -> Result<Self> {
            if sample_rate != 24000 {
                return Err(opus_error(format!("{sample_rate} Hz is not 24 kHz")));
            }
            let mut enc =
                opus::Encoder::new(sample_rate, opus::Channels::Mono, opus::Application::Voip)
                    .map_err(opus_error)?;
            enc.set_bitrate(opus::Bitrate::Bits(32_000))
                .map_err(opus_error)?;
            let lookahead = enc.get_lookahead().map_err(opus_error)? as u64;
            let pre_skip = lookahead * GRANULE_PER_SAMPLE;
            let mut pages = PacketWriter::new(Vec::new());
            // OpusHead and OpusTags, each on a page of its own (RFC 7845 section 5).
            let mut head = b"OpusHead".to_vec();
            head.push(1);
            head.push(1);
            head.extend_from_slice(&(pre_skip as u16).to_le_bytes());
            head.extend_from_slice(&sample_rate.to_le_bytes());
            head.extend_from_slice(&0i16.to_le_bytes());
            head.push(0);
            pages
                .write_packet(head, SERIAL, PacketWriteEndInfo::EndPage, 0)
                .map_err(opus_error)?;
            let vendor = concat!("voxtrald ", env!("CARGO_PKG_VERSION"));
            let mut tags = b"OpusTags".to_vec();
            tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
            tags.extend_from_slice(vendor.as_bytes());
            tags.extend_from_slice(&0u32.to_le_bytes());
            pages
                .write_packet(tags, SERIAL, PacketWriteEndInfo::EndPage, 0)
                .map_err(opus_error)?;
            Ok(Self {
                enc,
                pages,
                pending: Vec::new(),
                encoded: 0,
                pre_skip,
            })
        }

        /// Encodes whole packets from `pending`; the last one ends a page (or the stream),
        /// whose granule position counts the real samples only.
        fn packets(&mut self, end: PacketWriteEndInfo, real: u64) -> Result<Vec<u8>> {
            let n = self.pending.len() / PACKET;
            let mut buf = vec![0u8; 4000];
            for i in 0..n {
                let pcm = &self.pending[i * PACKET..(i + 1) * PACKET];
                let len = self.enc.encode_float(pcm, &mut buf).map_err(opus_error)?;
                self.encoded += PACKET as u64;
                let last = i + 1 == n;
                let info = if last {
                    end
                } else {
                    PacketWriteEndInfo::NormalPacket
                };
                let granule = self.pre_skip + self.encoded.min(real) * GRANULE_PER_SAMPLE;
                self.pages
                    .write_packet(buf[..len].to_vec(), SERIAL, info, granule)
                    .map_err(opus_error)?;
            }
            self.pending.drain(..n * PACKET);
            Ok(std::mem::take(self.pages.inner_mut()))
        }
    }

    impl Encoder for OggOpus {
        fn push(&mut self, samples: &[f32]) -> Result<Vec<u8>> {
            self.pending.extend_from_slice(samples);
            self.packets(PacketWriteEndInfo::EndPage, u64::MAX)
        }

        fn finish(&mut self) -> Result<Vec<u8>> {
            let real = self.encoded + self.pending.len() as u64;
            // The tail and the encoder's lookahead, padded to whole packets, so the last real
            // sample comes out of a decoder too; the granule position trims the padding.
            let lookahead = self.pre_skip / GRANULE_PER_SAMPLE;
            let target = (real + lookahead).div_ceil(PACKET as u64) * PACKET as u64;
            self.pending
                .resize((target - self.encoded).max(PACKET as u64) as usize, 0.0);
            self.packets(PacketWriteEndInfo::EndStream, real)
        }
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

    #[cfg(feature = "opus")]
    #[test]
    fn ogg_opus_pages_decode_to_the_whole_signal() {
        let chunks: Vec<Vec<f32>> = (0..5).map(|_| tone(3001)).collect();
        let bytes = encode(Encoding::Opus, &chunks);
        assert_eq!(&bytes[..4], b"OggS");
        let mut reader = ogg::reading::PacketReader::new(std::io::Cursor::new(bytes));
        let head = reader.read_packet_expected().unwrap();
        assert_eq!(&head.data[..8], b"OpusHead");
        let pre_skip = u16::from_le_bytes([head.data[10], head.data[11]]) as usize;
        let tags = reader.read_packet_expected().unwrap();
        assert_eq!(&tags.data[..8], b"OpusTags");
        let mut dec = opus::Decoder::new(24000, opus::Channels::Mono).unwrap();
        let mut decoded = Vec::new();
        let mut last_granule = 0;
        let mut ended = false;
        while let Some(p) = reader.read_packet().unwrap() {
            let mut buf = vec![0f32; 5760];
            let n = dec.decode_float(&p.data, &mut buf, false).unwrap();
            decoded.extend_from_slice(&buf[..n]);
            last_granule = p.absgp_page();
            ended = p.last_in_stream();
        }
        assert!(ended, "the last packet ends the stream");
        // The granule position (48 kHz) counts exactly the real samples after the pre-skip.
        assert_eq!(last_granule as usize, pre_skip + 2 * 15005);
        let skip = pre_skip / 2;
        assert!(decoded.len() >= skip + 15005, "{}", decoded.len());
        // Lossy, but the tone is there and in place: correlation with the input over the whole
        // length, best within a millisecond of where the pre-skip puts it (the speech mode's
        // high-pass filter shifts a 190 Hz tone's phase by about 10 samples).
        let input: Vec<f32> = chunks.concat();
        let corr = |lag: usize| {
            let out = &decoded[skip - 24 + lag..][..input.len()];
            let dot: f32 = input.iter().zip(out).map(|(a, b)| a * b).sum();
            let norm = (input.iter().map(|a| a * a).sum::<f32>()
                * out.iter().map(|b| b * b).sum::<f32>())
            .sqrt();
            dot / norm
        };
        let best = (0..48).map(corr).fold(0f32, f32::max);
        assert!(best > 0.95, "correlation {best}");
    }
}
