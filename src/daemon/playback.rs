//! The daemon's own audio output: one device, opened on first use, shared by the jobs that
//! ask to be played (the engine produces them one at a time).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::audio::playback::{Controls, Player};
use crate::error::Result;

pub struct Playback {
    player: Mutex<Option<Player>>,
    /// Reachable without the player lock, which a blocked writer holds.
    controls: Mutex<Option<Arc<Controls>>>,
    rate: u32,
    volume: f32,
    /// Kept here too, so a pause before the device is opened holds.
    paused: AtomicBool,
}

impl Playback {
    pub fn new(rate: u32, volume: f32) -> Self {
        Self {
            player: Mutex::new(None),
            controls: Mutex::new(None),
            rate,
            volume,
            paused: AtomicBool::new(false),
        }
    }

    fn with_player<T>(&self, f: impl FnOnce(&mut Player) -> Result<T>) -> Result<T> {
        let mut g = self.player.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            let p = Player::open_default(self.rate)?;
            p.controls()
                .paused
                .store(self.paused.load(Ordering::Acquire), Ordering::Release);
            *self.controls.lock().unwrap_or_else(|e| e.into_inner()) = Some(p.controls().clone());
            *g = Some(p);
        }
        f(g.as_mut().expect("opened above"))
    }

    /// Plays samples; waits while the device's buffer is full.
    pub fn write(&self, samples: &[f32]) -> Result<()> {
        if (self.volume - 1.0).abs() > f32::EPSILON {
            let scaled: Vec<f32> = samples.iter().map(|s| s * self.volume).collect();
            self.with_player(|p| p.write(&scaled))
        } else {
            self.with_player(|p| p.write(samples))
        }
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
