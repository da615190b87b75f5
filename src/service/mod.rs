//! The speech service: what every interface calls. An interface parses its protocol into a
//! [`Request`]; [`Speech::speak`] applies every default and rule once (voice, rate, pitch,
//! volume, frame cap, seed) and hands it to the engine; the interface encodes the events of the
//! [`Speaking`] it gets back for its client. Also the voices, the status, and the daemon's own
//! speaker (`speaker.rs`), its pause and its stop.

pub mod scales;
pub mod speaker;
pub mod voices;

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::engine::{Destination, Engine, Interface, Job, JobId, Priority, SpeechRequest};
use crate::error::Result;
use crate::model::Voxtral;
use crate::settings::Settings;
use crate::text::punctuation::SpokenPunctuation;
use crate::text::ssml::{self, Markup};
pub use scales::Amount;
use speaker::Speaker;
pub use voices::Voice;

/// A job being spoken, as its requester sees it: its events, from blocking or async code.
/// Dropping it cancels a job whose audio goes back to the requester; a job on the daemon's own
/// speaker goes on (cancel it by id).
pub type Speaking = Job;

/// A request as an interface hands it over; what it leaves out gets the configured default.
#[derive(Debug, Clone)]
pub struct Request {
    pub text: String,
    /// `text` is SSML: it is read as plain text with its marks, breaks and prosody.
    pub ssml: bool,
    /// A voice id; `None` (or empty) for the configured voice.
    pub voice: Option<String>,
    pub rate: Amount,
    pub pitch: Amount,
    /// Gain, 0.0 to 1.0 (default 1.0).
    pub volume: Option<f32>,
    /// Characters to say by name (Speech Dispatcher's punctuation modes), in the voice's
    /// language.
    pub punctuation: Option<String>,
    pub priority: Priority,
    pub seed: Option<u64>,
    pub destination: Destination,
    pub interface: Interface,
}

impl Request {
    pub fn new(text: impl Into<String>, interface: Interface, destination: Destination) -> Self {
        Self {
            text: text.into(),
            ssml: false,
            voice: None,
            rate: Amount::Default,
            pitch: Amount::Default,
            volume: None,
            punctuation: None,
            priority: Priority::Text,
            seed: None,
            destination,
            interface,
        }
    }
}

/// What the daemon reports about itself, the same on every interface.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub model: String,
    pub device: String,
    pub dtype: String,
    /// Defaults of requests that do not say.
    pub voice: String,
    pub rate: f32,
    pub pitch: f32,
    /// Jobs waiting or speaking.
    pub queue: usize,
    pub paused: bool,
    pub peak_rss_bytes: u64,
    /// The speech API's address, when one is served.
    pub http: Option<String>,
    /// The Wyoming server's address, when one is served.
    pub wyoming: Option<String>,
}

/// Network listeners the daemon serves, as they are bound (a port 0 resolved), for `status`.
#[derive(Debug, Clone, Default)]
pub struct Listening {
    pub http: Option<String>,
    pub wyoming: Option<String>,
}

pub struct Speech {
    engine: Arc<Engine>,
    speaker: Arc<Speaker>,
    settings: Settings,
    model_dir: PathBuf,
    listening: Listening,
}

impl Speech {
    /// The service over a loaded model; the default voice must exist.
    pub fn new(model: Arc<Voxtral>, settings: Settings, listening: Listening) -> Result<Self> {
        model.voice(&settings.voice)?;
        let speaker = Arc::new(Speaker::new(model.sample_rate(), settings.volume));
        Ok(Self {
            model_dir: model.dir().to_path_buf(),
            engine: Arc::new(Engine::new(model, settings.engine_config())),
            speaker,
            settings,
            listening,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn sample_rate(&self) -> u32 {
        self.engine.model().sample_rate()
    }

    /// The engine's request for `req`, every default applied.
    fn resolve(&self, req: Request) -> SpeechRequest {
        let s = &self.settings;
        let voice = req
            .voice
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| s.voice.clone());
        let (text, markup) = if req.ssml {
            ssml::parse(&req.text)
        } else {
            (req.text, Markup::default())
        };
        let mut r = SpeechRequest::new(text, voice);
        r.markup = markup;
        r.priority = req.priority;
        r.seed = req.seed.unwrap_or(0);
        r.max_frames = s.limits.max_frames;
        r.rate = req.rate.rate(s.rate);
        r.pitch = req.pitch.pitch(s.pitch);
        r.volume = req.volume.unwrap_or(1.0);
        if let Some(chars) = &req.punctuation {
            let model = self.engine.model();
            let language = model
                .voices()
                .find(|v| v.name == r.voice)
                .map_or("en", |v| v.language);
            r.punctuation = SpokenPunctuation::new(chars, language);
        }
        r.destination = req.destination;
        r.interface = req.interface;
        r
    }

    /// Queues a request; bad input fails here. A job for the daemon's speaker is played by
    /// it, and the returned stream carries its other events.
    pub fn speak(&self, req: Request) -> Result<Speaking> {
        let r = self.resolve(req);
        let destination = r.destination;
        let job = self.engine.submit(r)?;
        if destination == Destination::Client {
            return Ok(job);
        }
        let (events, tx) = Job::relay(job.id, usize::MAX);
        speaker::play(self.speaker.clone(), job, &self.engine, tx);
        Ok(events)
    }

    /// Runs `f` on the service from async code, off the runtime's threads: splitting a long
    /// text and silencing the speaker take a while.
    pub async fn off_runtime<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Speech) -> T + Send + 'static,
    ) -> Result<T> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || f(&me))
            .await
            .map_err(|e| crate::Error::Internal(e.to_string()))
    }

    /// [`Speech::speak`] from async code.
    pub async fn speak_async(self: &Arc<Self>, req: Request) -> Result<Speaking> {
        self.off_runtime(move |s| s.speak(req)).await?
    }

    pub fn voices(&self) -> Vec<Voice> {
        voices::of_model(self.engine.model())
    }

    pub fn status(&self) -> Status {
        let model = self.engine.model();
        Status {
            model: self.model_dir.display().to_string(),
            device: format!("{:?}", model.device()).to_lowercase(),
            dtype: format!("{:?}", model.dtype()).to_lowercase(),
            voice: self.settings.voice.clone(),
            rate: self.settings.rate,
            pitch: self.settings.pitch,
            queue: self.engine.queue_len(),
            paused: self.speaker.is_paused(),
            peak_rss_bytes: peak_rss_bytes(),
            http: self.listening.http.clone(),
            wyoming: self.listening.wyoming.clone(),
        }
    }

    /// Cancels one job; false if it is unknown or over.
    pub fn cancel(&self, job: JobId, by: Interface) -> bool {
        self.engine
            .cancel_because(job, &format!("cancelled by a {by} client"))
    }

    /// Stops everything: queued and speaking jobs, and the sound already buffered.
    pub fn stop_all(&self, by: Interface) {
        self.engine
            .cancel_all_because(&format!("stopped by a {by} client"));
        self.speaker.flush();
    }

    /// Ends every job at shutdown and silences the speaker.
    pub fn shut_down(&self) {
        self.engine
            .cancel_all_because("the daemon is shutting down");
        self.speaker.flush();
    }

    pub fn set_paused(&self, paused: bool) {
        self.speaker.set_paused(paused);
    }

    pub fn is_paused(&self) -> bool {
        self.speaker.is_paused()
    }

    pub fn queue_len(&self) -> usize {
        self.engine.queue_len()
    }
}

/// Peak resident set size of this process (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
