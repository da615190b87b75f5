//! `voxtrald serve`: one model, one engine, many clients: the Unix-socket API and D-Bus
//! (the freedesktop Speech provider and the daemon's control interface).

pub mod client;
pub mod config;
pub mod dbus;
pub mod http;
pub mod playback;
pub mod protocol;
pub mod socket;

use std::path::PathBuf;

use crate::engine::{Engine, Event, Job};
use crate::error::{Error, Result};
use playback::Playback;

/// What the daemon knows about itself, for `status`.
#[derive(Debug, Clone)]
pub struct Info {
    pub model: PathBuf,
    pub device: String,
    pub dtype: String,
    pub default_voice: String,
    pub default_rate: f32,
    /// The speech API's address, when one is configured.
    pub http: Option<String>,
}

/// Shared by every front end.
pub struct Daemon {
    pub engine: Engine,
    pub playback: Playback,
    pub info: Info,
    pub limits: config::Limits,
}

impl Daemon {
    pub fn voices(&self) -> Vec<(String, String)> {
        self.engine
            .model()
            .voices()
            .map(|v| (v.name.clone(), v.language.to_string()))
            .collect()
    }

    pub fn sample_rate(&self) -> u32 {
        self.engine.model().sample_rate()
    }

    /// Plays a job on the daemon's output, forwarding its other events to `on_event`. Runs
    /// until the job ends; a playback failure cancels the job.
    pub fn play_job(&self, mut job: Job, mut on_event: impl FnMut(&Event)) {
        while let Some(ev) = job.recv() {
            match &ev {
                Event::Audio { samples, .. } => {
                    if let Err(e) = self.playback.write(samples) {
                        tracing::warn!(error = %e, "playback failed");
                        self.engine.cancel(job.id);
                        on_event(&Event::Failed {
                            reason: e.to_string(),
                        });
                        // Drain the cancellation.
                        while job.recv().is_some() {}
                        return;
                    }
                }
                Event::Finished { .. } => {
                    if let Err(e) = self.playback.end_of_utterance() {
                        tracing::warn!(error = %e, "playback failed");
                    }
                    on_event(&ev);
                }
                _ => on_event(&ev),
            }
        }
    }

    /// Stops everything: queued and speaking jobs, and the sound already buffered.
    pub fn stop_all(&self) {
        self.engine.cancel_all();
        self.playback.flush();
    }
}

/// The socket path: from the config, else `$XDG_RUNTIME_DIR/voxtrald/voxtrald.sock`.
pub fn socket_path(configured: Option<&PathBuf>) -> Result<PathBuf> {
    if let Some(p) = configured {
        return Ok(p.clone());
    }
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            Error::InvalidInput(
                "XDG_RUNTIME_DIR is not set; set it or give a socket path in the config".into(),
            )
        })?;
    Ok(PathBuf::from(dir).join("voxtrald").join("voxtrald.sock"))
}
