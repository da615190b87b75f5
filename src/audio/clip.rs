//! A reference clip for cloning, made ready for the search: read (WAV or FLAC), mixed to
//! mono, resampled to the codec's 24 kHz, silence trimmed from both ends, loudness
//! normalised, and cut to 3 to 30 seconds. What was kept is reported, not silently chosen.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::resample::StreamResampler;
use crate::error::{Error, Result};

pub const MIN_SECONDS: f32 = 3.0;
pub const MAX_SECONDS: f32 = 30.0;
/// A loudness target (RMS of the speech, dBFS): ordinary speech level, clear of clipping.
pub const TARGET_DBFS: f32 = -20.0;
/// Samples whose 20 ms window is this far below the clip's loudest window are silence.
const SILENCE_BELOW_DB: f32 = 40.0;
/// Kept on each side of the speech, so onsets and decays survive the trim.
const MARGIN_SECONDS: f32 = 0.1;

/// How a clip is prepared.
#[derive(Debug, Clone, Copy)]
pub struct ClipOptions {
    pub rate: u32,
    /// Bring the RMS to this level (dBFS); `None` keeps the recording's own. The clip is a
    /// search target in f32, not played, so the peak may go past full scale.
    pub level_dbfs: Option<f32>,
    pub trim: bool,
}

#[derive(Debug, Clone)]
pub struct Clip {
    /// Mono at `ClipOptions::rate`.
    pub samples: Vec<f32>,
    /// SHA-256 of the file as read, hex.
    pub sha256: String,
    pub original_seconds: f32,
    /// Where the kept part starts in the original, seconds.
    pub kept_from: f32,
    pub kept_seconds: f32,
    /// Gain applied, dB.
    pub gain_db: f32,
}

/// Reads and prepares a clip; a clip with less than [`MIN_SECONDS`] of sound is an error.
pub fn read_clip(path: &Path, opts: ClipOptions) -> Result<Clip> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |reason: String| Error::InvalidInput(format!("{}: {reason}", path.display()));
    let (channels, rate) = decode(&bytes).map_err(bad)?;
    let mono = mix(&channels);
    let original_seconds = mono.len() as f32 / rate as f32;
    let mut samples = if rate == opts.rate {
        mono
    } else {
        let mut r = StreamResampler::new(rate, opts.rate)?;
        let mut out = Vec::new();
        r.push(&mono, &mut out)?;
        r.finish(&mut out)?;
        out
    };
    let (start, end) = if opts.trim {
        speech_span(&samples, opts.rate)
    } else {
        (0, samples.len())
    };
    let max = (MAX_SECONDS * opts.rate as f32) as usize;
    let end = end.min(start + max);
    samples = samples[start..end].to_vec();
    let kept_seconds = samples.len() as f32 / opts.rate as f32;
    if kept_seconds < MIN_SECONDS {
        return Err(bad(format!(
            "{kept_seconds:.1} s of sound after trimming silence; a voice needs at least \
             {MIN_SECONDS} s (10 to 30 s is better)"
        )));
    }
    let mut gain_db = 0.0;
    if let Some(level) = opts.level_dbfs {
        let rms = (samples.iter().map(|x| x * x).sum::<f32>() / samples.len() as f32).sqrt();
        if rms > 0.0 {
            let g = 10f32.powf(level / 20.0) / rms;
            samples.iter_mut().for_each(|x| *x *= g);
            gain_db = 20.0 * g.log10();
        }
    }
    Ok(Clip {
        samples,
        sha256: hex(&Sha256::digest(&bytes)),
        original_seconds,
        kept_from: start as f32 / opts.rate as f32,
        kept_seconds,
        gain_db,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Channels of samples in -1..1 and the sample rate.
fn decode(bytes: &[u8]) -> std::result::Result<(Vec<Vec<f32>>, u32), String> {
    if bytes.starts_with(b"fLaC") {
        return decode_flac(bytes);
    }
    if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WAVE" {
        return decode_wav(bytes);
    }
    Err("not a WAV or FLAC file (convert other formats first, e.g. \
         `ffmpeg -i clip.mp3 clip.wav`)"
        .into())
}

fn decode_wav(bytes: &[u8]) -> std::result::Result<(Vec<Vec<f32>>, u32), String> {
    let mut r =
        hound::WavReader::new(std::io::Cursor::new(bytes)).map_err(|e| format!("WAV: {e}"))?;
    let spec = r.spec();
    let n = spec.channels.max(1) as usize;
    if spec.sample_rate == 0 {
        return Err("WAV: sample rate 0".into());
    }
    let flat: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => r
            .samples::<f32>()
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| format!("WAV: {e}"))?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            r.samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| format!("WAV: {e}"))?
        }
    };
    Ok((deinterleave(&flat, n), spec.sample_rate))
}

fn decode_flac(bytes: &[u8]) -> std::result::Result<(Vec<Vec<f32>>, u32), String> {
    let mut r =
        claxon::FlacReader::new(std::io::Cursor::new(bytes)).map_err(|e| format!("FLAC: {e}"))?;
    let info = r.streaminfo();
    let n = info.channels.max(1) as usize;
    if info.sample_rate == 0 {
        return Err("FLAC: sample rate 0".into());
    }
    let scale = 1.0 / (1u64 << (info.bits_per_sample.clamp(1, 32) - 1)) as f32;
    let flat: Vec<f32> = r
        .samples()
        .map(|s| s.map(|v| v as f32 * scale))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("FLAC: {e}"))?;
    Ok((deinterleave(&flat, n), info.sample_rate))
}

fn deinterleave(flat: &[f32], n: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|c| flat.iter().skip(c).step_by(n).copied().collect())
        .collect()
}

fn mix(channels: &[Vec<f32>]) -> Vec<f32> {
    let len = channels.iter().map(Vec::len).min().unwrap_or(0);
    let k = 1.0 / channels.len().max(1) as f32;
    (0..len)
        .map(|i| channels.iter().map(|c| c[i]).sum::<f32>() * k)
        .collect()
}

/// The span from the first to the last 20 ms window within [`SILENCE_BELOW_DB`] of the
/// loudest, widened by [`MARGIN_SECONDS`]. An all-silent clip gives an empty span.
fn speech_span(x: &[f32], rate: u32) -> (usize, usize) {
    let win = (rate as usize / 50).max(1);
    let energy: Vec<f32> = x
        .chunks(win)
        .map(|w| w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32)
        .collect();
    let loudest = energy.iter().fold(0f32, |m, &e| m.max(e));
    if loudest <= 0.0 {
        return (0, 0);
    }
    let floor = loudest * 10f32.powf(-SILENCE_BELOW_DB / 10.0);
    let first = energy.iter().position(|&e| e > floor).unwrap_or(0);
    let last = energy.iter().rposition(|&e| e > floor).unwrap_or(0);
    let margin = (MARGIN_SECONDS * rate as f32) as usize;
    let start = (first * win).saturating_sub(margin);
    let end = ((last + 1) * win + margin).min(x.len());
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_wav(path: &Path, rate: u32, channels: u16, frames: &[Vec<f32>]) {
        let spec = hound::WavSpec {
            channels,
            sample_rate: rate,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut w = hound::WavWriter::create(path, spec).unwrap();
        for i in 0..frames[0].len() {
            for c in frames {
                w.write_sample((c[i] * 32767.0) as i16).unwrap();
            }
        }
        w.finalize().unwrap();
    }

    fn tone(n: usize, rate: u32, amp: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (i as f32 * 440.0 * std::f32::consts::TAU / rate as f32).sin() * amp)
            .collect()
    }

    const OPTS: ClipOptions = ClipOptions {
        rate: 24_000,
        level_dbfs: Some(TARGET_DBFS),
        trim: true,
    };

    #[test]
    fn stereo_44k_with_silence_is_mixed_resampled_trimmed_and_normalised() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("c.wav");
        let rate = 44_100;
        let mut ch = vec![0f32; rate as usize]; // 1 s of silence
        ch.extend(tone(4 * rate as usize, rate, 0.02)); // 4 s of a quiet tone
        ch.extend(vec![0f32; 2 * rate as usize]); // 2 s of silence
        write_wav(&p, rate, 2, &[ch.clone(), ch]);
        let c = read_clip(&p, OPTS).unwrap();
        assert!(
            (c.original_seconds - 7.0).abs() < 0.01,
            "{}",
            c.original_seconds
        );
        assert!(
            (c.kept_seconds - 4.2).abs() < 0.05,
            "kept {}",
            c.kept_seconds
        );
        assert!((c.kept_from - 0.9).abs() < 0.03, "from {}", c.kept_from);
        let mid = &c.samples[24_000..48_000];
        let rms = (mid.iter().map(|x| x * x).sum::<f32>() / mid.len() as f32).sqrt();
        assert!((20.0 * rms.log10() - TARGET_DBFS).abs() < 0.5, "rms {rms}");
        assert!(c.gain_db > 10.0);
        assert_eq!(c.sha256.len(), 64);
    }

    #[test]
    fn short_long_and_foreign_clips() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("short.wav");
        write_wav(&p, 24_000, 1, &[tone(48_000, 24_000, 0.3)]);
        let e = read_clip(&p, OPTS).unwrap_err().to_string();
        assert!(e.contains("at least 3 s"), "{e}");
        let p = tmp.path().join("long.wav");
        write_wav(&p, 16_000, 1, &[tone(16_000 * 40, 16_000, 0.3)]);
        let c = read_clip(&p, OPTS).unwrap();
        assert!((c.kept_seconds - MAX_SECONDS).abs() < 0.01);
        let p = tmp.path().join("x.mp3");
        std::fs::write(&p, b"ID3\x03junk").unwrap();
        let e = read_clip(&p, OPTS).unwrap_err().to_string();
        assert!(e.contains("not a WAV or FLAC"), "{e}");
        std::fs::write(&p, b"RIFF\0\0\0\0WAVEjunk").unwrap();
        assert!(read_clip(&p, OPTS).is_err());
    }
}
