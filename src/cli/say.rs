//! `voxtrald say`: text to a WAV file.

use std::io::Read;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

use super::ModelArgs;
use crate::audio::wav::{write_wav, WavFormat};
use crate::model::noise::SeededNoise;
use crate::model::stream::{ChunkSchedule, StreamingDecoder};
use crate::model::{GenerateOptions, StopReason, DEFAULT_CFG_ALPHA, DEFAULT_MAX_FRAMES};

/// Largest text accepted in one request.
pub const MAX_TEXT_BYTES: usize = 1 << 20;

#[derive(Args)]
pub struct SayArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Preset voice (see `voxtrald voices`).
    #[arg(long, default_value = "casual_male")]
    voice: String,
    /// Output WAV file (24 kHz mono).
    #[arg(long, short)]
    out: PathBuf,
    /// Sample format of the WAV file.
    #[arg(long, value_enum, default_value = "pcm16")]
    format: WavFormat,
    /// Seed of the flow-matching noise (same seed, same text: same audio).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop after this many 80 ms frames.
    #[arg(long, default_value_t = DEFAULT_MAX_FRAMES)]
    max_frames: usize,
    /// Classifier-free guidance strength.
    #[arg(long, default_value_t = DEFAULT_CFG_ALPHA)]
    cfg_alpha: f32,
    /// The text; read from stdin when absent or `-`.
    text: Option<String>,
}

/// Text from the argument or stdin; stdin must be UTF-8 and at most [`MAX_TEXT_BYTES`].
pub fn read_text(arg: Option<String>) -> anyhow::Result<String> {
    let text = match arg {
        Some(t) if t != "-" => t,
        _ => {
            let mut buf = Vec::new();
            std::io::stdin()
                .take(MAX_TEXT_BYTES as u64 + 1)
                .read_to_end(&mut buf)
                .context("reading text from stdin")?;
            String::from_utf8(buf).map_err(|e| {
                anyhow::anyhow!(
                    "the text on stdin is not valid UTF-8 (at byte {})",
                    e.utf8_error().valid_up_to()
                )
            })?
        }
    };
    if text.len() > MAX_TEXT_BYTES {
        bail!("the text is larger than {MAX_TEXT_BYTES} bytes");
    }
    if text.trim().is_empty() {
        bail!(crate::Error::EmptyText);
    }
    Ok(text)
}

pub fn run(a: SayArgs) -> anyhow::Result<()> {
    let text = read_text(a.text)?;
    let model = a.model.load()?;
    let start = Instant::now();
    let prompt = model.prompt(&a.voice, &text)?;
    let opts = GenerateOptions {
        max_frames: a.max_frames,
        cfg_alpha: a.cfg_alpha,
    };
    let mut gen = model.start(&prompt, Box::new(SeededNoise::new(a.seed)), &opts)?;
    let mut dec = StreamingDecoder::new(ChunkSchedule::default());
    let mut samples = Vec::new();
    while let Some(frame) = gen.next_frame()? {
        if let Some(chunk) = dec.push(model.codec(), frame.codes)? {
            samples.extend(chunk);
        }
    }
    samples.extend(dec.flush(model.codec())?);
    let elapsed = start.elapsed().as_secs_f64();
    write_wav(&a.out, &samples, model.sample_rate(), a.format)?;
    let secs = samples.len() as f64 / model.sample_rate() as f64;
    if gen.stop_reason() == Some(StopReason::ContextLimit) {
        tracing::warn!(
            "stopped at the context limit of {} positions",
            gen.positions()
        );
    }
    println!(
        "{}: {} frames, {:.2} s of audio in {:.2} s (real-time factor {:.3})",
        a.out.display(),
        gen.frames(),
        secs,
        elapsed,
        elapsed / secs.max(1e-9)
    );
    Ok(())
}
