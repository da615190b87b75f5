//! Playback on the default output device (cpal). The model's 24 kHz mono is resampled to the
//! device rate and fed through a lock-free ring to the audio callback, which waits for a
//! pre-roll before starting, fades out when the ring runs dry (and back in after refilling),
//! and fades out on stop, so neither slow generation nor a stop ever clicks.
//!
//! The sound card is the cargo feature `playback` (on by default). A build without it (the
//! CUDA check build) links no ALSA library: opening the device then fails with a clear error,
//! and everything else (files, clients, the daemon's interfaces) works as before.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::resample::StreamResampler;
use crate::error::{Error, Result};

/// Fade length at underruns, pauses and stops.
const FADE_MS: u32 = 8;
/// Audio buffered before playback starts, and again after an underrun.
const PREROLL_MS: u32 = 150;
/// Ring capacity: generation faster than real time stays ahead of the device.
const RING_SECONDS: u32 = 8;

/// Control flags shared with the audio callback.
#[derive(Default)]
pub struct Controls {
    pub paused: AtomicBool,
    /// No more input will come: play out what is buffered without waiting for pre-roll.
    pub input_done: AtomicBool,
    /// Fade out now and discard the rest.
    pub stop: AtomicBool,
    /// Set by the renderer once a stop has faded out.
    pub stopped: AtomicBool,
    pub underruns: AtomicU64,
    /// Errors the device reported on the running stream (an ALSA xrun, say).
    pub device_errors: AtomicU64,
    /// Device frames written that carried audio.
    pub played: AtomicU64,
}

/// The callback's state machine, separate from cpal so it can be tested sample by sample.
pub struct Renderer {
    controls: Arc<Controls>,
    ring: rtrb::Consumer<f32>,
    fade: f32,
    preroll: usize,
    gain: f32,
    buffering: bool,
    halted: bool,
}

impl Renderer {
    pub fn new(controls: Arc<Controls>, ring: rtrb::Consumer<f32>, rate: u32) -> Self {
        Self {
            controls,
            ring,
            fade: (rate * FADE_MS / 1000).max(1) as f32,
            preroll: (rate * PREROLL_MS / 1000) as usize,
            gain: 0.0,
            buffering: true,
            halted: false,
        }
    }

    /// Fills `out` (interleaved, `channels` per frame) with mono audio from the ring.
    pub fn render<T: DeviceSample>(&mut self, out: &mut [T], channels: usize) {
        let c = &self.controls;
        let stop = c.stop.load(Ordering::Relaxed);
        let done = c.input_done.load(Ordering::Relaxed);
        let paused = c.paused.load(Ordering::Relaxed);
        let mut avail = self.ring.slots();
        if self.buffering && (avail >= self.preroll || done) {
            self.buffering = false;
        }
        let step = 1.0 / self.fade;
        let mut played = 0u64;
        for frame in out.chunks_mut(channels.max(1)) {
            let mut v = 0.0f32;
            let running = !self.buffering && !paused;
            if stop {
                // Fade out what is playing, then silence.
                if self.gain > 0.0 && avail > 0 {
                    v = self.ring.pop().unwrap_or(0.0) * self.gain;
                    avail -= 1;
                }
                self.gain = (self.gain - step).max(0.0);
            } else if paused {
                // Fade out what is playing, then hold the rest.
                if self.gain > 0.0 && avail > 0 {
                    v = self.ring.pop().unwrap_or(0.0) * self.gain;
                    avail -= 1;
                    played += 1;
                }
                self.gain = (self.gain - step).max(0.0);
            } else if running && avail > 0 {
                // Reach zero gain by the last buffered sample unless the input is complete.
                let ceiling = if done { 1.0 } else { avail as f32 / self.fade };
                self.gain = (self.gain + step).min(1.0).min(ceiling);
                v = self.ring.pop().unwrap_or(0.0) * self.gain;
                avail -= 1;
                played += 1;
                if avail == 0 && !done {
                    self.buffering = true;
                    c.underruns.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                self.gain = 0.0;
            }
            // Protect ears and speakers from out-of-range model output.
            let v = if v.is_nan() { 0.0 } else { v.clamp(-1.0, 1.0) };
            for s in frame.iter_mut() {
                *s = T::from_f32(v);
            }
        }
        if stop && self.gain == 0.0 {
            // Faded out: drop what is buffered and report.
            while self.ring.pop().is_ok() {}
            self.halted = true;
            c.stopped.store(true, Ordering::Release);
        } else if !stop && self.halted {
            // Restarted after a flush: wait for a new pre-roll.
            self.halted = false;
            self.buffering = true;
        }
        c.played.fetch_add(played, Ordering::Relaxed);
    }

    /// Whether everything buffered has been played.
    pub fn drained(&self) -> bool {
        self.ring.is_empty()
    }
}

/// A sample type an output device may want.
pub trait DeviceSample: Copy {
    fn from_f32(v: f32) -> Self;
}

#[cfg(feature = "playback")]
impl<T: cpal::SizedSample + cpal::FromSample<f32>> DeviceSample for T {
    fn from_f32(v: f32) -> Self {
        <T as cpal::Sample>::from_sample(v)
    }
}

#[cfg(not(feature = "playback"))]
impl DeviceSample for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
}

#[cfg(feature = "playback")]
type Stream = cpal::Stream;
/// Without the sound card no stream can exist.
#[cfg(not(feature = "playback"))]
type Stream = std::convert::Infallible;

/// An output device, opened and fed by a ring.
struct Opened {
    stream: Stream,
    ring: rtrb::Producer<f32>,
    controls: Arc<Controls>,
    rate: u32,
    channels: u16,
    device_name: String,
}

#[cfg(not(feature = "playback"))]
fn open_device() -> Result<Opened> {
    Err(Error::Audio(
        "this voxtrald was built without sound output (cargo feature `playback`): write to a \
         file with --out, or use a build with it"
            .into(),
    ))
}

#[cfg(feature = "playback")]
fn open_device() -> Result<Opened> {
    use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
    let host = cpal::default_host();
    let device = host
        .default_output_device()
        .ok_or_else(|| Error::Audio("no audio output device found".into()))?;
    let device_name = device.to_string();
    let supported = device.default_output_config().map_err(|e| {
        device_error(
            &format!("the audio device {device_name} is not available"),
            e,
        )
    })?;
    let config = supported.config();
    let rate = config.sample_rate;
    let channels = config.channels;
    let (producer, consumer) = rtrb::RingBuffer::new((rate * RING_SECONDS) as usize);
    let controls = Arc::new(Controls::default());
    let mut renderer = Renderer::new(controls.clone(), consumer, rate);
    let ch = channels as usize;
    let errors = controls.clone();
    let err = move |e: cpal::Error| {
        errors.device_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(error = %e, "audio stream error");
    };
    macro_rules! build {
        ($t:ty) => {
            device.build_output_stream::<$t, _, _>(
                config.clone(),
                move |out: &mut [$t], _| renderer.render(out, ch),
                err,
                None,
            )
        };
    }
    let stream = match supported.sample_format() {
        cpal::SampleFormat::F32 => build!(f32),
        cpal::SampleFormat::I16 => build!(i16),
        cpal::SampleFormat::U16 => build!(u16),
        cpal::SampleFormat::I32 => build!(i32),
        cpal::SampleFormat::F64 => build!(f64),
        other => {
            return Err(Error::Audio(format!(
                "the audio device {device_name} wants unsupported sample format {other:?}"
            )))
        }
    }
    .map_err(|e| device_error(&format!("cannot open the audio device {device_name}"), e))?;
    stream
        .play()
        .map_err(|e| device_error(&format!("cannot start the audio device {device_name}"), e))?;
    Ok(Opened {
        stream,
        ring: producer,
        controls,
        rate,
        channels,
        device_name,
    })
}

/// An open output stream with its feeding side.
pub struct Player {
    _stream: Stream,
    ring: rtrb::Producer<f32>,
    controls: Arc<Controls>,
    resampler: StreamResampler,
    pub device_rate: u32,
    source_rate: u32,
    pub channels: u16,
    pub device_name: String,
    scratch: Vec<f32>,
}

#[cfg(feature = "playback")]
fn device_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Audio(format!("{what}: {e}"))
}

impl Player {
    /// Opens the default output device for audio at `source_rate`.
    pub fn open_default(source_rate: u32) -> Result<Self> {
        let o = open_device()?;
        tracing::info!(device = %o.device_name, rate = o.rate, channels = o.channels, "playback opened");
        Ok(Self {
            _stream: o.stream,
            ring: o.ring,
            controls: o.controls,
            resampler: StreamResampler::new(source_rate, o.rate)?,
            device_rate: o.rate,
            source_rate,
            channels: o.channels,
            device_name: o.device_name,
            scratch: Vec::new(),
        })
    }

    pub fn controls(&self) -> &Arc<Controls> {
        &self.controls
    }

    /// Queues audio; waits while the ring is full.
    pub fn write(&mut self, samples: &[f32]) -> Result<()> {
        self.controls.input_done.store(false, Ordering::Release);
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        self.resampler.push(samples, &mut buf)?;
        self.enqueue(&buf)?;
        self.scratch = buf;
        Ok(())
    }

    fn enqueue(&mut self, mut buf: &[f32]) -> Result<()> {
        while !buf.is_empty() {
            if self.controls.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let n = self.ring.slots().min(buf.len());
            if n == 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            if let Ok(mut chunk) = self.ring.write_chunk_uninit(n) {
                let (a, b) = chunk.as_mut_slices();
                let k = a.len();
                for (d, s) in a.iter_mut().zip(&buf[..k]) {
                    d.write(*s);
                }
                for (d, s) in b.iter_mut().zip(&buf[k..n]) {
                    d.write(*s);
                }
                // SAFETY: all n slots were written just above.
                unsafe { chunk.commit_all() };
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    /// The end of an utterance: plays the tail without waiting for more, keeps the device open.
    pub fn end_of_input(&mut self) -> Result<()> {
        let mut tail = Vec::new();
        self.resampler.finish(&mut tail)?;
        self.enqueue(&tail)?;
        self.resampler = StreamResampler::new(self.source_rate, self.device_rate)?;
        self.controls.input_done.store(true, Ordering::Release);
        Ok(())
    }

    /// Fades out and discards everything buffered; the player stays usable.
    pub fn flush(&mut self) -> Result<()> {
        self.controls.stop.store(true, Ordering::Release);
        let start = Instant::now();
        while !self.controls.stopped.load(Ordering::Acquire)
            && start.elapsed() < Duration::from_millis(500)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        self.resampler = StreamResampler::new(self.source_rate, self.device_rate)?;
        self.controls.stopped.store(false, Ordering::Release);
        self.controls.stop.store(false, Ordering::Release);
        Ok(())
    }

    /// No more audio: plays out the rest and waits until it has been heard.
    pub fn finish(mut self) -> Result<()> {
        let mut tail = Vec::new();
        self.resampler.finish(&mut tail)?;
        self.enqueue(&tail)?;
        self.controls.input_done.store(true, Ordering::Release);
        let cap = self.ring.buffer().capacity();
        let start = Instant::now();
        let budget = Duration::from_secs(RING_SECONDS as u64 + 5);
        while self.ring.slots() < cap && start.elapsed() < budget {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Let the device play its own buffer.
        std::thread::sleep(Duration::from_millis(150));
        let c = &self.controls;
        let (underruns, device_errors) = (
            c.underruns.load(Ordering::Relaxed),
            c.device_errors.load(Ordering::Relaxed),
        );
        let played_s = c.played.load(Ordering::Relaxed) as f64 / self.device_rate as f64;
        if underruns + device_errors > 0 {
            tracing::warn!(underruns, device_errors, played_s, "playback had gaps");
        } else {
            tracing::info!(underruns, device_errors, played_s, "playback finished");
        }
        Ok(())
    }

    /// Stops at once with a short fade; discards what is buffered.
    pub fn stop(self) {
        self.controls.stop.store(true, Ordering::Release);
        let start = Instant::now();
        while !self.controls.stopped.load(Ordering::Acquire)
            && start.elapsed() < Duration::from_millis(200)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(rate: u32, cap: usize) -> (Arc<Controls>, rtrb::Producer<f32>, Renderer) {
        let c = Arc::new(Controls::default());
        let (p, r) = rtrb::RingBuffer::new(cap);
        let rend = Renderer::new(c.clone(), r, rate);
        (c, p, rend)
    }

    fn max_step(x: &[f32]) -> f32 {
        x.windows(2)
            .map(|w| (w[1] - w[0]).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn waits_for_preroll_then_plays_continuously() {
        let (c, mut p, mut r) = setup(1000, 10_000); // 1 kHz: preroll 150, fade 8
        for _ in 0..100 {
            p.push(0.5).unwrap();
        }
        let mut out = vec![0f32; 50];
        r.render(&mut out, 1);
        assert!(out.iter().all(|&v| v == 0.0), "nothing before pre-roll");
        for _ in 0..100 {
            p.push(0.5).unwrap();
        }
        c.input_done.store(true, Ordering::Relaxed);
        let mut out = vec![0f32; 400];
        r.render(&mut out, 1);
        // Fades in over 8 samples, then exactly the input, then silence.
        assert!((out[0] - 0.5 / 8.0).abs() < 1e-6);
        assert!(out[8..200].iter().all(|&v| v == 0.5));
        assert!(out[200..].iter().all(|&v| v == 0.0));
        assert!(max_step(&out[..200]) <= 0.5 / 8.0 + 1e-6);
        assert_eq!(c.underruns.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn underrun_fades_out_and_resumes_after_refill() {
        let (c, mut p, mut r) = setup(1000, 10_000);
        for _ in 0..200 {
            p.push(0.8).unwrap();
        }
        let mut out = vec![0f32; 300];
        r.render(&mut out, 2); // stereo: 150 frames
        assert!(out.chunks(2).all(|f| f[0] == f[1]));
        for _ in 0..50 {
            // Generation slower than real time: the ring runs dry.
            let mut more = vec![0f32; 200];
            r.render(&mut more, 2);
            out.extend(more);
        }
        assert_eq!(c.underruns.load(Ordering::Relaxed), 1);
        let left: Vec<f32> = out.chunks(2).map(|f| f[0]).collect();
        assert!(
            max_step(&left) <= 0.8 / 8.0 + 1e-6,
            "click: {}",
            max_step(&left)
        );
        assert_eq!(c.played.load(Ordering::Relaxed), 200);
        // Refill: playback resumes once the pre-roll is there, fading in.
        for _ in 0..160 {
            p.push(0.8).unwrap();
        }
        let mut out2 = vec![0f32; 40];
        r.render(&mut out2, 1);
        assert!(out2[0] > 0.0 && out2[0] < 0.8 / 4.0);
        assert!(max_step(&out2) <= 0.8 / 8.0 + 1e-6);
    }

    #[test]
    fn stop_fades_out_within_the_fade_length() {
        let (c, mut p, mut r) = setup(1000, 10_000);
        for _ in 0..1000 {
            p.push(1.0).unwrap();
        }
        let mut out = vec![0f32; 200];
        r.render(&mut out, 1);
        c.stop.store(true, Ordering::Relaxed);
        let mut tail = vec![0f32; 20];
        r.render(&mut tail, 1);
        assert!(c.stopped.load(Ordering::Relaxed));
        assert!(tail[8..].iter().all(|&v| v == 0.0));
        // The rest was discarded; after the stop is lifted, new audio plays after a pre-roll.
        assert_eq!(p.slots(), 10_000);
        c.stop.store(false, Ordering::Relaxed);
        c.stopped.store(false, Ordering::Relaxed);
        let mut idle = vec![0f32; 10];
        r.render(&mut idle, 1);
        for _ in 0..200 {
            p.push(0.5).unwrap();
        }
        let mut again = vec![0f32; 20];
        r.render(&mut again, 1);
        assert!(again[10] > 0.0);
        let mut all = out.clone();
        all.extend(&tail);
        assert!(max_step(&all) <= 1.0 / 8.0 + 1e-6);
    }

    #[test]
    fn pause_holds_audio() {
        let (c, mut p, mut r) = setup(1000, 10_000);
        for _ in 0..300 {
            p.push(0.25).unwrap();
        }
        c.input_done.store(true, Ordering::Relaxed);
        let mut out = vec![0f32; 100];
        r.render(&mut out, 1);
        c.paused.store(true, Ordering::Relaxed);
        let mut paused = vec![1f32; 100];
        r.render(&mut paused, 1);
        // A short fade, then silence while the audio is held.
        assert!(paused[8..].iter().all(|&v| v == 0.0));
        assert!(max_step(&[&out[..], &paused[..]].concat()) <= 0.25 / 8.0 + 1e-6);
        c.paused.store(false, Ordering::Relaxed);
        let mut rest = vec![0f32; 300];
        r.render(&mut rest, 1);
        assert_eq!(c.played.load(Ordering::Relaxed), 300);
    }
}
