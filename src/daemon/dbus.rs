//! D-Bus on the session bus: `org.freedesktop.Speech.Provider` (Spiel) at
//! `/org/voxtrald/Speech/Provider`, and the daemon's control interface `org.voxtrald.Daemon1`
//! at `/org/voxtrald/Daemon`.

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use zbus::object_server::SignalEmitter;

use super::Daemon;
use crate::engine::{Destination, Event, JobId, SpeechRequest};

pub const BUS_NAME: &str = "org.voxtrald.Speech.Provider";
pub const PROVIDER_PATH: &str = "/org/voxtrald/Speech/Provider";
pub const CONTROL_PATH: &str = "/org/voxtrald/Daemon";

/// `VOICE_FEATURE` flags of the Spiel interface that we honour: sentence events only.
pub const EVENTS_SENTENCE: u64 = 0x2;

/// The `audio/x-spiel` stream: version header, then event and audio chunks in host order.
pub mod spiel_stream {
    pub const VERSION: &[u8; 4] = b"0.01";
    pub const CHUNK_AUDIO: u8 = 1;
    pub const CHUNK_EVENT: u8 = 2;
    pub const EVENT_SENTENCE: u8 = 2;

    pub fn audio_chunk(pcm: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + pcm.len());
        out.push(CHUNK_AUDIO);
        out.extend_from_slice(&(pcm.len() as u32).to_ne_bytes());
        out.extend_from_slice(pcm);
        out
    }

    pub fn sentence_chunk(start: u32, end: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(14);
        out.push(CHUNK_EVENT);
        out.push(EVENT_SENTENCE);
        out.extend_from_slice(&start.to_ne_bytes());
        out.extend_from_slice(&end.to_ne_bytes());
        out.extend_from_slice(&0u32.to_ne_bytes());
        out
    }
}

fn output_format(rate: u32) -> String {
    format!("audio/x-spiel,format=S16LE,channels=1,rate={rate}")
}

fn display_name(id: &str, lang: &str) -> String {
    let language = match lang {
        "fr" => "French",
        "es" => "Spanish",
        "de" => "German",
        "it" => "Italian",
        "pt" => "Portuguese",
        "nl" => "Dutch",
        "ar" => "Arabic",
        "hi" => "Hindi",
        _ => "English",
    };
    let mut words: Vec<String> = id
        .split('_')
        .filter(|w| w.len() > 2)
        .map(|w| {
            let mut c = w.chars();
            c.next()
                .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                .unwrap_or_default()
        })
        .collect();
    if words.is_empty() {
        words.push(id.to_string());
    }
    format!("Voxtral {} ({language})", words.join(" "))
}

pub struct Provider {
    pub daemon: Arc<Daemon>,
}

#[zbus::interface(name = "org.freedesktop.Speech.Provider")]
impl Provider {
    /// Returns at once; the audio is written to `pipe_fd` by a worker. Closing the read end
    /// cancels the synthesis.
    #[allow(clippy::too_many_arguments)]
    async fn synthesize(
        &self,
        pipe_fd: zbus::OwnedFd,
        text: String,
        voice_id: String,
        pitch: f64,
        rate: f64,
        is_ssml: bool,
        language: String,
    ) -> zbus::fdo::Result<()> {
        let text = if is_ssml {
            crate::engine::ssml::to_text(&text).0
        } else {
            text
        };
        let voice = if voice_id.is_empty() {
            self.daemon.info.default_voice.clone()
        } else {
            voice_id
        };
        tracing::debug!(%voice, %language, chars = text.chars().count(), "Synthesize");
        let fd: std::os::fd::OwnedFd = pipe_fd.into();
        let mut pipe = std::fs::File::from(fd);
        let d = self.daemon.clone();
        let mut req = SpeechRequest::new(text, voice);
        // The Spiel client plays the stream itself, alongside other clients' streams.
        req.destination = Destination::Client;
        req.max_frames = d.limits.max_frames;
        // A multiplier, 1.0 = normal; screen readers go up to 10, we keep what stays clear.
        let rate = if rate.is_finite() && rate > 0.0 {
            rate as f32
        } else {
            1.0
        };
        req.rate = (rate * d.info.default_rate).clamp(
            crate::audio::stretch::MIN_RATE,
            crate::audio::stretch::MAX_RATE,
        );
        // Also a multiplier, 1.0 = normal; Spiel allows 0 to 2, we keep an octave each way.
        req.pitch = if pitch.is_finite() && pitch > 0.0 {
            (pitch as f32).clamp(
                crate::audio::prosody::MIN_PITCH,
                crate::audio::prosody::MAX_PITCH,
            )
        } else {
            1.0
        };
        std::thread::spawn(move || {
            if pipe.write_all(spiel_stream::VERSION).is_err() {
                return;
            }
            let mut job = match d.engine.submit(req) {
                Ok(j) => j,
                Err(e) => {
                    // Nothing but closing the pipe can report an error here.
                    tracing::warn!(error = %e, "Synthesize request refused");
                    return;
                }
            };
            while let Some(ev) = job.recv() {
                let bytes = match &ev {
                    Event::Sentence { range } => {
                        spiel_stream::sentence_chunk(range.start as u32, range.end as u32)
                    }
                    Event::Audio { samples, .. } => {
                        spiel_stream::audio_chunk(&super::protocol::pcm_s16le(samples))
                    }
                    Event::Failed { reason } => {
                        tracing::warn!(%reason, "Synthesize failed");
                        continue;
                    }
                    _ => continue,
                };
                if pipe.write_all(&bytes).is_err() {
                    // EPIPE: the client closed its end.
                    d.engine.cancel(job.id);
                    while job.recv().is_some() {}
                    break;
                }
            }
        });
        Ok(())
    }

    #[zbus(property)]
    fn name(&self) -> String {
        "Voxtral TTS".into()
    }

    #[zbus(property)]
    fn voices(&self) -> Vec<(String, String, String, u64, Vec<String>)> {
        let fmt = output_format(self.daemon.sample_rate());
        self.daemon
            .voices()
            .into_iter()
            .map(|(id, lang)| {
                (
                    display_name(&id, &lang),
                    id,
                    fmt.clone(),
                    EVENTS_SENTENCE,
                    vec![lang],
                )
            })
            .collect()
    }
}

pub struct Control {
    pub daemon: Arc<Daemon>,
    pub runtime: tokio::runtime::Handle,
}

fn fdo_err(e: impl std::fmt::Display) -> zbus::fdo::Error {
    zbus::fdo::Error::Failed(e.to_string())
}

#[zbus::interface(name = "org.voxtrald.Daemon1")]
impl Control {
    /// Speaks on the daemon's own audio output; returns the job id.
    async fn speak(
        &self,
        text: String,
        voice: String,
        priority: String,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> zbus::fdo::Result<u64> {
        let p = super::protocol::parse_priority(Some(&priority))
            .map_err(zbus::fdo::Error::InvalidArgs)?;
        let voice = if voice.is_empty() {
            self.daemon.info.default_voice.clone()
        } else {
            voice
        };
        let mut req = SpeechRequest::new(text, voice);
        req.priority = p;
        req.max_frames = self.daemon.limits.max_frames;
        req.rate = self.daemon.info.default_rate;
        let d = self.daemon.clone();
        let job = tokio::task::spawn_blocking(move || d.engine.submit(req))
            .await
            .map_err(fdo_err)?
            .map_err(|e| zbus::fdo::Error::InvalidArgs(e.to_string()))?;
        let id = job.id;
        let d = self.daemon.clone();
        let rt = self.runtime.clone();
        let emitter = emitter.to_owned();
        std::thread::spawn(move || {
            d.play_job(job, |ev| {
                let r = match ev {
                    Event::Started => rt.block_on(Control::job_started(&emitter, id)),
                    Event::Sentence { range } => rt.block_on(Control::job_sentence(
                        &emitter,
                        id,
                        range.start as u32,
                        range.end as u32,
                    )),
                    Event::Finished {
                        frames, seconds, ..
                    } => rt.block_on(Control::job_finished(
                        &emitter,
                        id,
                        *frames as u32,
                        *seconds,
                    )),
                    Event::Failed { reason } | Event::Cancelled { reason } => {
                        rt.block_on(Control::job_failed(&emitter, id, reason))
                    }
                    Event::Audio { .. } => Ok(()),
                };
                if let Err(e) = r {
                    tracing::debug!(error = %e, "signal not sent");
                }
            });
        });
        Ok(id)
    }

    /// Cancels one job; false if it is unknown or over.
    fn stop(&self, job: JobId) -> bool {
        self.daemon.engine.cancel(job)
    }

    /// Cancels everything and silences the output.
    async fn stop_all(&self) {
        let d = self.daemon.clone();
        let _ = tokio::task::spawn_blocking(move || d.stop_all()).await;
    }

    async fn pause(&self, #[zbus(signal_emitter)] emitter: SignalEmitter<'_>) {
        self.daemon.playback.set_paused(true);
        let _ = self.paused_changed(&emitter).await;
    }

    async fn resume(&self, #[zbus(signal_emitter)] emitter: SignalEmitter<'_>) {
        self.daemon.playback.set_paused(false);
        let _ = self.paused_changed(&emitter).await;
    }

    /// (voice id, language) pairs.
    fn list_voices(&self) -> Vec<(String, String)> {
        self.daemon.voices()
    }

    /// Model, device, dtype, default voice, queue length, peak memory.
    fn status(&self) -> HashMap<String, String> {
        let s = super::socket::status_json(&self.daemon);
        s.as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| k.as_str() != "event")
                    .map(|(k, v)| {
                        let v = v
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string());
                        (k.clone(), v)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[zbus(property)]
    fn paused(&self) -> bool {
        self.daemon.playback.is_paused()
    }

    #[zbus(property)]
    fn queue_length(&self) -> u32 {
        self.daemon.engine.queue_len() as u32
    }

    #[zbus(property)]
    fn model(&self) -> String {
        self.daemon.info.model.display().to_string()
    }

    #[zbus(property)]
    fn device(&self) -> String {
        self.daemon.info.device.clone()
    }

    #[zbus(signal)]
    async fn job_started(emitter: &SignalEmitter<'_>, job: u64) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn job_sentence(
        emitter: &SignalEmitter<'_>,
        job: u64,
        start: u32,
        end: u32,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn job_finished(
        emitter: &SignalEmitter<'_>,
        job: u64,
        frames: u32,
        seconds: f64,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn job_failed(emitter: &SignalEmitter<'_>, job: u64, reason: &str) -> zbus::Result<()>;
}

/// Connects to the session bus, serves both objects and takes the well-known name.
pub async fn serve(daemon: Arc<Daemon>) -> zbus::Result<zbus::Connection> {
    let provider = Provider {
        daemon: daemon.clone(),
    };
    let control = Control {
        daemon,
        runtime: tokio::runtime::Handle::current(),
    };
    zbus::connection::Builder::session()
        .serve_at(PROVIDER_PATH, provider)
        .serve_at(CONTROL_PATH, control)
        .name(BUS_NAME)
        .build()
        .await
}
