//! The daemon's control interface `org.voxtrald.Daemon1` at `/org/voxtrald/Daemon`: speak on
//! the daemon's own output, stop, pause, list voices, status; job signals.

use std::collections::HashMap;
use std::sync::Arc;

use zbus::object_server::SignalEmitter;

use super::protocol::code_offset;
use crate::engine::{Destination, Event, Interface, JobId};
use crate::library::UserVoice;
use crate::service::{Request, Speech, Voice};

pub const CONTROL_PATH: &str = "/org/voxtrald/Daemon";

pub struct Control {
    pub speech: Arc<Speech>,
}

fn invalid(e: impl std::fmt::Display) -> zbus::fdo::Error {
    zbus::fdo::Error::InvalidArgs(e.to_string())
}

impl Control {
    /// Queues a job on the daemon's output and relays its events as signals.
    async fn start(
        &self,
        text: String,
        ssml: bool,
        voice: String,
        priority: String,
        emitter: SignalEmitter<'_>,
    ) -> zbus::fdo::Result<u64> {
        let mut req = Request::new(text, Interface::Control, Destination::Speaker);
        req.ssml = ssml;
        req.voice = Some(voice);
        req.priority = priority.parse().map_err(invalid)?;
        let mut job = self.speech.speak_async(req).await.map_err(invalid)?;
        let id = job.id;
        let emitter = emitter.to_owned();
        tokio::spawn(async move {
            while let Some(ev) = job.next().await {
                let sent = match ev {
                    Event::Started => Control::job_started(&emitter, id).await,
                    Event::Sentence { range } => {
                        let (start, end) = (range.start as u32, range.end as u32);
                        Control::job_sentence(&emitter, id, start, end).await
                    }
                    Event::Finished {
                        frames, seconds, ..
                    } => Control::job_finished(&emitter, id, frames as u32, seconds).await,
                    Event::Failed { reason } | Event::Cancelled { reason } => {
                        Control::job_failed(&emitter, id, &reason).await
                    }
                    Event::Word { range, offset } => {
                        let (start, end) = (range.start as u32, range.end as u32);
                        Control::job_word(&emitter, id, start, end, offset).await
                    }
                    Event::Mark { name, offset } => {
                        Control::job_mark(&emitter, id, &name, offset).await
                    }
                    Event::Audio { .. } => Ok(()),
                };
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "signal not sent");
                }
            }
        });
        Ok(id)
    }
}

#[zbus::interface(name = "org.voxtrald.Daemon1")]
impl Control {
    /// Speaks on the daemon's own audio output; returns the job id. An empty voice is the
    /// configured one.
    async fn speak(
        &self,
        text: String,
        voice: String,
        priority: String,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> zbus::fdo::Result<u64> {
        self.start(text, false, voice, priority, emitter).await
    }

    /// `Speak` for SSML: its `<mark/>`s come back as `JobMark` signals as they are spoken.
    async fn speak_ssml(
        &self,
        ssml: String,
        voice: String,
        priority: String,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> zbus::fdo::Result<u64> {
        self.start(ssml, true, voice, priority, emitter).await
    }

    /// Cancels one job; false if it is unknown or over.
    fn stop(&self, job: JobId) -> bool {
        self.speech.cancel(job, Interface::Control)
    }

    /// Cancels everything and silences the output.
    async fn stop_all(&self) {
        let _ = self
            .speech
            .off_runtime(|s| s.stop_all(Interface::Control))
            .await;
    }

    async fn pause(&self, #[zbus(signal_emitter)] emitter: SignalEmitter<'_>) {
        self.speech.set_paused(true);
        let _ = self.paused_changed(&emitter).await;
    }

    async fn resume(&self, #[zbus(signal_emitter)] emitter: SignalEmitter<'_>) {
        self.speech.set_paused(false);
        let _ = self.paused_changed(&emitter).await;
    }

    /// (voice id, language) pairs.
    fn list_voices(&self) -> Vec<(String, String)> {
        let voices = self.speech.voices();
        voices.into_iter().map(|v| (v.id, v.language)).collect()
    }

    /// The user's voices: (name, language, description, problem). A damaged file is listed
    /// with its error as the problem; the others have an empty one.
    async fn list_user_voices(&self) -> zbus::fdo::Result<Vec<(String, String, String, String)>> {
        let entries = self
            .speech
            .try_off_runtime(|s| s.user_voices())
            .await
            .map_err(invalid)?;
        Ok(entries.into_iter().map(user_voice_row).collect())
    }

    /// Stores `[T, 37]` codes from a `.npy` file (`offset`: "auto", "0" or "2") as a voice;
    /// returns its id. It is on every interface at once.
    async fn import_voice(
        &self,
        name: String,
        language: String,
        codes: String,
        offset: String,
    ) -> zbus::fdo::Result<String> {
        let offset =
            code_offset(Some(offset.as_str()).filter(|o| !o.is_empty())).map_err(invalid)?;
        let v = self
            .speech
            .try_off_runtime(move |s| s.import_voice(&name, &language, codes.as_ref(), offset))
            .await
            .map_err(invalid)?;
        Ok(v.id)
    }

    /// Writes a user voice's codes to a `.npy` file.
    async fn export_voice(&self, name: String, path: String) -> zbus::fdo::Result<()> {
        self.speech
            .try_off_runtime(move |s| s.export_voice(&name, path.as_ref()))
            .await
            .map_err(invalid)
    }

    async fn remove_voice(&self, name: String) -> zbus::fdo::Result<()> {
        self.speech
            .try_off_runtime(move |s| s.remove_voice(&name))
            .await
            .map_err(invalid)
    }

    async fn rename_voice(&self, from: String, to: String) -> zbus::fdo::Result<String> {
        let v = self
            .speech
            .try_off_runtime(move |s| s.rename_voice(&from, &to))
            .await
            .map_err(invalid)?;
        Ok(v.id)
    }

    /// A voice was added, changed or removed: `ListVoices` has changed.
    #[zbus(signal)]
    pub async fn voices_changed(emitter: &SignalEmitter<'_>) -> zbus::Result<()>;

    /// The status, each value as a string (numbers in decimal, absent ones empty).
    fn status(&self) -> HashMap<String, String> {
        let status = serde_json::to_value(self.speech.status()).unwrap_or_default();
        let fields = status.as_object().cloned().unwrap_or_default();
        fields
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    serde_json::Value::String(s) => s,
                    serde_json::Value::Null => String::new(),
                    other => other.to_string(),
                };
                (k, v)
            })
            .collect()
    }

    #[zbus(property)]
    fn paused(&self) -> bool {
        self.speech.is_paused()
    }

    #[zbus(property)]
    fn queue_length(&self) -> u32 {
        self.speech.queue_len() as u32
    }

    #[zbus(property)]
    fn model(&self) -> String {
        self.speech.status().model
    }

    #[zbus(property)]
    fn device(&self) -> String {
        self.speech.status().device
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

    /// A word starts at sample `offset` of the job's audio; sent as its audio is played.
    #[zbus(signal)]
    async fn job_word(
        emitter: &SignalEmitter<'_>,
        job: u64,
        start: u32,
        end: u32,
        offset: u64,
    ) -> zbus::Result<()>;

    /// An SSML `<mark/>` of a `SpeakSsml` job is reached.
    #[zbus(signal)]
    async fn job_mark(
        emitter: &SignalEmitter<'_>,
        job: u64,
        name: &str,
        offset: u64,
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

/// A `ListUserVoices` row.
fn user_voice_row(entry: crate::Result<UserVoice>) -> (String, String, String, String) {
    match entry {
        Ok(v) => {
            let d = Voice::user(&v).description;
            (v.name, v.language, d, String::new())
        }
        Err(e) => {
            let name = match &e {
                crate::Error::Voice { voice, .. } => voice.clone(),
                _ => String::new(),
            };
            (name, String::new(), String::new(), e.to_string())
        }
    }
}
