//! The speech service: what every interface calls. An interface parses its protocol into a
//! [`Request`]; [`Speech::speak`] applies every default and rule once (voice, rate, pitch,
//! volume, frame cap, seed) and hands it to the engine; the interface encodes the events of the
//! [`Speaking`] it gets back for its client. Also the voices, the status, and the daemon's own
//! speaker (`speaker.rs`), its pause and its stop.

pub mod scales;
pub mod speaker;
pub mod voices;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;

use crate::engine::{Destination, Engine, Interface, Job, JobId, Priority, SpeechRequest};
use crate::error::{Error, Result};
use crate::library::{CodeOffset, Library, UserVoice};
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
    /// Frames per sentence at most; the configured limit is the most a request gets.
    pub max_frames: Option<usize>,
    /// Classifier-free guidance strength (default 1.2).
    pub cfg_alpha: Option<f32>,
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
            max_frames: None,
            cfg_alpha: None,
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
    /// The user's voices on disk, when there is a data folder.
    library: Option<Library>,
    user_voices: Mutex<UserVoices>,
    /// Bumped whenever the voice list changes; interfaces that announce it watch this.
    voice_changes: tokio::sync::watch::Sender<u64>,
}

/// The user voices the model holds, and the damaged files already reported.
#[derive(Default)]
struct UserVoices {
    loaded: BTreeMap<String, (Option<SystemTime>, Voice)>,
    reported: BTreeSet<(PathBuf, Option<SystemTime>)>,
}

impl Speech {
    /// The service over a loaded model; the default voice must exist.
    /// The user's voices are read from the library first, so one can be the default.
    pub fn new(model: Arc<Voxtral>, settings: Settings, listening: Listening) -> Result<Self> {
        let speaker = Arc::new(Speaker::new(model.sample_rate(), settings.volume));
        let me = Self {
            model_dir: model.dir().to_path_buf(),
            engine: Arc::new(Engine::new(model, settings.engine_config())),
            speaker,
            library: settings.voices_dir().map(Library::new),
            settings,
            listening,
            user_voices: Mutex::new(UserVoices::default()),
            voice_changes: tokio::sync::watch::Sender::new(0),
        };
        me.sync_voices();
        me.engine.model().voice(&me.settings.voice)?;
        Ok(me)
    }

    /// Brings the model's user voices in line with the library folder: new and changed files
    /// are loaded, removed ones dropped, damaged ones reported once each (by name) and
    /// skipped. Returns whether the voice list changed; watchers of
    /// [`Speech::voice_changes`] hear of it.
    pub fn sync_voices(&self) -> bool {
        let Some(lib) = &self.library else {
            return false;
        };
        let model = self.engine.model();
        let mut state = self.user_voices.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = BTreeSet::new();
        let mut changed = false;
        for entry in lib.scan() {
            let v = match entry {
                Ok(v) => v,
                Err(e) => {
                    let key = error_key(&e);
                    if state.reported.insert(key) {
                        tracing::warn!(error = %e, "skipping a damaged user voice");
                    }
                    continue;
                }
            };
            seen.insert(v.name.clone());
            if state
                .loaded
                .get(&v.name)
                .is_some_and(|(m, _)| *m == v.modified)
            {
                continue;
            }
            if model.voices().any(|p| p.name == v.name) {
                continue;
            }
            match voices::install_user_voice(model, &v) {
                Ok(()) => {
                    tracing::info!(voice = %v.name, frames = v.codes.len(), "user voice loaded");
                    state
                        .loaded
                        .insert(v.name.clone(), (v.modified, Voice::user(&v)));
                    changed = true;
                }
                Err(e) => {
                    if state.reported.insert((v.path.clone(), v.modified)) {
                        tracing::warn!(voice = %v.name, path = %v.path.display(), error = %e,
                            "user voice does not fit this model");
                    }
                }
            }
        }
        let gone: Vec<String> = state
            .loaded
            .keys()
            .filter(|n| !seen.contains(*n))
            .cloned()
            .collect();
        for name in gone {
            model.remove_user_voice(&name);
            state.loaded.remove(&name);
            tracing::info!(voice = %name, "user voice removed");
            changed = true;
        }
        drop(state);
        if changed {
            self.voice_changes.send_modify(|n| *n += 1);
        }
        changed
    }

    /// Ticks whenever the voice list changes (a user voice added, changed or removed).
    pub fn voice_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.voice_changes.subscribe()
    }

    fn library(&self) -> Result<&Library> {
        self.library.as_ref().ok_or_else(|| {
            Error::InvalidInput(
                "there is no voice library: set XDG_DATA_HOME or HOME, or `voices` in the \
                 config"
                    .into(),
            )
        })
    }

    /// The user's voices with their stored details, and the damaged files as errors.
    pub fn user_voices(&self) -> Result<Vec<Result<UserVoice>>> {
        Ok(self.library()?.scan())
    }

    /// Imports `[T, 37]` codes from a `.npy` file as a new voice, at once on every interface.
    pub fn import_voice(
        &self,
        name: &str,
        language: &str,
        codes: &Path,
        offset: CodeOffset,
    ) -> Result<Voice> {
        let v = self.library()?.import(name, language, codes, offset)?;
        self.sync_voices();
        self.loaded_voice(&v)
    }

    fn loaded_voice(&self, v: &UserVoice) -> Result<Voice> {
        let state = self.user_voices.lock().unwrap_or_else(|e| e.into_inner());
        match state.loaded.get(&v.name) {
            Some((_, voice)) => Ok(voice.clone()),
            None => Err(Error::InvalidInput(format!(
                "voice `{}` was stored in {} but this model cannot use it (see the log)",
                v.name,
                v.path.display()
            ))),
        }
    }

    /// Writes a user voice's codes to `out` as `.npy`.
    pub fn export_voice(&self, name: &str, out: &Path) -> Result<()> {
        self.library()?.export(name, out).map(|_| ())
    }

    pub fn remove_voice(&self, name: &str) -> Result<()> {
        self.library()?.remove(name)?;
        self.sync_voices();
        Ok(())
    }

    pub fn rename_voice(&self, from: &str, to: &str) -> Result<Voice> {
        let v = self.library()?.rename(from, to)?;
        self.sync_voices();
        self.loaded_voice(&v)
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
        r.max_frames = req
            .max_frames
            .map_or(s.limits.max_frames, |m| m.min(s.limits.max_frames));
        if let Some(alpha) = req.cfg_alpha {
            r.cfg_alpha = alpha;
        }
        r.rate = req.rate.rate(s.rate);
        r.pitch = req.pitch.pitch(s.pitch);
        r.volume = req.volume.unwrap_or(1.0);
        if let Some(chars) = &req.punctuation {
            let language = self
                .voices()
                .into_iter()
                .find(|v| v.id == r.voice)
                .map_or_else(|| "en".to_string(), |v| v.language);
            r.punctuation = SpokenPunctuation::new(chars, &language);
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

    /// [`Speech::off_runtime`] for a call that can fail.
    pub async fn try_off_runtime<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Speech) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.off_runtime(f).await?
    }

    /// [`Speech::speak`] from async code.
    pub async fn speak_async(self: &Arc<Self>, req: Request) -> Result<Speaking> {
        self.off_runtime(move |s| s.speak(req)).await?
    }

    /// Every voice: the presets, then the user's.
    pub fn voices(&self) -> Vec<Voice> {
        let mut all = voices::of_model(self.engine.model());
        let state = self.user_voices.lock().unwrap_or_else(|e| e.into_inner());
        all.extend(state.loaded.values().map(|(_, v)| v.clone()));
        all
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

/// Which damaged file (and version of it) an error is about, to report it once.
fn error_key(e: &Error) -> (PathBuf, Option<SystemTime>) {
    let path = match e {
        Error::Voice { path, .. } | Error::Io { path, .. } => path.clone(),
        other => PathBuf::from(other.to_string()),
    };
    let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    (path, modified)
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
