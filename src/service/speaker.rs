//! The daemon's own audio output: one device, opened on first use, shared by the jobs that
//! ask to be played (the engine produces them one at a time). Each played job has a thread
//! here that writes its audio to the device (which blocks at playback pace, or while paused)
//! and hands its other events to whoever asked.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::audio::pcm::apply_gain;
use crate::audio::playback::{Controls, Player};
use crate::engine::{Engine, Event, EventSender, Job};
use crate::error::Result;

pub struct Speaker {
    player: Mutex<Option<Player>>,
    /// Reachable without the player lock, which a blocked writer holds.
    controls: Mutex<Option<Arc<Controls>>>,
    sample_rate: u32,
    volume: f32,
    /// Kept here too, so a pause before the device is opened holds.
    paused: AtomicBool,
}

impl Speaker {
    pub fn new(sample_rate: u32, volume: f32) -> Self {
        Self {
            player: Mutex::new(None),
            controls: Mutex::new(None),
            sample_rate,
            volume,
            paused: AtomicBool::new(false),
        }
    }

    fn with_player<T>(&self, f: impl FnOnce(&mut Player) -> Result<T>) -> Result<T> {
        let mut g = self.player.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            let p = Player::open_default(self.sample_rate)?;
            p.controls()
                .paused
                .store(self.paused.load(Ordering::Acquire), Ordering::Release);
            *self.controls.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.controls().clone());
            *g = Some(p);
        }
        f(g.as_mut().expect("opened above"))
    }

    /// Plays samples; waits while the device's buffer is full.
    pub fn write(&self, mut samples: Vec<f32>) -> Result<()> {
        apply_gain(&mut samples, self.volume);
        self.with_player(|p| p.write(&samples))
    }

    pub fn end_of_utterance(&self) -> Result<()> {
        self.with_player(|p| p.end_of_input())
    }

    fn controls(&self) -> Option<Arc<Controls>> {
        self.controls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Silences the output at once (with a short fade) and drops what is buffered.
    pub fn flush(&self) {
        if let Some(c) = self.controls() {
            // Releases a writer blocked on a full buffer, then waits for the fade.
            c.stop.store(true, Ordering::Release);
            let mut g = self.player.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(p) = g.as_mut() {
                let _ = p.flush();
            }
        }
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Release);
        if let Some(c) = self.controls() {
            c.paused.store(paused, Ordering::Release);
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }
}

/// Plays `job` on `speaker` on a thread of its own, handing every other event to `events`.
/// Runs until the job ends; a playback failure cancels the job.
pub fn play(speaker: Arc<Speaker>, engine_job: Job, engine: &Arc<Engine>, events: EventSender) {
    let engine = engine.clone();
    std::thread::Builder::new()
        .name(format!("voxtrald-speaker-{}", engine_job.id))
        .spawn(move || speaker.play_job(engine_job, &engine, &events))
        .map(|_| ())
        .unwrap_or_else(|e| tracing::error!(error = %e, "cannot start a playback thread"));
}

impl Speaker {
    fn play_job(&self, mut job: Job, engine: &Engine, events: &EventSender) {
        while let Some(ev) = job.recv() {
            match ev {
                Event::Audio { samples, .. } => {
                    if let Err(e) = self.write(samples) {
                        tracing::warn!(job = job.id, error = %e, "playback failed");
                        engine.cancel_because(job.id, "playback failed");
                        events.send(Event::Failed {
                            reason: e.to_string(),
                        });
                        // Drain the cancellation.
                        while job.recv().is_some() {}
                        return;
                    }
                }
                Event::Finished { .. } => {
                    if let Err(e) = self.end_of_utterance() {
                        tracing::warn!(error = %e, "playback failed");
                    }
                    events.send(ev);
                }
                _ => events.send(ev),
            }
        }
    }
}
