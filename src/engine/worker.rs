//! The engine's thread: admit waiting jobs, begin their sentences, advance every ready one by a
//! frame in one shared decoding step, deliver what they made, retire what ended.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::job::{lock, Control, EventSender};
use super::policy;
use super::request::{Destination, Event, JobId, Priority, SpeechRequest};
use super::utterance::{Active, SentenceStart};
use super::EngineConfig;
use crate::model::{Frame, Generation, Prompt, StepMark, Streams, Voxtral};
use crate::Error;

/// A job between its submission and its end: what to say, where it has got to.
pub(super) struct Queued {
    pub id: JobId,
    pub seq: u64,
    pub req: SpeechRequest,
    pub tx: EventSender,
    pub control: Arc<Control>,
    pub sentences: Vec<Range<usize>>,
    pub next_sentence: usize,
    /// Samples delivered so far.
    pub offset: u64,
    pub submitted: Instant,
    pub started: Option<Instant>,
    pub first_audio: Option<Duration>,
    /// The request's SSML marks and breaks already delivered.
    pub marks_done: usize,
    pub breaks_done: usize,
    /// Frames per character of this job's voice, measured on its sentences so far.
    pub pace: f64,
}

impl Queued {
    pub fn log_start(&self) {
        tracing::info!(
            job = self.id,
            interface = %self.req.interface,
            voice = %self.req.voice,
            chars = self.req.text.chars().count(),
            sentences = self.sentences.len(),
            priority = ?self.req.priority,
            destination = ?self.req.destination,
            waited_ms = self.submitted.elapsed().as_millis() as u64,
            "job started"
        );
    }

    /// The job's one closing log line: how it ended, never what it said.
    pub fn log_end(&self, ev: &Event) {
        let frames = self.control.frames.load(Ordering::SeqCst);
        let first_audio_ms = self.first_audio.map(|d| d.as_millis() as u64);
        let took = self.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let samples = self.offset;
        let (job, interface, voice) = (self.id, self.req.interface, &self.req.voice);
        match ev {
            Event::Finished { seconds, rtf, .. } => tracing::info!(
                job, %interface, %voice, frames, first_audio_ms, audio_s = seconds, rtf,
                "job finished"
            ),
            Event::Cancelled { reason } => tracing::info!(
                job, %interface, %voice, frames, first_audio_ms, ran_s = took, samples, %reason,
                "job cancelled"
            ),
            Event::Failed { reason } => tracing::warn!(
                job, %interface, %voice, frames, first_audio_ms, ran_s = took, %reason,
                "job failed"
            ),
            _ => {}
        }
    }

    /// Ends a job that never reached the worker (cancelled or displaced while waiting).
    pub fn end_waiting(&self, reason: &str) {
        let ev = Event::Cancelled {
            reason: reason.into(),
        };
        self.log_end(&ev);
        let _ = self.tx.try_send(ev);
    }
}

/// A job the worker holds, as `submit` and `cancel` see it.
pub(super) struct Running {
    pub id: JobId,
    pub priority: Priority,
    pub destination: Destination,
    pub control: Arc<Control>,
}

#[derive(Default)]
pub(super) struct State {
    pub queue: Vec<Queued>,
    pub running: Vec<Running>,
    pub next_id: JobId,
    pub shutdown: bool,
}

pub(super) struct Shared {
    pub state: Mutex<State>,
    pub widest_step: AtomicUsize,
    /// The most prompts prefilled in one pass so far.
    pub widest_prefill: AtomicUsize,
    pub wake: Condvar,
    pub ready: Ready,
    pub model: Arc<Voxtral>,
    pub cfg: EngineConfig,
}

/// Set once the worker takes jobs: on a GPU, after its warm-up.
#[derive(Default)]
pub(super) struct Ready {
    done: Mutex<bool>,
    cv: Condvar,
}

impl Ready {
    fn set(&self) {
        *lock(&self.done) = true;
        self.cv.notify_all();
    }

    pub fn wait(&self) {
        let mut done = lock(&self.done);
        while !*done {
            done = self.cv.wait(done).unwrap_or_else(|e| e.into_inner());
        }
    }
}

pub(super) fn panicked(job: JobId, payload: Box<dyn std::any::Any + Send>) -> Error {
    let what = crate::error::panic_message(payload.as_ref());
    tracing::error!(job, %what, "synthesis panicked");
    Error::Internal(what)
}

/// Prefills in one pass while other streams are mid-sentence.
const PREFILLS_WHILE_SPEAKING: usize = 4;

/// The worker's loop.
pub(super) fn run(shared: Arc<Shared>) {
    let model: &Voxtral = &shared.model;
    // A GPU's first utterance pays for setting itself up: pay it before the first client.
    // Jobs submitted meanwhile wait in the queue.
    if !model.device().is_cpu() {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.warm_up())) {
            Ok(Ok(took)) => tracing::info!(secs = took.as_secs_f64(), "warmed up"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "warm-up failed; the first request will be slower")
            }
            Err(p) => tracing::warn!(
                what = crate::error::panic_message(p.as_ref()),
                "warm-up panicked; the first request will be slower"
            ),
        }
    }
    shared.ready.set();
    let stall = shared.cfg.stall_timeout;
    let mut active: Vec<Active<'_>> = Vec::new();
    let mut steps = StepBuffers::default();
    while settle(&shared, &mut active) {
        let mut progressed = false;
        // Newcomers' prefills share one pass. While some are mid-sentence, a few per step, so
        // that audio already flowing waits for a small pass, not for every newcomer's.
        let mut prefills = if active.iter().any(Active::mid_sentence) {
            PREFILLS_WHILE_SPEAKING
        } else {
            usize::MAX
        };
        // Streams holding a KV cache: each newcomer's cache must fit beside them.
        let live = active.iter().filter(|a| a.mid_sentence()).count();
        let mut starts = Vec::new();
        for (i, a) in active.iter_mut().enumerate() {
            progressed |= a.deliver(stall);
            if a.fresh() && prefills > 0 {
                prefills -= 1;
                progressed = true;
                let mut start = None;
                a.guarded(|a| {
                    start = a.prepare_sentence(model, &shared.cfg, live + starts.len())?;
                    Ok(())
                });
                starts.extend(start.map(|s| (i, s)));
            }
        }
        shared
            .widest_prefill
            .fetch_max(starts.len(), Ordering::Relaxed);
        prefill(model, &shared.cfg, &mut active, starts);
        progressed |= step(&shared, &mut active, &mut steps);
        for a in &mut active {
            a.finish_if_done(model.sample_rate());
            progressed |= a.deliver(stall);
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The prefills of the sentences made ready this round, in one pass for all of them. If the
/// shared pass fails, each prompt is prefilled alone, so only one that fails alone fails.
fn prefill<'m>(
    model: &'m Voxtral,
    cfg: &EngineConfig,
    active: &mut [Active<'m>],
    starts: Vec<(usize, SentenceStart<'m>)>,
) {
    // `job`: the one a panic is logged against.
    let run = |job: JobId, prompts: &[&Prompt]| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.prefill(prompts)))
            .unwrap_or_else(|payload| Err(panicked(job, payload)))
    };
    let shared = match starts.len() {
        0 => return,
        1 => None,
        _ => {
            let first = active[starts[0].0].job.id;
            run(
                first,
                &starts.iter().map(|(_, s)| &s.prompt).collect::<Vec<_>>(),
            )
            .ok()
        }
    };
    match shared {
        Some(prefills) => {
            for ((i, start), p) in starts.into_iter().zip(prefills) {
                active[i].guarded(|a| a.begin_sentence(model, cfg, start, p));
            }
        }
        None => {
            for (i, start) in starts {
                match run(active[i].job.id, &[&start.prompt]) {
                    Ok(mut p) => {
                        let p = p.remove(0);
                        active[i].guarded(|a| a.begin_sentence(model, cfg, start, p));
                    }
                    Err(e) => active[i].fail(e),
                }
            }
        }
    }
}

/// What a decoding step keeps from step to step, so that a step allocates nothing: which
/// jobs are ready, their marks (when several step together) and their results.
#[derive(Default)]
struct StepBuffers {
    ready: Vec<usize>,
    /// The k-th ready job's mark; released after each step, so that none holds a cache.
    marks: Vec<StepMark>,
    results: Vec<crate::Result<Option<Frame>>>,
}

/// The jobs at `ready` (ascending indices, each with an utterance), as the model steps them.
struct ReadyJobs<'a, 'm> {
    active: &'a mut [Active<'m>],
    ready: &'a [usize],
}

impl<'m> Streams<'m> for ReadyJobs<'_, 'm> {
    fn count(&self) -> usize {
        self.ready.len()
    }
    fn stream(&mut self, i: usize) -> &mut Generation<'m> {
        self.active[self.ready[i]]
            .generation()
            .expect("a ready job has an utterance")
    }
}

/// Advances every ready job by one frame, all in one decoding step. Returns whether any did.
fn step<'m>(shared: &'m Shared, active: &mut [Active<'m>], buffers: &mut StepBuffers) -> bool {
    let StepBuffers {
        ready,
        marks,
        results,
    } = buffers;
    ready.clear();
    ready.extend((0..active.len()).filter(|&i| active[i].ready()));
    if ready.is_empty() {
        return false;
    }
    shared.widest_step.fetch_max(ready.len(), Ordering::Relaxed);
    if ready.len() == 1 {
        // Alone: nothing to retry, so no mark to take on the single-stream hot path.
        if let Err(e) = shared_step(&shared.model, active, ready, results) {
            active[ready[0]].fail(e);
        }
        return true;
    }
    // `marks[k]` is the k-th ready job's, taken through the step's own view of the jobs.
    let mut jobs = ReadyJobs { active, ready };
    for k in 0..jobs.count() {
        let g = jobs.stream(k);
        match marks.get_mut(k) {
            Some(mark) => g.mark_into(mark),
            None => marks.push(g.mark()),
        }
    }
    let stepped = shared_step(&shared.model, active, ready, results);
    if let Err(failure) = stepped {
        // The shared step failed and may have half changed every state in it: each goes
        // back to where it was and steps alone, so only the job that fails alone fails.
        tracing::warn!(jobs = ready.len(), error = %failure, "shared step failed; retrying each job alone");
        for (&i, mark) in ready.iter().zip(marks.iter()) {
            if let Some(g) = active[i].generation() {
                g.restore(mark);
            }
            if let Err(e) = shared_step(&shared.model, active, &[i], results) {
                active[i].fail(e);
            }
        }
    }
    marks.iter_mut().for_each(StepMark::release);
    true
}

/// One decoding step for the jobs at `ready` (ascending indices, each ready): their frames
/// are taken, or the step's error (a panic included) is returned for all of them.
fn shared_step<'m>(
    model: &'m Voxtral,
    active: &mut [Active<'m>],
    ready: &[usize],
    results: &mut Vec<crate::Result<Option<Frame>>>,
) -> Result<(), Error> {
    let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        model.next_frames_into(
            &mut ReadyJobs {
                active: &mut *active,
                ready,
            },
            results,
        )
    }));
    match stepped {
        Ok(Ok(())) => {
            for (&i, frame) in ready.iter().zip(results.drain(..)) {
                active[i].guarded(|a| a.take_frame(model, frame));
            }
            Ok(())
        }
        Ok(Err(e)) => Err(Error::Internal(e.to_string())),
        Err(payload) => Err(panicked(active[ready[0]].job.id, payload)),
    }
}

/// The worker's bookkeeping under the state lock: retires ended jobs, returns jobs at a
/// sentence boundary to the queue, admits queued ones. Waits while there is nothing to do;
/// false on shutdown.
fn settle(shared: &Shared, active: &mut Vec<Active<'_>>) -> bool {
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
                a.deliver(shared.cfg.stall_timeout);
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
            .min_by_key(|(_, q)| (policy::rank(q.req.priority), q.seq))
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
