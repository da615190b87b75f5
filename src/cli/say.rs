//! `voxtrald say`: text to the speakers, a WAV file, or raw PCM on stdout.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;

use super::ModelArgs;
use crate::audio::playback::Player;
use crate::audio::wav::{to_i16, WavFormat, WavSink};
use crate::engine::{Destination, Engine, EngineConfig, Event, Priority, SpeechRequest};
use crate::model::{DEFAULT_CFG_ALPHA, DEFAULT_MAX_FRAMES};

/// Largest text accepted in one request.
pub const MAX_TEXT_BYTES: usize = 1 << 20;

#[derive(Args)]
pub struct SayArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Preset voice (see `voxtrald voices`).
    #[arg(long, default_value = "casual_male")]
    voice: String,
    /// Write a WAV file (24 kHz mono) instead of playing; `-` writes raw s16le to stdout.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Sample format of the WAV file.
    #[arg(long, value_enum, default_value = "pcm16")]
    format: WavFormat,
    /// Seed of the flow-matching noise (same seed, same text: same audio).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop each sentence after this many 80 ms frames.
    #[arg(long, default_value_t = DEFAULT_MAX_FRAMES)]
    max_frames: usize,
    /// Speaking rate, 0.5 to 4.0, pitch kept (default 1.0, or the daemon's configured rate).
    #[arg(long)]
    rate: Option<f32>,
    /// Pitch as a frequency ratio, 0.5 to 2.0, duration kept (1.5 is a fifth higher).
    #[arg(long, default_value_t = 1.0)]
    pitch: f32,
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

/// Where the audio goes.
enum Sink {
    Wav(WavSink),
    Raw(std::io::Stdout),
    Play(Box<Player>),
}

impl Sink {
    fn write(&mut self, samples: &[f32]) -> anyhow::Result<()> {
        match self {
            Sink::Wav(w) => w.write(samples)?,
            Sink::Raw(out) => {
                let bytes: Vec<u8> = samples
                    .iter()
                    .flat_map(|&s| to_i16(s).to_le_bytes())
                    .collect();
                out.lock().write_all(&bytes).context("writing to stdout")?;
            }
            Sink::Play(p) => p.write(samples)?,
        }
        Ok(())
    }

    fn finish(self) -> anyhow::Result<()> {
        match self {
            Sink::Wav(w) => w.finish()?,
            Sink::Raw(out) => out.lock().flush()?,
            Sink::Play(p) => p.finish()?,
        }
        Ok(())
    }
}

/// Speaks through the running daemon: it plays, or streams the audio back for `--out`.
fn run_via_daemon(
    mut c: crate::daemon::client::Client,
    a: &SayArgs,
    text: String,
) -> anyhow::Result<()> {
    use base64::Engine as _;
    let output = if a.out.is_some() { "stream" } else { "play" };
    c.send(&serde_json::json!({
        "op": "speak", "text": text, "voice": a.voice, "output": output, "seed": a.seed,
        "rate": a.rate, "pitch": a.pitch,
    }))?;
    let mut sink = None;
    loop {
        let Some(ev) = c.recv()? else {
            bail!("the daemon closed the connection");
        };
        match ev["event"].as_str().unwrap_or("") {
            "accepted" => {
                sink = match &a.out {
                    Some(p) if p.as_os_str() == "-" => Some(Sink::Raw(std::io::stdout())),
                    Some(p) => Some(Sink::Wav(WavSink::create(p, 24000, a.format)?)),
                    None => None,
                };
            }
            "audio" => {
                let pcm = base64::engine::general_purpose::STANDARD
                    .decode(ev["pcm"].as_str().unwrap_or(""))
                    .context("bad audio from the daemon")?;
                let samples: Vec<f32> = pcm
                    .chunks_exact(2)
                    .map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / i16::MAX as f32)
                    .collect();
                if let Some(s) = sink.as_mut() {
                    s.write(&samples)?;
                }
            }
            "finished" => {
                if let Some(s) = sink.take() {
                    s.finish()?;
                }
                eprintln!(
                    "daemon: {} frames, {:.2} s of audio, real-time factor {:.3}",
                    ev["frames"],
                    ev["seconds"].as_f64().unwrap_or(0.0),
                    ev["rtf"].as_f64().unwrap_or(0.0)
                );
                return Ok(());
            }
            "failed" | "cancelled" => bail!(
                "synthesis {}: {}",
                ev["event"].as_str().unwrap_or(""),
                ev["reason"].as_str().unwrap_or("")
            ),
            _ => {}
        }
    }
}

pub fn run(a: SayArgs) -> anyhow::Result<()> {
    let text = read_text(a.text.clone())?;
    if a.model.model.is_none() {
        if let Some(c) = super::serve::daemon_client() {
            return run_via_daemon(c, &a, text);
        }
    }
    let model_dir = a.model.dir();
    // Check the model is there before opening any output.
    a.model.check_present()?;
    let rate = crate::model::config::ModelConfig::from_file(
        &model_dir.join(crate::model::checkpoint::PARAMS_FILE),
    )?
    .codec()
    .sampling_rate;
    let mut sink = match &a.out {
        Some(p) if p.as_os_str() == "-" => Sink::Raw(std::io::stdout()),
        Some(p) => Sink::Wav(WavSink::create(p, rate, a.format)?),
        // Open the sound card first: no device is a quick, clear error.
        None => Sink::Play(Box::new(Player::open_default(rate)?)),
    };
    let model = Arc::new(a.model.load()?);
    // The daemon's pronunciations apply here too.
    let lexicon = match super::serve::load_config(None).map(|c| c.lexicon()) {
        Ok(Ok(lexicon)) => lexicon.map(Arc::new),
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "config not read; no lexicon");
            None
        }
    };
    let engine = Engine::new(
        model,
        EngineConfig {
            lexicon,
            ..Default::default()
        },
    );
    let mut job = engine.submit(SpeechRequest {
        text,
        voice: a.voice,
        priority: Priority::Text,
        seed: a.seed,
        cfg_alpha: a.cfg_alpha,
        max_frames: a.max_frames,
        rate: a.rate.unwrap_or(1.0),
        pitch: a.pitch,
        // This command takes the audio itself.
        destination: Destination::Client,
    })?;
    while let Some(ev) = job.recv() {
        match ev {
            Event::Audio { samples, .. } => sink.write(&samples)?,
            Event::Sentence { range } => tracing::debug!(?range, "sentence"),
            Event::Started => {}
            Event::Finished {
                frames,
                seconds,
                rtf,
            } => {
                sink.finish()?;
                let target = match &a.out {
                    Some(p) if p.as_os_str() != "-" => p.display().to_string(),
                    Some(_) => "stdout".into(),
                    None => "speakers".into(),
                };
                eprintln!(
                    "{target}: {frames} frames, {seconds:.2} s of audio, real-time factor {rtf:.3}"
                );
                return Ok(());
            }
            Event::Failed { reason } => bail!("synthesis failed: {reason}"),
            Event::Cancelled { reason } => bail!("synthesis cancelled: {reason}"),
        }
    }
    bail!("the engine stopped without finishing")
}
