//! The consumer's end of a request: a [`Job`] yields the job's events, from blocking code
//! (`recv`) or async code (`next`), with no thread between them. Dropping it cancels the job.
//!
//! Events pass through a bounded mailbox. The engine never waits on it: when it is full the
//! job keeps its events and sits out decoding steps until the consumer takes some, so a
//! consumer reading at playback pace slows only its own job. Terminal events are always
//! accepted, so a job's end is never lost behind a full mailbox.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::request::{Event, JobId};

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Shared between a job's handle and the worker.
pub(crate) struct Control {
    /// Held while checking and sending, so once `cancel` returns no audio is sent.
    pub cancelled: Mutex<Option<String>>,
    pub frames: AtomicUsize,
}

impl Control {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            cancelled: Mutex::new(None),
            frames: AtomicUsize::new(0),
        })
    }

    /// Marks the job cancelled; false if it already was.
    pub fn cancel(&self, reason: &str) -> bool {
        let mut g = lock(&self.cancelled);
        if g.is_some() {
            return false;
        }
        *g = Some(reason.to_string());
        true
    }

    pub fn reason(&self) -> Option<String> {
        lock(&self.cancelled).clone()
    }
}

#[derive(Default)]
struct Inbox {
    events: VecDeque<Event>,
    consumer_gone: bool,
    producer_gone: bool,
}

struct Mailbox {
    inbox: Mutex<Inbox>,
    /// Wakes a blocking consumer.
    arrived: Condvar,
    /// Wakes an async consumer (a stored permit covers a send before it waits).
    notify: tokio::sync::Notify,
    capacity: usize,
}

/// Why an event was not taken.
pub(crate) enum Refused {
    /// The mailbox holds `capacity` events already; try again later.
    Full(Event),
    /// Nobody will read it.
    Gone,
}

/// The producer's end of a mailbox.
pub struct EventSender {
    mailbox: Arc<Mailbox>,
}

impl EventSender {
    pub(crate) fn try_send(&self, ev: Event) -> Result<(), Refused> {
        let mut inbox = lock(&self.mailbox.inbox);
        if inbox.consumer_gone {
            return Err(Refused::Gone);
        }
        if inbox.events.len() >= self.mailbox.capacity && !ev.is_terminal() {
            return Err(Refused::Full(ev));
        }
        inbox.events.push_back(ev);
        drop(inbox);
        self.mailbox.arrived.notify_one();
        self.mailbox.notify.notify_one();
        Ok(())
    }

    /// Hands over an event, dropping it if nobody listens; for relays without a bound.
    pub fn send(&self, ev: Event) {
        let _ = self.try_send(ev);
    }
}

impl Drop for EventSender {
    fn drop(&mut self) {
        lock(&self.mailbox.inbox).producer_gone = true;
        self.mailbox.arrived.notify_all();
        self.mailbox.notify.notify_one();
    }
}

/// The consumer's end of one request.
pub struct Job {
    pub id: JobId,
    mailbox: Arc<Mailbox>,
    /// Present when dropping this handle cancels the job.
    control: Option<Arc<Control>>,
    done: bool,
}

impl Job {
    pub(crate) fn new(id: JobId, capacity: usize, control: Arc<Control>) -> (Self, EventSender) {
        let (mut job, tx) = Self::relay(id, capacity);
        job.control = Some(control);
        (job, tx)
    }

    /// A handle fed by someone other than the engine (the daemon's speaker forwards what it
    /// plays); dropping it cancels nothing.
    pub fn relay(id: JobId, capacity: usize) -> (Self, EventSender) {
        let mailbox = Arc::new(Mailbox {
            inbox: Mutex::new(Inbox::default()),
            arrived: Condvar::new(),
            notify: tokio::sync::Notify::new(),
            capacity: capacity.max(1),
        });
        let tx = EventSender {
            mailbox: mailbox.clone(),
        };
        let job = Self {
            id,
            mailbox,
            control: None,
            done: false,
        };
        (job, tx)
    }

    /// Takes the next event if there is one; `Err(())` when nothing has arrived yet.
    fn take(&mut self) -> Result<Option<Event>, ()> {
        if self.done {
            return Ok(None);
        }
        // Read before taking the inbox: the worker takes the two locks the other way round.
        let cancelled = self.is_cancelled();
        let mut inbox = lock(&self.mailbox.inbox);
        while let Some(ev) = inbox.events.pop_front() {
            if matches!(ev, Event::Audio { .. }) && cancelled {
                continue;
            }
            self.done = ev.is_terminal();
            return Ok(Some(ev));
        }
        if inbox.producer_gone {
            self.done = true;
            return Ok(None);
        }
        Err(())
    }

    /// The next event; `None` after the terminal one. Audio still buffered when the job was
    /// cancelled is dropped. Blocks; from async code use [`Job::next`].
    pub fn recv(&mut self) -> Option<Event> {
        loop {
            if let Ok(ev) = self.recv_timeout(Duration::from_secs(3600)) {
                return ev;
            }
        }
    }

    /// Like [`Job::recv`] with a timeout; `Err(())` on timeout.
    #[allow(clippy::result_unit_err)]
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<Event>, ()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(ev) = self.take() {
                return Ok(ev);
            }
            let inbox = lock(&self.mailbox.inbox);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(());
            }
            if inbox.events.is_empty() && !inbox.producer_gone {
                let _ = self.mailbox.arrived.wait_timeout(inbox, left);
            }
        }
    }

    /// The next event, awaited; `None` after the terminal one.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Ok(ev) = self.take() {
                return ev;
            }
            self.mailbox.notify.notified().await;
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.control.as_ref().is_some_and(|c| c.reason().is_some())
    }

    /// Frames generated so far.
    pub fn frames(&self) -> usize {
        self.control
            .as_ref()
            .map_or(0, |c| c.frames.load(Ordering::SeqCst))
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        lock(&self.mailbox.inbox).consumer_gone = true;
        if let Some(c) = &self.control {
            if !self.done {
                c.cancel("the client went away");
            }
        }
    }
}
