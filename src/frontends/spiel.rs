//! The freedesktop speech provider (`org.freedesktop.Speech.Provider`, what libspiel, Orca's
//! Spiel backend and WebKit use) at `/org/voxtrald/Speech/Provider`: `Synthesize` writes an
//! `audio/x-spiel` stream into the client's pipe, as fast as the client reads it; closing the
//! pipe cancels the synthesis.

use std::sync::Arc;

use tokio::io::AsyncWriteExt;

use crate::audio::pcm::s16le;
use crate::engine::{Destination, Event, Interface};
use crate::service::{scales, Request, Speaking, Speech};

pub const PROVIDER_PATH: &str = "/org/voxtrald/Speech/Provider";

/// `VOICE_FEATURE` flags of the Spiel interface that we honour: word, sentence and SSML mark
/// events, and `<break>`.
pub const EVENTS_WORD: u64 = 0x1;
pub const EVENTS_SENTENCE: u64 = 0x2;
pub const EVENTS_SSML_MARK: u64 = 0x8;
pub const SSML_BREAK: u64 = 0x1000;
pub const FEATURES: u64 = EVENTS_WORD | EVENTS_SENTENCE | EVENTS_SSML_MARK | SSML_BREAK;

/// The `audio/x-spiel` stream: version header, then event and audio chunks in host order.
pub mod stream {
    pub const VERSION: &[u8; 4] = b"0.01";
    pub const CHUNK_AUDIO: u8 = 1;
    pub const CHUNK_EVENT: u8 = 2;
    pub const EVENT_WORD: u8 = 1;
    pub const EVENT_SENTENCE: u8 = 2;
    pub const EVENT_MARK: u8 = 4;

    pub fn audio_chunk(pcm: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(5 + pcm.len());
        out.push(CHUNK_AUDIO);
        out.extend_from_slice(&(pcm.len() as u32).to_ne_bytes());
        out.extend_from_slice(pcm);
        out
    }

    /// An event chunk: type, character range, then the mark name (its length in bytes).
    pub fn event_chunk(kind: u8, start: u32, end: u32, name: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(14 + name.len());
        out.push(CHUNK_EVENT);
        out.push(kind);
        out.extend_from_slice(&start.to_ne_bytes());
        out.extend_from_slice(&end.to_ne_bytes());
        out.extend_from_slice(&(name.len() as u32).to_ne_bytes());
        out.extend_from_slice(name.as_bytes());
        out
    }

    pub fn sentence_chunk(start: u32, end: u32) -> Vec<u8> {
        event_chunk(EVENT_SENTENCE, start, end, "")
    }
}

pub struct Provider {
    pub speech: Arc<Speech>,
}

#[zbus::interface(name = "org.freedesktop.Speech.Provider")]
impl Provider {
    /// Returns at once; the audio follows in `pipe_fd`.
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
        tracing::debug!(voice = %voice_id, %language, "Synthesize");
        let mut req = Request::new(text, Interface::Spiel, Destination::Client);
        req.ssml = is_ssml;
        req.voice = Some(voice_id);
        req.rate = scales::spiel(rate);
        req.pitch = scales::spiel(pitch);
        let pipe = tokio::net::unix::pipe::Sender::from_owned_fd_unchecked(pipe_fd.into())
            .map_err(|e| zbus::fdo::Error::InvalidArgs(format!("pipe_fd: {e}")))?;
        let speech = self.speech.clone();
        tokio::spawn(async move {
            // Nothing but closing the pipe can report an error once the call has returned.
            match speech.speak_async(req).await {
                Ok(job) => write_stream(job, pipe).await,
                Err(e) => tracing::warn!(error = %e, "Synthesize request refused"),
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
        let format = format!(
            "audio/x-spiel,format=S16LE,channels=1,rate={}",
            self.speech.sample_rate()
        );
        self.speech
            .voices()
            .into_iter()
            .map(|v| {
                (
                    v.display_name,
                    v.id,
                    format.clone(),
                    FEATURES,
                    vec![v.language],
                )
            })
            .collect()
    }
}

/// Writes the job as an `audio/x-spiel` stream; a closed pipe (EPIPE) drops, so cancels, it.
async fn write_stream(mut job: Speaking, mut pipe: tokio::net::unix::pipe::Sender) {
    if pipe.write_all(stream::VERSION).await.is_err() {
        return;
    }
    while let Some(ev) = job.next().await {
        let bytes = match &ev {
            Event::Sentence { range } => {
                stream::sentence_chunk(range.start as u32, range.end as u32)
            }
            Event::Word { range, .. } => {
                stream::event_chunk(stream::EVENT_WORD, range.start as u32, range.end as u32, "")
            }
            Event::Mark { name, .. } => stream::event_chunk(stream::EVENT_MARK, 0, 0, name),
            Event::Audio { samples, .. } => stream::audio_chunk(&s16le(samples)),
            _ => continue,
        };
        if pipe.write_all(&bytes).await.is_err() {
            return;
        }
    }
}
