//! `voxtrald say`: text to the speakers, a WAV file, or raw PCM on stdout.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;

use super::ModelArgs;
use crate::audio::pcm::{from_s16le, s16le};
use crate::audio::playback::Player;
use crate::audio::wav::{WavFormat, WavSink};
use crate::client::socket::Client;
use crate::engine::{Destination, Engine, Event, Interface, Priority, SpeechRequest};
use crate::frontends::protocol::{Message, Output, Speak};
use crate::model::{DEFAULT_CFG_ALPHA, DEFAULT_MAX_FRAMES};
use crate::settings::Settings;
use crate::text::ssml::{self, Markup};

/// Largest text accepted in one request.
pub const MAX_TEXT_BYTES: usize = 1 << 20;

#[derive(Args)]
pub struct SayArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Voice (see `voxtrald voices`; default: the configured voice, else casual_male).
    #[arg(long)]
    voice: Option<String>,
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
    /// Speaking rate, 0.25 to 4.0, pitch kept (default: the configured rate, else 1.0).
    #[arg(long)]
    rate: Option<f32>,
    /// Pitch as a frequency ratio, 0.5 to 2.0, duration kept (1.5 is a fifth higher; default:
    /// the configured pitch, else 1.0).
    #[arg(long)]
    pitch: Option<f32>,
    /// The text is SSML: `<break>`, `<prosody>`, `<mark>` (logged), `<sub>`, `<say-as>`.
    #[arg(long)]
    ssml: bool,
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
            Sink::Raw(out) => out
                .lock()
                .write_all(&s16le(samples))
                .context("writing to stdout")?,
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
fn run_via_daemon(mut c: Client, a: &SayArgs, text: String) -> anyhow::Result<()> {
    use base64::Engine as _;
    let output = if a.out.is_some() {
        Output::Stream
    } else {
        Output::Play
    };
    let req = Message::Speak(Speak {
        text,
        ssml: a.ssml,
        output,
        voice: a.voice.clone(),
        seed: Some(a.seed),
        rate: a.rate,
        pitch: a.pitch,
        max_frames: Some(a.max_frames),
        cfg_alpha: Some(a.cfg_alpha),
        ..Speak::default()
    });
    c.send(&req)?;
    let mut sink = None;
    loop {
        let Some(ev) = c.recv()? else {
            bail!("the daemon closed the connection");
        };
        match ev["event"].as_str().unwrap_or("") {
            "accepted" => {
                let sample_rate = ev["sample_rate"].as_u64().unwrap_or(0) as u32;
                sink = match &a.out {
                    Some(p) if p.as_os_str() == "-" => Some(Sink::Raw(std::io::stdout())),
                    Some(p) => Some(Sink::Wav(WavSink::create(p, sample_rate, a.format)?)),
                    None => None,
                };
            }
            "audio" => {
                let pcm = base64::engine::general_purpose::STANDARD
                    .decode(ev["pcm"].as_str().unwrap_or(""))
                    .context("bad audio from the daemon")?;
                if let Some(s) = sink.as_mut() {
                    s.write(&from_s16le(&pcm))?;
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
        if let Some(c) = Client::of_this_user() {
            return run_via_daemon(c, &a, text);
        }
    }
    let model_settings = a.model.settings();
    let model_dir = model_settings.dir.clone();
    // Check the model is there before opening any output.
    crate::download::ensure_model(&model_dir, model_settings.explicit)?;
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
    let model = Arc::new(model_settings.load()?);
    // The daemon's defaults and pronunciations apply here too.
    let settings = Settings::of_this_user()?;
    let voice = a.voice.clone().unwrap_or(settings.voice.clone());
    // A voice of the user's library, when no preset has that name.
    if !model.voices().any(|v| v.name == voice) {
        if let Some(dir) = settings.voices_dir() {
            if let Ok(v) = crate::library::Library::new(dir).get(&voice) {
                crate::service::voices::install_user_voice(&model, &v)?;
            }
        }
    }
    let engine = Engine::new(model, settings.engine_config());
    let (text, markup) = if a.ssml {
        ssml::parse(&text)
    } else {
        (text, Markup::default())
    };
    let mut job = engine.submit(SpeechRequest {
        text,
        voice,
        priority: Priority::Text,
        seed: a.seed,
        cfg_alpha: a.cfg_alpha,
        max_frames: a.max_frames,
        rate: a.rate.unwrap_or(settings.rate),
        pitch: a.pitch.unwrap_or(settings.pitch),
        volume: 1.0,
        punctuation: None,
        markup,
        // This command takes the audio itself.
        destination: Destination::Client,
        interface: Interface::Local,
    })?;
    while let Some(ev) = job.recv() {
        match ev {
            Event::Audio { samples, .. } => sink.write(&samples)?,
            Event::Sentence { range } => tracing::debug!(?range, "sentence"),
            Event::Word { range, offset } => tracing::debug!(?range, offset, "word"),
            Event::Mark { name, offset } => tracing::debug!(%name, offset, "mark"),
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
