//! The synthesis engine: one worker thread owns the model; requests wait in a priority queue
//! and each yields a stream of events. Long texts are spoken sentence by sentence; a job can be
//! cancelled at any frame and higher-priority work takes over at sentence boundaries.

pub mod text;

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::audio::stretch::{Stretcher, MAX_RATE, MIN_RATE};
use crate::model::noise::SeededNoise;
use crate::model::prompt::PromptTokens;
use crate::model::stream::{ChunkSchedule, StreamingDecoder};
use crate::model::{GenerateOptions, Voxtral, DEFAULT_CFG_ALPHA, DEFAULT_MAX_FRAMES};
use crate::{Error, Result};

pub type JobId = u64;

/// Speech Dispatcher's message priorities, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Priority {
    /// Never cancelled by other requests; goes before everything else.
    Important,
    /// Cancels queued and playing text and notifications.
    Message,
    /// Queued in order.
    Text,
    /// Dropped when anything else is queued or speaking.
    Notification,
    /// Only the latest queued one is kept.
    Progress,
}

impl Priority {
    fn rank(self) -> u8 {
        match self {
            Priority::Important => 0,
            Priority::Message => 1,
            Priority::Text => 2,
            // Progress reports are worth more than ephemeral notifications.
            Priority::Progress => 3,
            Priority::Notification => 4,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SpeechRequest {
    pub text: String,
    pub voice: String,
    pub priority: Priority,
    pub seed: u64,
    pub cfg_alpha: f32,
    /// Frame cap per sentence.
    pub max_frames: usize,
    /// Speaking rate, 1.0 = as generated (pitch is kept; see `audio::stretch`).
    pub rate: f32,
}

impl SpeechRequest {
    pub fn new(text: impl Into<String>, voice: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            voice: voice.into(),
            priority: Priority::Text,
            seed: 0,
            cfg_alpha: DEFAULT_CFG_ALPHA,
            max_frames: DEFAULT_MAX_FRAMES,
            rate: 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Started,
    /// The sentence at this character range of the text is next; its audio follows.
    Sentence {
        range: Range<usize>,
    },
    /// Mono PCM at the model's rate; `offset` is the first sample's index in the job's audio.
    Audio {
        offset: u64,
        samples: Vec<f32>,
    },
    Finished {
        frames: usize,
        seconds: f64,
        rtf: f64,
    },
    Failed {
        reason: String,
    },
    Cancelled {
        reason: String,
    },
}

impl Event {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::Finished { .. } | Event::Failed { .. } | Event::Cancelled { .. }
        )
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub schedule: ChunkSchedule,
    /// Sentences longer than this are cut at clause boundaries.
    pub max_sentence_chars: usize,
    /// Events buffered per job before the engine waits for the consumer.
    pub event_buffer: usize,
    /// Largest accepted text.
    pub max_text_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            schedule: ChunkSchedule::default(),
            max_sentence_chars: 300,
            event_buffer: 32,
            max_text_bytes: 1 << 20,
        }
    }
}

/// The consumer's end of one request.
pub struct Job {
    pub id: JobId,
    events: Receiver<Event>,
    control: Arc<Control>,
    done: bool,
}

/// Shared between a job's handle and the worker.
struct Control {
    /// Held while checking and sending, so once `cancel` returns no audio is sent.
    cancelled: Mutex<Option<String>>,
    frames: AtomicUsize,
}

impl Job {
    /// The next event; `None` after the terminal one. Audio still buffered when the job was
    /// cancelled is dropped.
    pub fn recv(&mut self) -> Option<Event> {
        self.recv_timeout(Duration::MAX).ok().flatten()
    }

    /// Like [`Job::recv`] with a timeout; `Err(())` on timeout.
    #[allow(clippy::result_unit_err)]
    pub fn recv_timeout(&mut self, timeout: Duration) -> std::result::Result<Option<Event>, ()> {
        if self.done {
            return Ok(None);
        }
        let deadline = Instant::now().checked_add(timeout);
        loop {
            let left = deadline.map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(Instant::now())
            });
            let ev = match self.events.recv_timeout(left) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) if deadline.is_some() => return Err(()),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    self.done = true;
                    return Ok(None);
                }
            };
            if matches!(ev, Event::Audio { .. }) && self.is_cancelled() {
                continue;
            }
            self.done = ev.is_terminal();
            return Ok(Some(ev));
        }
    }

    pub fn is_cancelled(&self) -> bool {
        lock(&self.control.cancelled).is_some()
    }

    /// Frames generated so far.
    pub fn frames(&self) -> usize {
        self.control.frames.load(Ordering::SeqCst)
    }
}

struct Queued {
    id: JobId,
    seq: u64,
    req: SpeechRequest,
    tx: SyncSender<Event>,
    control: Arc<Control>,
    sentences: Vec<Range<usize>>,
    next_sentence: usize,
    offset: u64,
    frames: usize,
    started: Option<Instant>,
}

#[derive(Default)]
struct State {
    queue: Vec<Queued>,
    /// The job the worker holds, with its priority.
    current: Option<(JobId, Priority, Arc<Control>)>,
    next_id: JobId,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    model: Arc<Voxtral>,
    cfg: EngineConfig,
}

pub struct Engine {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn cancel_control(c: &Control, reason: &str) -> bool {
    let mut g = lock(&c.cancelled);
    if g.is_some() {
        return false;
    }
    *g = Some(reason.to_string());
    true
}

impl Engine {
    pub fn new(model: Arc<Voxtral>, cfg: EngineConfig) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                next_id: 1,
                ..Default::default()
            }),
            wake: Condvar::new(),
            model,
            cfg,
        });
        let s = shared.clone();
        let worker = std::thread::Builder::new()
            .name("voxtrald-engine".into())
            .spawn(move || worker(s))
            .expect("spawning the engine thread");
        Self {
            shared,
            worker: Some(worker),
        }
    }

    pub fn model(&self) -> &Arc<Voxtral> {
        &self.shared.model
    }

    /// Queues a request. Bad input (empty or huge text, unknown voice) fails here, at once.
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
                "rate {} is outside {MIN_RATE}..={MAX_RATE}",
                req.rate
            )));
        }
        self.shared.model.voice(&req.voice)?;
        let sentences = text::split_sentences(&req.text, cfg.max_sentence_chars);
        let (tx, rx) = sync_channel(cfg.event_buffer.max(1));
        let control = Arc::new(Control {
            cancelled: Mutex::new(None),
            frames: AtomicUsize::new(0),
        });
        let mut st = lock(&self.shared.state);
        let id = st.next_id;
        st.next_id += 1;
        let job = Job {
            id,
            events: rx,
            control: control.clone(),
            done: false,
        };
        let busy = st.current.is_some() || !st.queue.is_empty();
        let p = req.priority;
        let queued = Queued {
            id,
            seq: id,
            req,
            tx,
            control,
            sentences,
            next_sentence: 0,
            offset: 0,
            frames: 0,
            started: None,
        };
        if p == Priority::Notification && busy {
            let _ = queued.tx.try_send(Event::Cancelled {
                reason: "dropped: other speech in progress".into(),
            });
            cancel_control(&queued.control, "dropped");
            return Ok(job);
        }
        // Who this request displaces. Progress is only replaced by newer progress, so the
        // last report of a series is always spoken.
        let displaced = |q: Priority| match p {
            Priority::Important | Priority::Text => q == Priority::Notification,
            Priority::Message => matches!(q, Priority::Text | Priority::Notification),
            Priority::Notification => false,
            Priority::Progress => q == Priority::Notification,
        };
        let reason = format!("displaced by a {p:?} request").to_lowercase();
        st.queue.retain(|q| {
            let older_progress = p == Priority::Progress && q.req.priority == Priority::Progress;
            if displaced(q.req.priority) || older_progress {
                cancel_control(&q.control, &reason);
                let _ = q.tx.try_send(Event::Cancelled {
                    reason: reason.clone(),
                });
                false
            } else {
                true
            }
        });
        if let Some((_, cp, c)) = &st.current {
            if displaced(*cp) {
                cancel_control(c, &reason);
            }
        }
        st.queue.push(queued);
        drop(st);
        self.shared.wake.notify_all();
        Ok(job)
    }

    /// Cancels a job, queued or speaking. Returns false if it is unknown or already over.
    pub fn cancel(&self, id: JobId) -> bool {
        let mut st = lock(&self.shared.state);
        if let Some(i) = st.queue.iter().position(|q| q.id == id) {
            let q = st.queue.remove(i);
            let fresh = cancel_control(&q.control, "cancelled");
            let _ = q.tx.try_send(Event::Cancelled {
                reason: "cancelled".into(),
            });
            return fresh;
        }
        match &st.current {
            Some((cid, _, c)) if *cid == id => cancel_control(c, "cancelled"),
            _ => false,
        }
    }

    /// Cancels everything queued and speaking.
    pub fn cancel_all(&self) {
        let ids: Vec<JobId> = {
            let st = lock(&self.shared.state);
            st.queue
                .iter()
                .map(|q| q.id)
                .chain(st.current.as_ref().map(|c| c.0))
                .collect()
        };
        for id in ids {
            self.cancel(id);
        }
    }

    /// Jobs waiting, plus the one speaking.
    pub fn queue_len(&self) -> usize {
        let st = lock(&self.shared.state);
        st.queue.len() + usize::from(st.current.is_some())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.cancel_all();
        lock(&self.shared.state).shutdown = true;
        self.shared.wake.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// Sends an event unless the job was cancelled; waits while the consumer's buffer is full.
/// Returns false when the job must stop (cancelled, or its consumer is gone).
fn send(job: &Queued, ev: Event) -> bool {
    let mut ev = ev;
    loop {
        {
            let g = lock(&job.control.cancelled);
            if g.is_some() {
                return false;
            }
            match job.tx.try_send(ev) {
                Ok(()) => return true,
                Err(TrySendError::Disconnected(_)) => {
                    drop(g);
                    cancel_control(&job.control, "the client went away");
                    return false;
                }
                Err(TrySendError::Full(e)) => ev = e,
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Delivers a job's last event even when its buffer is full of audio the consumer will skip;
/// gives up after a second if nobody reads.
fn send_final(job: &Queued, ev: Event) {
    let mut ev = ev;
    for _ in 0..500 {
        match job.tx.try_send(ev) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => return,
            Err(TrySendError::Full(e)) => ev = e,
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn worker(shared: Arc<Shared>) {
    loop {
        let mut job = {
            let mut st = lock(&shared.state);
            loop {
                if st.shutdown {
                    return;
                }
                if !st.queue.is_empty() {
                    break;
                }
                st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
            }
            let best = (0..st.queue.len())
                .min_by_key(|&i| (st.queue[i].req.priority.rank(), st.queue[i].seq))
                .unwrap_or(0);
            let job = st.queue.remove(best);
            st.current = Some((job.id, job.req.priority, job.control.clone()));
            job
        };
        // A panic in the model code (a bug, or a device failure that candle turns into one)
        // fails this request only; the engine goes on with the next.
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            speak_next_sentence(&shared, &mut job)
        }))
        .unwrap_or_else(|payload| {
            let what = crate::error::panic_message(payload.as_ref());
            tracing::error!(job = job.id, %what, "synthesis panicked");
            Err(Error::Internal(what))
        });
        let mut st = lock(&shared.state);
        st.current = None;
        let cancelled = lock(&job.control.cancelled).clone();
        match (outcome, cancelled) {
            (_, Some(reason)) => {
                drop(st);
                send_final(&job, Event::Cancelled { reason });
            }
            (Err(e), None) => {
                drop(st);
                tracing::warn!(job = job.id, error = %e, "synthesis failed");
                send_final(
                    &job,
                    Event::Failed {
                        reason: e.to_string(),
                    },
                );
            }
            (Ok(()), None) if job.next_sentence < job.sentences.len() => {
                // More to say: back in the queue, keeping its place in its class.
                st.queue.push(job);
            }
            (Ok(()), None) => {
                drop(st);
                let secs = job.offset as f64 / shared.model.sample_rate() as f64;
                let took = job.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
                let _ = send(
                    &job,
                    Event::Finished {
                        frames: job.frames,
                        seconds: secs,
                        rtf: took / secs.max(1e-9),
                    },
                );
            }
        }
    }
}

/// Generates and streams one sentence of `job`.
fn speak_next_sentence(shared: &Shared, job: &mut Queued) -> Result<()> {
    let model = &shared.model;
    if job.started.is_none() {
        job.started = Some(Instant::now());
        if !send(job, Event::Started) {
            return Ok(());
        }
    }
    let Some(range) = job.sentences.get(job.next_sentence).cloned() else {
        return Ok(());
    };
    let text = text::char_slice(&job.req.text, &range);
    #[cfg(test)]
    if text.contains(tests::PANIC_MARK) {
        panic!("injected fault");
    }
    // A sentence that could not fit the context with its audio is split in two.
    let rows = model.voice(&job.req.voice)?.dim(0)?;
    let budget = model
        .backbone()
        .max_positions()
        .saturating_sub(rows + PromptTokens::OVERHEAD)
        / 7;
    let prompt = model.prompt(&job.req.voice, &text);
    let too_long = match &prompt {
        Ok(p) => p.ids.len() - rows - PromptTokens::OVERHEAD > budget.max(1),
        Err(Error::ContextOverflow { .. }) => true,
        Err(_) => false,
    };
    if too_long && range.len() > 1 {
        let chars: Vec<char> = text.chars().collect();
        let half = chars.len() / 2;
        let (head, tail) = match (1..half).rev().find(|&i| chars[i].is_whitespace()) {
            Some(space) => (
                range.start..range.start + space,
                range.start + space + 1..range.end,
            ),
            None => (
                range.start..range.start + half,
                range.start + half..range.end,
            ),
        };
        job.sentences
            .splice(job.next_sentence..=job.next_sentence, [head, tail]);
        return Ok(());
    }
    let prompt = prompt?;
    job.next_sentence += 1;
    if !send(job, Event::Sentence { range }) {
        return Ok(());
    }
    let seed = job.req.seed.wrapping_add(job.next_sentence as u64 - 1);
    let opts = GenerateOptions {
        max_frames: job.req.max_frames,
        cfg_alpha: job.req.cfg_alpha,
    };
    let mut gen = model.start(&prompt, Box::new(SeededNoise::new(seed)), &opts)?;
    let mut dec = StreamingDecoder::new(shared.cfg.schedule);
    let mut rate = Stretcher::new(job.req.rate);
    let mut out = Vec::new();
    loop {
        if lock(&job.control.cancelled).is_some() {
            return Ok(());
        }
        let frame = match gen.next_frame() {
            Ok(Some(f)) => f,
            Ok(None) => break,
            // A sentence with no audio (e.g. only punctuation) is skipped, not fatal.
            Err(Error::NoAudio) => break,
            Err(e) => return Err(e),
        };
        job.frames += 1;
        job.control.frames.fetch_add(1, Ordering::SeqCst);
        if let Some(samples) = dec.push(model.codec(), frame.codes)? {
            rate.push(&samples, &mut out);
            if !emit_audio(job, std::mem::take(&mut out)) {
                return Ok(());
            }
        }
    }
    rate.push(&dec.flush(model.codec())?, &mut out);
    rate.finish(&mut out);
    emit_audio(job, out);
    Ok(())
}

fn emit_audio(job: &mut Queued, samples: Vec<f32>) -> bool {
    if samples.is_empty() {
        return true;
    }
    let n = samples.len() as u64;
    let ok = send(
        job,
        Event::Audio {
            offset: job.offset,
            samples,
        },
    );
    if ok {
        job.offset += n;
    }
    ok
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
    use crate::model::LoadOptions;

    /// Text that makes the engine panic mid-request (tests only).
    pub(super) const PANIC_MARK: &str = "[[panic]]";

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
