//! The synthesis engine: one worker thread owns the model; requests wait in a priority queue
//! and each yields a stream of events. Long texts are spoken sentence by sentence; a job can be
//! cancelled at any frame and higher-priority work takes over at sentence boundaries.
//!
//! The daemon's own output speaks one job at a time; jobs whose audio goes back to their
//! clients run together, and every job being spoken advances by one frame in one shared
//! decoding step, so the weights are read once per frame for all of them.

pub mod lexicon;
pub mod ssml;
pub mod text;

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::audio::prosody::{Prosody, MAX_PITCH, MIN_PITCH};
use crate::audio::stretch::{MAX_RATE, MIN_RATE};
use crate::model::noise::SeededNoise;
use crate::model::prompt::PromptTokens;
use crate::model::stream::{ChunkSchedule, StreamingDecoder};
use crate::model::{
    Frame, GenerateOptions, Generation, Voxtral, DEFAULT_CFG_ALPHA, DEFAULT_MAX_FRAMES,
};
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

/// Where a job's audio goes, which decides whether it may overlap with other jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Destination {
    /// The daemon's own sound output: one utterance at a time, ordered and displaced by
    /// priority as Speech Dispatcher does.
    #[default]
    Speaker,
    /// The requester takes the audio (a Spiel pipe, a socket stream): such jobs are spoken
    /// together, sharing each decoding step, and their priority only orders them.
    Client,
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
    /// Pitch as a frequency ratio, 1.0 = as generated (duration is kept; see
    /// `audio::prosody`).
    pub pitch: f32,
    pub destination: Destination,
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
            pitch: 1.0,
            destination: Destination::Speaker,
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

/// Client jobs decoded together by default: on a CPU four share a step for about 2.7 times the
/// throughput of one; on a GPU a step of eight costs little more than a step of one.
pub const DEFAULT_MAX_STREAMS: usize = 8;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub schedule: ChunkSchedule,
    /// Sentences longer than this are cut at clause boundaries.
    pub max_sentence_chars: usize,
    /// Events buffered per job before the engine waits for the consumer.
    pub event_buffer: usize,
    /// Largest accepted text.
    pub max_text_bytes: usize,
    /// Client jobs decoded together; the speaker's job is one more.
    pub max_streams: usize,
    /// Words said differently from how they are written.
    pub lexicon: Option<Arc<lexicon::Lexicon>>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            schedule: ChunkSchedule::default(),
            max_sentence_chars: 300,
            event_buffer: 32,
            max_text_bytes: 1 << 20,
            max_streams: DEFAULT_MAX_STREAMS,
            lexicon: None,
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
    started: Option<Instant>,
}

/// A job the worker holds, as `submit` and `cancel` see it.
struct Running {
    id: JobId,
    priority: Priority,
    destination: Destination,
    control: Arc<Control>,
}

#[derive(Default)]
struct State {
    queue: Vec<Queued>,
    running: Vec<Running>,
    next_id: JobId,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    widest_step: AtomicUsize,
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
            widest_step: AtomicUsize::new(0),
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
        if !(MIN_PITCH..=MAX_PITCH).contains(&req.pitch) {
            return Err(Error::InvalidInput(format!(
                "pitch {} is outside {MIN_PITCH}..={MAX_PITCH}",
                req.pitch
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
        let p = req.priority;
        let speaker = req.destination == Destination::Speaker;
        let busy = st
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
            started: None,
        };
        if !speaker {
            // Clients mix their own audio: Speech Dispatcher's rules are for the speaker.
            st.queue.push(queued);
            drop(st);
            self.shared.wake.notify_all();
            return Ok(job);
        }
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
            let on_speaker = q.req.destination == Destination::Speaker;
            if on_speaker && (displaced(q.req.priority) || older_progress) {
                cancel_control(&q.control, &reason);
                let _ = q.tx.try_send(Event::Cancelled {
                    reason: reason.clone(),
                });
                false
            } else {
                true
            }
        });
        for r in &st.running {
            if r.destination == Destination::Speaker && displaced(r.priority) {
                cancel_control(&r.control, &reason);
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
        st.running
            .iter()
            .find(|r| r.id == id)
            .is_some_and(|r| cancel_control(&r.control, "cancelled"))
    }

    /// Cancels everything queued and speaking.
    pub fn cancel_all(&self) {
        let ids: Vec<JobId> = {
            let st = lock(&self.shared.state);
            st.queue
                .iter()
                .map(|q| q.id)
                .chain(st.running.iter().map(|r| r.id))
                .collect()
        };
        for id in ids {
            self.cancel(id);
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

/// One sentence being generated and streamed.
struct Utterance<'m> {
    gen: Generation<'m>,
    dec: StreamingDecoder,
    prosody: Prosody,
}

/// A job the worker holds, with the events it has made but not yet delivered. Delivery never
/// waits: a job whose consumer is behind keeps its events here and sits out the decoding
/// steps until they are taken, so a slow consumer (the sound card, a client) stalls only its
/// own job.
struct Active<'m> {
    job: Queued,
    utterance: Option<Utterance<'m>>,
    outbox: VecDeque<Event>,
    /// A sentence ended since the job was admitted; at this boundary it goes back to the queue
    /// so that more urgent work can take over.
    spoke: bool,
    /// The terminal event is in the outbox, since then.
    ending: Option<Instant>,
    /// The terminal event was delivered, or nobody is left to take it.
    done: bool,
}

/// How long a cancellation waits for a consumer whose buffer is full of audio it will skip.
/// Other endings wait as long as the consumer is there: it is reading, maybe at the pace of
/// playback.
const FINAL_DELIVERY: Duration = Duration::from_secs(1);

impl<'m> Active<'m> {
    fn new(job: Queued) -> Self {
        Self {
            job,
            utterance: None,
            outbox: VecDeque::new(),
            spoke: false,
            ending: None,
            done: false,
        }
    }

    fn cancelled(&self) -> Option<String> {
        lock(&self.job.control.cancelled).clone()
    }

    /// Ends the job with `ev`. A cancellation replaces whatever was not yet delivered, even
    /// another ending; other endings keep the audio before them.
    fn end(&mut self, ev: Event) {
        let cancel = matches!(ev, Event::Cancelled { .. });
        if self.done || (self.ending.is_some() && !cancel) {
            return;
        }
        if cancel {
            if matches!(self.outbox.back(), Some(Event::Cancelled { .. })) {
                return;
            }
            self.outbox.clear();
        }
        self.utterance = None;
        self.outbox.push_back(ev);
        self.ending = Some(Instant::now());
    }

    fn fail(&mut self, e: Error) {
        match self.cancelled() {
            Some(reason) => self.end(Event::Cancelled { reason }),
            None => {
                tracing::warn!(job = self.job.id, error = %e, "synthesis failed");
                self.end(Event::Failed {
                    reason: e.to_string(),
                });
            }
        }
    }

    /// Runs `f` on this job; an error or a panic (a bug, or a device failure that candle turns
    /// into one) fails this job only.
    fn guarded(&mut self, f: impl FnOnce(&mut Self) -> Result<()>) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)))
            .unwrap_or_else(|payload| Err(panicked(self.job.id, payload)));
        if let Err(e) = r {
            self.fail(e);
        }
    }

    /// Hands queued events to the consumer as far as its buffer takes them; true if any moved.
    fn deliver(&mut self) -> bool {
        if self.done {
            return false;
        }
        if let Some(reason) = self.cancelled() {
            self.end(Event::Cancelled { reason });
        }
        let mut moved = false;
        while let Some(ev) = self.outbox.pop_front() {
            let sent = if ev.is_terminal() {
                self.job.tx.try_send(ev)
            } else {
                // Checked and sent under the lock, so once `cancel` returns no audio goes out.
                let g = lock(&self.job.control.cancelled);
                if let Some(reason) = g.clone() {
                    drop(g);
                    self.end(Event::Cancelled { reason });
                    continue;
                }
                self.job.tx.try_send(ev)
            };
            match sent {
                Ok(()) => {
                    moved = true;
                    if self.ending.is_some() && self.outbox.is_empty() {
                        self.done = true;
                    }
                }
                Err(TrySendError::Full(ev)) => {
                    let cancelled = matches!(ev, Event::Cancelled { .. });
                    self.outbox.push_front(ev);
                    if cancelled && self.ending.is_some_and(|t| t.elapsed() > FINAL_DELIVERY) {
                        self.done = true;
                    }
                    break;
                }
                Err(TrySendError::Disconnected(_)) => {
                    cancel_control(&self.job.control, "the client went away");
                    self.outbox.clear();
                    self.utterance = None;
                    self.done = true;
                    break;
                }
            }
        }
        moved
    }

    /// Can take part in the next decoding step.
    fn ready(&self) -> bool {
        self.utterance.is_some()
            && self.outbox.is_empty()
            && self.ending.is_none()
            && !lock(&self.job.control.cancelled).is_some()
    }

    /// Between sentences with more to say.
    fn at_boundary(&self) -> bool {
        self.spoke
            && self.ending.is_none()
            && self.utterance.is_none()
            && self.outbox.is_empty()
            && self.job.next_sentence < self.job.sentences.len()
    }

    /// Queues audio for the consumer.
    fn emit(&mut self, samples: Vec<f32>) {
        if samples.is_empty() {
            return;
        }
        let n = samples.len() as u64;
        self.outbox.push_back(Event::Audio {
            offset: self.job.offset,
            samples,
        });
        self.job.offset += n;
    }

    /// Sets up the next sentence: splits it if it cannot fit the context, runs the prefill.
    fn begin_sentence(&mut self, model: &'m Voxtral, cfg: &EngineConfig) -> Result<()> {
        let job = &mut self.job;
        if job.started.is_none() {
            job.started = Some(Instant::now());
            self.outbox.push_back(Event::Started);
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
        // The model reads the user's pronunciations; the ranges stay on the text as sent.
        let said = match &cfg.lexicon {
            Some(lexicon) => lexicon.apply(&text),
            None => std::borrow::Cow::Borrowed(text.as_str()),
        };
        let prompt = model.prompt(&job.req.voice, &said);
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
            return self.begin_sentence(model, cfg);
        }
        let prompt = prompt?;
        job.next_sentence += 1;
        self.outbox.push_back(Event::Sentence { range });
        let seed = job.req.seed.wrapping_add(job.next_sentence as u64 - 1);
        let opts = GenerateOptions {
            max_frames: job.req.max_frames,
            cfg_alpha: job.req.cfg_alpha,
        };
        let gen = model.start(&prompt, Box::new(SeededNoise::new(seed)), &opts)?;
        self.utterance = Some(Utterance {
            gen,
            dec: StreamingDecoder::new(cfg.schedule),
            prosody: Prosody::new(model.sample_rate(), job.req.rate, job.req.pitch)?,
        });
        Ok(())
    }

    /// Takes this job's result of a decoding step: streams the frame, or ends the sentence.
    fn take_frame(&mut self, model: &Voxtral, frame: Result<Option<Frame>>) -> Result<()> {
        let Some(utt) = self.utterance.as_mut() else {
            return Ok(());
        };
        let mut out = Vec::new();
        match frame {
            Ok(Some(frame)) => {
                self.job.control.frames.fetch_add(1, Ordering::SeqCst);
                if let Some(samples) = utt.dec.push(model.codec(), frame.codes)? {
                    utt.prosody.push(&samples, &mut out)?;
                }
            }
            // A sentence with no audio (e.g. only punctuation) is skipped, not fatal.
            Ok(None) | Err(Error::NoAudio) => {
                utt.prosody.push(&utt.dec.flush(model.codec())?, &mut out)?;
                utt.prosody.finish(&mut out)?;
                self.utterance = None;
                self.spoke = true;
            }
            Err(e) => return Err(e),
        }
        self.emit(out);
        Ok(())
    }

    /// Queues `Finished` once the last sentence is out.
    fn finish_if_done(&mut self, sample_rate: u32) {
        if self.ending.is_some()
            || self.utterance.is_some()
            || self.job.next_sentence < self.job.sentences.len()
        {
            return;
        }
        let secs = self.job.offset as f64 / sample_rate as f64;
        let took = self.job.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.end(Event::Finished {
            frames: self.job.control.frames.load(Ordering::SeqCst),
            seconds: secs,
            rtf: took / secs.max(1e-9),
        });
    }
}

fn panicked(job: JobId, payload: Box<dyn std::any::Any + Send>) -> Error {
    let what = crate::error::panic_message(payload.as_ref());
    tracing::error!(job, %what, "synthesis panicked");
    Error::Internal(what)
}

/// The worker's loop: admit jobs, start their sentences, advance every ready one by a frame in
/// one shared step, deliver what they made.
fn worker(shared: Arc<Shared>) {
    let model: &Voxtral = &shared.model;
    let mut active: Vec<Active<'_>> = Vec::new();
    while settle(&shared, &mut active) {
        let mut progressed = false;
        // While some are mid-sentence, one prefill per step, so that a newcomer delays audio
        // already flowing by one prefill, not by one per newcomer.
        let mut prefills = if active.iter().any(|a| a.utterance.is_some()) {
            1
        } else {
            usize::MAX
        };
        for a in &mut active {
            progressed |= a.deliver();
            let fresh = a.utterance.is_none() && !a.spoke && a.ending.is_none() && !a.done;
            if fresh && prefills > 0 {
                prefills -= 1;
                progressed = true;
                a.guarded(|a| a.begin_sentence(model, &shared.cfg));
            }
        }
        progressed |= step(&shared, &mut active);
        for a in &mut active {
            a.finish_if_done(model.sample_rate());
            progressed |= a.deliver();
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Advances every ready job by one frame, all in one decoding step. Returns whether any did.
fn step<'m>(shared: &'m Shared, active: &mut [Active<'m>]) -> bool {
    let model: &Voxtral = &shared.model;
    let ready: Vec<usize> = (0..active.len()).filter(|&i| active[i].ready()).collect();
    if ready.is_empty() {
        return false;
    }
    shared.widest_step.fetch_max(ready.len(), Ordering::Relaxed);
    let results = {
        let mut gens: Vec<&mut Generation<'m>> = active
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| ready.binary_search(i).is_ok())
            .filter_map(|(_, a)| a.utterance.as_mut().map(|u| &mut u.gen))
            .collect();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.next_frames(&mut gens)
        }))
    };
    // The shared step failed: every job in it fails, since none can go on from a state the
    // step may have half changed.
    let failure = match results {
        Ok(Ok(results)) => {
            for (&i, frame) in ready.iter().zip(results) {
                active[i].guarded(|a| a.take_frame(model, frame));
            }
            return true;
        }
        Ok(Err(e)) => e.to_string(),
        Err(payload) => panicked(active[ready[0]].job.id, payload).to_string(),
    };
    for &i in &ready {
        active[i].fail(Error::Internal(failure.clone()));
    }
    true
}

/// The worker's bookkeeping under the state lock: retires ended jobs, returns jobs at a
/// sentence boundary to the queue, admits queued ones. Waits while there is nothing to do;
/// false on shutdown.
fn settle<'m>(shared: &Shared, active: &mut Vec<Active<'m>>) -> bool {
    let mut st = lock(&shared.state);
    let mut i = 0;
    while i < active.len() {
        if active[i].done || active[i].at_boundary() {
            let a = active.remove(i);
            st.running.retain(|r| r.id != a.job.id);
            if !a.done {
                // More to say: back in the queue, keeping its place in its class.
                st.queue.push(a.job);
            }
        } else {
            i += 1;
        }
    }
    loop {
        if st.shutdown {
            // The jobs were cancelled first; tell their consumers so, where they listen.
            for a in active.iter_mut() {
                a.deliver();
            }
            return false;
        }
        admit(&mut st, active, shared.cfg.max_streams.max(1));
        if !active.is_empty() {
            return true;
        }
        st = shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
    }
}

/// Moves queued jobs to the worker, most urgent first: the speaker takes one at a time,
/// clients up to `max_streams` together.
fn admit(st: &mut State, active: &mut Vec<Active<'_>>, max_streams: usize) {
    loop {
        let speaker_busy = active
            .iter()
            .any(|a| a.job.req.destination == Destination::Speaker);
        let clients = active
            .iter()
            .filter(|a| a.job.req.destination == Destination::Client)
            .count();
        let best = st
            .queue
            .iter()
            .enumerate()
            .filter(|(_, q)| match q.req.destination {
                Destination::Speaker => !speaker_busy,
                Destination::Client => clients < max_streams,
            })
            .min_by_key(|(_, q)| (q.req.priority.rank(), q.seq))
            .map(|(i, _)| i);
        let Some(i) = best else { return };
        let job = st.queue.remove(i);
        st.running.push(Running {
            id: job.id,
            priority: job.req.priority,
            destination: job.req.destination,
            control: job.control.clone(),
        });
        active.push(Active::new(job));
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
