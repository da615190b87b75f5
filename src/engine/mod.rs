//! The synthesis engine: one worker thread owns the model; requests wait in a priority queue
//! and each yields a stream of events. Long texts are spoken sentence by sentence; a job can be
//! cancelled at any frame and higher-priority work takes over at sentence boundaries.
//!
//! The daemon's own output speaks one job at a time; jobs whose audio goes back to their
//! clients run together, and every job being spoken advances by one frame in one shared
//! decoding step, so the weights are read once per frame for all of them.
//!
//! - `request.rs`: what is asked and what comes back;
//! - `job.rs`: the consumer's handle and its bounded mailbox;
//! - `policy.rs`: Speech Dispatcher's displacement and admission rules;
//! - `worker.rs`: the worker's loop and the shared decoding step;
//! - `utterance.rs`: one job's sentences, from text to audio.

mod job;
mod policy;
mod request;
mod utterance;
mod worker;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use job::{EventSender, Job};
pub use request::{Destination, Event, Interface, JobId, Priority, SpeechRequest};

use crate::audio::prosody::{MAX_PITCH, MAX_RATE, MIN_PITCH, MIN_RATE};
use crate::model::stream::ChunkSchedule;
use crate::model::Voxtral;
use crate::model::MAX_CFG_ALPHA;
use crate::text::lexicon::Lexicon;
use crate::text::sentences::{cut_at, split_sentences};
use crate::{Error, Result};
use job::{lock, Control};
use worker::{Queued, Shared, State};

/// Client jobs decoded together by default: on a CPU four share a step for about 2.7 times the
/// throughput of one; on a GPU a step of eight costs little more than a step of one.
pub const DEFAULT_MAX_STREAMS: usize = 8;

/// How long a client may take nothing before its job is cancelled.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub schedule: ChunkSchedule,
    /// Sentences longer than this are cut at clause boundaries.
    pub max_sentence_chars: usize,
    /// Events buffered per job before the job waits for its consumer.
    pub event_buffer: usize,
    /// Largest accepted text.
    pub max_text_bytes: usize,
    /// Client jobs decoded together; the speaker's job is one more.
    pub max_streams: usize,
    /// A client job whose consumer takes nothing for this long is cancelled. A consumer that
    /// reads slowly (at playback pace, say) only slows its own job.
    pub stall_timeout: Duration,
    /// Words said differently from how they are written.
    pub lexicon: Option<Arc<Lexicon>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            schedule: ChunkSchedule::default(),
            max_sentence_chars: 300,
            event_buffer: 32,
            max_text_bytes: 1 << 20,
            max_streams: DEFAULT_MAX_STREAMS,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            lexicon: None,
        }
    }
}

pub struct Engine {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

impl Engine {
    pub fn new(model: Arc<Voxtral>, cfg: EngineConfig) -> Self {
        if let Some(fit) = model.streams_that_fit() {
            if fit < cfg.max_streams + 1 {
                tracing::warn!(
                    fit,
                    max_streams = cfg.max_streams,
                    "--max-memory has room for {fit} streams' KV caches; streams beyond are \
                     refused"
                );
            }
        }
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_id: 1,
                ..Default::default()
            }),
            widest_step: AtomicUsize::new(0),
            widest_prefill: AtomicUsize::new(0),
            wake: Condvar::new(),
            ready: Default::default(),
            model,
            cfg,
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("voxtrald-engine".into())
            .spawn(move || worker::run(s))
            .expect("spawning the engine thread");
        Self {
            shared,
            worker: Some(worker),
        }
    }

    /// Blocks until the worker takes jobs: at once on the CPU, after the warm-up utterance on
    /// a GPU (jobs submitted before then wait in the queue).
    pub fn wait_ready(&self) {
        self.shared.ready.wait();
    }

    pub fn model(&self) -> &Arc<Voxtral> {
        &self.shared.model
    }

    /// Queues a request. Bad input (empty or huge text, unknown voice, rate, pitch, volume or
    /// guidance out of range, no frames allowed) fails here, at once.
    pub fn submit(&self, req: SpeechRequest) -> Result<Job> {
        let cfg = &self.shared.cfg;
        if req.text.len() > cfg.max_text_bytes {
            return Err(Error::InvalidInput(format!(
                "the text is {} bytes; the limit is {}",
                req.text.len(),
                cfg.max_text_bytes
            )));
        }
        if req.text.trim().is_empty() {
            return Err(Error::EmptyText);
        }
        if !(MIN_RATE..=MAX_RATE).contains(&req.rate) {
            return Err(Error::InvalidInput(format!(
                "speaking rate {} is outside {MIN_RATE} to {MAX_RATE}",
                req.rate
            )));
        }
        if !(MIN_PITCH..=MAX_PITCH).contains(&req.pitch) {
            return Err(Error::InvalidInput(format!(
                "pitch {} is outside {MIN_PITCH} to {MAX_PITCH}",
                req.pitch
            )));
        }
        if !(0.0..=MAX_CFG_ALPHA).contains(&req.cfg_alpha) {
            return Err(Error::InvalidInput(format!(
                "guidance strength {} is outside 0 to {MAX_CFG_ALPHA}",
                req.cfg_alpha
            )));
        }
        if req.max_frames == 0 {
            return Err(Error::InvalidInput("max_frames must be at least 1".into()));
        }
        if !(0.0..=1.0).contains(&req.volume) {
            return Err(Error::InvalidInput(format!(
                "volume {} is outside 0 to 1",
                req.volume
            )));
        }
        self.shared.model.voice(&req.voice)?;
        // SSML breaks and prosody spans begin and end pieces of their own.
        let sentences = cut_at(
            &req.text,
            &split_sentences(&req.text, cfg.max_sentence_chars),
            &req.markup.cuts(),
        );
        let control = Control::new();
        let mut st = lock(&self.shared.state);
        let id = st.next_id;
        st.next_id += 1;
        let (job, tx) = Job::new(id, cfg.event_buffer, control.clone());
        let p = req.priority;
        let speaker = req.destination == Destination::Speaker;
        let speaker_busy = st
            .running
            .iter()
            .map(|r| r.destination)
            .chain(st.queue.iter().map(|q| q.req.destination))
            .any(|d| d == Destination::Speaker);
        let queued = Queued {
            id,
            seq: id,
            req,
            tx,
            control,
            sentences,
            next_sentence: 0,
            offset: 0,
            submitted: Instant::now(),
            started: None,
            first_audio: None,
            marks_done: 0,
            breaks_done: 0,
            pace: utterance::TYPICAL_FRAMES_PER_CHAR,
        };
        // Clients mix their own audio: Speech Dispatcher's rules are for the speaker.
        if speaker {
            if policy::dropped_on_arrival(p, speaker_busy) {
                queued.control.cancel("dropped");
                queued.end_waiting("dropped: other speech in progress");
                return Ok(job);
            }
            let reason = policy::displaced_reason(p);
            st.queue.retain(|q| {
                let on_speaker = q.req.destination == Destination::Speaker;
                if on_speaker && policy::replaces_waiting(p, q.req.priority) {
                    q.control.cancel(&reason);
                    q.end_waiting(&reason);
                    false
                } else {
                    true
                }
            });
            for r in &st.running {
                if r.destination == Destination::Speaker && policy::displaces(p, r.priority) {
                    r.control.cancel(&reason);
                }
            }
        }
        st.queue.push(queued);
        drop(st);
        self.shared.wake.notify_all();
        Ok(job)
    }

    /// Cancels a job, queued or speaking. Returns false if it is unknown or already over.
    pub fn cancel(&self, id: JobId) -> bool {
        self.cancel_because(id, "cancelled")
    }

    /// [`Engine::cancel`], with the reason its consumer and the log are given.
    pub fn cancel_because(&self, id: JobId, reason: &str) -> bool {
        let mut st = lock(&self.shared.state);
        if let Some(i) = st.queue.iter().position(|q| q.id == id) {
            let q = st.queue.remove(i);
            let fresh = q.control.cancel(reason);
            q.end_waiting(reason);
            return fresh;
        }
        st.running
            .iter()
            .find(|r| r.id == id)
            .is_some_and(|r| r.control.cancel(reason))
    }

    /// Cancels everything queued and speaking.
    pub fn cancel_all(&self) {
        self.cancel_all_because("cancelled");
    }

    /// [`Engine::cancel_all`], with a reason.
    pub fn cancel_all_because(&self, reason: &str) {
        let ids: Vec<JobId> = {
            let st = lock(&self.shared.state);
            st.queue
                .iter()
                .map(|q| q.id)
                .chain(st.running.iter().map(|r| r.id))
                .collect()
        };
        for id in ids {
            self.cancel_because(id, reason);
        }
    }

    /// Jobs waiting, plus those speaking.
    pub fn queue_len(&self) -> usize {
        let st = lock(&self.shared.state);
        st.queue.len() + st.running.len()
    }

    /// The most jobs that have shared one decoding step so far.
    pub fn widest_step(&self) -> usize {
        self.shared.widest_step.load(Ordering::Relaxed)
    }

    /// The most prompts prefilled together in one pass so far.
    pub fn widest_prefill(&self) -> usize {
        self.shared.widest_prefill.load(Ordering::Relaxed)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.cancel_all_because("the engine is shutting down");
        lock(&self.shared.state).shutdown = true;
        self.shared.wake.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Sleeps until `f` holds or `timeout` passes; for tests and clients that poll.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::noise::NoiseSource;
    use crate::model::LoadOptions;

    /// Text that makes the engine panic mid-request (tests only).
    pub(super) const PANIC_MARK: &str = "[[panic]]";
    /// Text whose noise source panics, or fails, at its third frame: inside the shared step.
    const STEP_PANIC_MARK: &str = "[[step-panic]]";
    const STEP_ERROR_MARK: &str = "[[step-error]]";

    struct FaultyNoise {
        inner: Box<dyn NoiseSource>,
        panics: bool,
    }

    impl NoiseSource for FaultyNoise {
        fn fill(&mut self, frame: usize, out: &mut [f32]) -> Result<()> {
            match (frame, self.panics) {
                (2, true) => panic!("injected step fault"),
                (2, false) => Err(Error::InvalidInput("injected step error".into())),
                _ => self.inner.fill(frame, out),
            }
        }
    }

    /// The sentence's noise, faulty where its text asks for it.
    pub(super) fn faulty_noise(text: &str, inner: Box<dyn NoiseSource>) -> Box<dyn NoiseSource> {
        for (mark, panics) in [(STEP_PANIC_MARK, true), (STEP_ERROR_MARK, false)] {
            if text.contains(mark) {
                return Box::new(FaultyNoise { inner, panics });
            }
        }
        inner
    }

    fn tiny_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/voxtral-tiny")
    }

    fn client(text: &str, frames: usize) -> SpeechRequest {
        let mut r = SpeechRequest::new(text, "casual_male");
        r.max_frames = frames;
        r.destination = Destination::Client;
        r
    }

    /// Every event's samples, and the terminal event.
    fn drain(mut job: Job) -> (Vec<f32>, Event) {
        let mut audio = Vec::new();
        while let Some(ev) = job.recv() {
            match ev {
                Event::Audio { samples, .. } => audio.extend(samples),
                Event::Finished { .. } | Event::Failed { .. } | Event::Cancelled { .. } => {
                    return (audio, ev)
                }
                _ => {}
            }
        }
        panic!("no terminal event")
    }

    #[test]
    fn a_fault_inside_a_shared_step_fails_only_its_job() {
        let model = Arc::new(Voxtral::load(&tiny_dir(), &LoadOptions::default()).unwrap());
        let engine = Engine::new(model, EngineConfig::default());
        let good = "Good words go on.";
        let (alone, end) = drain(engine.submit(client(good, 8)).unwrap());
        assert!(matches!(end, Event::Finished { .. }), "{end:?}");
        for (mark, what) in [
            (STEP_PANIC_MARK, "injected step fault"),
            (STEP_ERROR_MARK, "injected step error"),
        ] {
            // Submitted together, so that they are admitted and stepped together.
            let a = engine.submit(client(good, 8)).unwrap();
            let b = engine
                .submit(client(&format!("Bad {mark} words."), 8))
                .unwrap();
            let c = engine.submit(client(good, 8)).unwrap();
            let ((a, ea), (_, eb), (c, ec)) = (drain(a), drain(b), drain(c));
            match eb {
                Event::Failed { reason } => assert!(reason.contains(what), "{reason}"),
                other => panic!("expected the faulty job to fail, got {other:?}"),
            }
            for (audio, end) in [(a, ea), (c, ec)] {
                assert!(matches!(end, Event::Finished { .. }), "{mark}: {end:?}");
                assert_eq!(audio.len(), alone.len(), "{mark}: all its audio");
                let worst = audio
                    .iter()
                    .zip(&alone)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 1e-3, "{mark}: differs from alone by {worst}");
            }
        }
        assert!(engine.widest_step() >= 3, "the jobs never shared a step");
        let (_, end) = drain(engine.submit(client(good, 3)).unwrap());
        assert!(matches!(end, Event::Finished { .. }));
    }

    #[test]
    fn a_stream_whose_cache_would_not_fit_is_refused_and_the_others_go_on() {
        let dir = tiny_dir();
        let cfg = crate::model::config::ModelConfig::from_file(&dir.join("params.json")).unwrap();
        let opts = LoadOptions::default();
        let plan = crate::model::memory::plan(
            &cfg,
            opts.dtype,
            opts.quant,
            opts.max_positions,
            &opts.device,
        )
        .unwrap();
        // Room for two streams' caches and half a third.
        let limit = plan.weights + plan.working + 2 * plan.kv_cache + plan.kv_cache / 2;
        let opts = LoadOptions {
            max_memory: Some(limit),
            ..opts
        };
        let model = Arc::new(Voxtral::load(&dir, &opts).unwrap());
        assert_eq!(model.streams_that_fit(), Some(2));
        let engine = Engine::new(model, EngineConfig::default());
        let jobs: Vec<Job> = (0..3)
            .map(|i| {
                engine
                    .submit(client(&format!("Stream {i} speaks."), 8))
                    .unwrap()
            })
            .collect();
        let ends: Vec<Event> = jobs.into_iter().map(|j| drain(j).1).collect();
        let refused: Vec<&String> = ends
            .iter()
            .filter_map(|e| match e {
                Event::Failed { reason } => Some(reason),
                _ => None,
            })
            .collect();
        assert_eq!(refused.len(), 1, "{ends:?}");
        assert!(refused[0].contains("another stream"), "{}", refused[0]);
        assert!(refused[0].contains("2 running"), "{}", refused[0]);
        let finished = ends
            .iter()
            .filter(|e| matches!(e, Event::Finished { .. }))
            .count();
        assert_eq!(finished, 2, "{ends:?}");
        // The memory came back with the streams.
        let (_, end) = drain(engine.submit(client("Once more.", 3)).unwrap());
        assert!(matches!(end, Event::Finished { .. }), "{end:?}");
    }

    #[test]
    fn a_panicking_request_fails_alone_and_the_engine_keeps_serving() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/voxtral-tiny");
        let model = Voxtral::load(&dir, &LoadOptions::default()).unwrap();
        let engine = Engine::new(Arc::new(model), EngineConfig::default());
        let run = |text: &str| {
            let mut r = SpeechRequest::new(text, "casual_male");
            r.max_frames = 3;
            let mut job = engine.submit(r).unwrap();
            let mut last = None;
            while let Some(ev) = job.recv() {
                last = Some(ev);
            }
            last.expect("a terminal event")
        };
        match run("Fine. Then [[panic]] here.") {
            Event::Failed { reason } => assert!(reason.contains("injected fault"), "{reason}"),
            other => panic!("expected a failure, got {other:?}"),
        }
        assert!(matches!(run("Still here."), Event::Finished { .. }));
    }
}
