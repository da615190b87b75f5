//! One job as the worker holds it, and the project's central line, sentence by sentence:
//! text → (lexicon) → prompt tokens → prefill → frames of codes (shared decoding steps) →
//! streaming codec → rate and pitch → gain → audio events for the consumer.
//!
//! [`Active::begin_sentence`] runs everything up to the prefill; the worker's shared step
//! produces the frames; [`Active::take_frame`] turns each into audio. Delivery never waits: a
//! job whose consumer is behind keeps its events in its outbox and sits out the steps.
//!
//! Words and SSML marks go out just before the audio chunk that holds their first sample. Where
//! a word starts is estimated in proportion to its place in the sentence, at the job's pace in
//! frames per character: a typical pace for the first sentence, then the pace measured on the
//! job's finished sentences. A sentence's words all go out before its last audio, whatever the
//! estimate. SSML breaks are silence between pieces; prosody spans are pieces of their own.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::job::{lock, Refused};
use super::request::{Destination, Event};
use super::worker::Queued;
use super::EngineConfig;
use crate::audio::pcm::apply_gain;
use crate::audio::prosody::{Prosody, MAX_PITCH, MIN_PITCH};
use crate::audio::stretch::{MAX_RATE, MIN_RATE};
use crate::model::noise::{NoiseSource, SeededNoise};
use crate::model::prompt::PromptTokens;
use crate::model::stream::StreamingDecoder;
use crate::model::{Frame, GenerateOptions, Generation, Prefill, Prompt, Voxtral};
use crate::text::sentences::{char_slice, words};
use crate::{Error, Result};

/// Frames per character of a typical voice at its natural pace (12.5 frames a second, about
/// 14 characters a second), the estimate until the job's first sentence is measured.
pub(super) const TYPICAL_FRAMES_PER_CHAR: f64 = 0.9;

/// Most audio in one event of a `<break/>`'s silence.
const SILENCE_CHUNK: usize = 4800;

/// A sentence ready for its prefill: the prompt and what its generation starts with.
pub(super) struct SentenceStart<'m> {
    pub prompt: Prompt,
    pub noise: Box<dyn NoiseSource + 'm>,
    pub opts: GenerateOptions,
    pub range: std::ops::Range<usize>,
    pub text: String,
}

/// One sentence being generated and streamed.
struct Utterance<'m> {
    gen: Generation<'m>,
    dec: StreamingDecoder,
    prosody: Prosody,
    /// Gain of this piece (the request's volume times its prosody span's).
    volume: f32,
    /// Its words not yet announced, each with the estimated sample where it starts.
    words: VecDeque<(std::ops::Range<usize>, u64)>,
    chars: usize,
    frames: usize,
}

pub(super) struct Active<'m> {
    pub job: Queued,
    utterance: Option<Utterance<'m>>,
    outbox: VecDeque<Event>,
    /// A sentence ended since the job was admitted; at this boundary it goes back to the queue
    /// so that more urgent work can take over.
    spoke: bool,
    /// The terminal event is in the outbox.
    ending: bool,
    /// The terminal event was delivered, or nobody is left to take it.
    pub done: bool,
    /// Since when the consumer's mailbox has been full.
    blocked_since: Option<Instant>,
}

impl<'m> Active<'m> {
    pub fn new(job: Queued) -> Self {
        Self {
            job,
            utterance: None,
            outbox: VecDeque::new(),
            spoke: false,
            ending: false,
            done: false,
            blocked_since: None,
        }
    }

    fn cancelled(&self) -> Option<String> {
        self.job.control.reason()
    }

    /// Ends the job with `ev`. A cancellation replaces whatever was not yet delivered, even
    /// another ending; other endings keep the audio before them.
    fn end(&mut self, ev: Event) {
        let cancel = matches!(ev, Event::Cancelled { .. });
        if self.done || (self.ending && !cancel) {
            return;
        }
        if cancel {
            if matches!(self.outbox.back(), Some(Event::Cancelled { .. })) {
                return;
            }
            self.outbox.clear();
        }
        self.job.log_end(&ev);
        self.utterance = None;
        self.outbox.push_back(ev);
        self.ending = true;
    }

    pub fn fail(&mut self, e: Error) {
        match self.cancelled() {
            Some(reason) => self.end(Event::Cancelled { reason }),
            None => self.end(Event::Failed {
                reason: e.to_string(),
            }),
        }
    }

    /// Runs `f` on this job; an error or a panic (a bug, or a device failure that candle turns
    /// into one) fails this job only.
    pub fn guarded(&mut self, f: impl FnOnce(&mut Self) -> Result<()>) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)))
            .unwrap_or_else(|payload| Err(super::worker::panicked(self.job.id, payload)));
        if let Err(e) = r {
            self.fail(e);
        }
    }

    /// Hands queued events to the consumer as far as its mailbox takes them; true if any
    /// moved. A client that has taken nothing for `stall_timeout` is cancelled.
    pub fn deliver(&mut self, stall_timeout: Duration) -> bool {
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
                // (Lock order: the cancel flag, then the mailbox; consumers never nest them.)
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
                    self.blocked_since = None;
                    if self.ending && self.outbox.is_empty() {
                        self.done = true;
                    }
                }
                Err(Refused::Full(ev)) => {
                    self.outbox.push_front(ev);
                    let since = *self.blocked_since.get_or_insert_with(Instant::now);
                    // The daemon's own speaker is paused by its user, never dropped.
                    let client = self.job.req.destination == Destination::Client;
                    if client && since.elapsed() > stall_timeout {
                        let reason = format!(
                            "the client stopped reading for {} s",
                            stall_timeout.as_secs_f64()
                        );
                        self.job.control.cancel(&reason);
                        self.end(Event::Cancelled { reason });
                        continue;
                    }
                    break;
                }
                Err(Refused::Gone) => {
                    let reason = "the client went away";
                    if !self.ending && self.job.control.cancel(reason) {
                        self.job.log_end(&Event::Cancelled {
                            reason: reason.into(),
                        });
                    }
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
    pub fn ready(&self) -> bool {
        self.utterance.is_some()
            && self.outbox.is_empty()
            && !self.ending
            && self.cancelled().is_none()
    }

    /// Admitted, with no sentence begun yet.
    pub fn fresh(&self) -> bool {
        self.utterance.is_none() && !self.spoke && !self.ending && !self.done
    }

    pub fn mid_sentence(&self) -> bool {
        self.utterance.is_some()
    }

    /// Between sentences with more to say.
    pub fn at_boundary(&self) -> bool {
        self.spoke
            && !self.ending
            && self.utterance.is_none()
            && self.outbox.is_empty()
            && self.job.next_sentence < self.job.sentences.len()
    }

    pub fn generation(&mut self) -> Option<&mut Generation<'m>> {
        self.utterance.as_mut().map(|u| &mut u.gen)
    }

    /// Queues the marks due before the audio at sample `offset`: those at or before character
    /// `at`.
    fn marks_up_to(&mut self, at: usize, offset: u64) {
        let marks = &self.job.req.markup.marks;
        while let Some(m) = marks.get(self.job.marks_done).filter(|m| m.offset <= at) {
            self.outbox.push_back(Event::Mark {
                name: m.name.clone(),
                offset,
            });
            self.job.marks_done += 1;
        }
    }

    /// Queues the break silences at or before character `at`, and the marks before `at` or
    /// before one of those breaks, in text order (a mark before a break at the same place). A
    /// mark at `at` itself waits for the word there.
    fn markup_before(&mut self, at: usize, sample_rate: u32) {
        loop {
            let markup = &self.job.req.markup;
            let brk = markup
                .breaks
                .get(self.job.breaks_done)
                .filter(|b| b.offset <= at)
                .copied();
            let mark = markup
                .marks
                .get(self.job.marks_done)
                .filter(|m| m.offset < at || brk.is_some_and(|b| m.offset <= b.offset));
            if let Some(m) = mark {
                let at = m.offset;
                self.marks_up_to(at, self.job.offset);
                continue;
            }
            let Some(b) = brk else { return };
            self.job.breaks_done += 1;
            let mut left = b.millis as usize * sample_rate as usize / 1000;
            while left > 0 {
                let n = left.min(SILENCE_CHUNK);
                self.emit(vec![0.0; n], 1.0);
                left -= n;
            }
        }
    }

    /// Queues the words (and the marks before them) that start before the end of `samples`,
    /// then the audio.
    fn emit_spoken(&mut self, samples: Vec<f32>, all_words: bool) {
        let end = self.job.offset + samples.len() as u64;
        let start = self.job.offset;
        let volume = self.utterance.as_ref().map_or(1.0, |u| u.volume);
        while let Some(u) = self.utterance.as_mut() {
            let Some((range, at)) = u.words.front().cloned() else {
                break;
            };
            if at >= end && !all_words {
                break;
            }
            u.words.pop_front();
            let offset = at.clamp(start, end.saturating_sub(1).max(start));
            self.marks_up_to(range.start, offset);
            self.outbox.push_back(Event::Word { range, offset });
        }
        self.emit(samples, volume);
    }

    /// Queues audio for the consumer.
    fn emit(&mut self, mut samples: Vec<f32>, volume: f32) {
        if samples.is_empty() {
            return;
        }
        apply_gain(&mut samples, self.job.req.volume * volume);
        if self.job.first_audio.is_none() {
            self.job.first_audio = Some(self.job.submitted.elapsed());
        }
        let n = samples.len() as u64;
        self.outbox.push_back(Event::Audio {
            offset: self.job.offset,
            samples,
        });
        self.job.offset += n;
    }

    /// The next sentence up to its prefill: split it if it cannot fit the context, apply the
    /// lexicon, build the prompt, check there is memory for its cache (`live`: streams that
    /// hold one now). `None` when there is no sentence left.
    pub fn prepare_sentence(
        &mut self,
        model: &'m Voxtral,
        cfg: &EngineConfig,
        live: usize,
    ) -> Result<Option<SentenceStart<'m>>> {
        let job = &mut self.job;
        if job.started.is_none() {
            job.started = Some(Instant::now());
            job.log_start();
            self.outbox.push_back(Event::Started);
        }
        let Some(range) = job.sentences.get(job.next_sentence).cloned() else {
            return Ok(None);
        };
        let text = char_slice(&job.req.text, &range);
        #[cfg(test)]
        if text.contains(super::tests::PANIC_MARK) {
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
        let said = match &job.req.punctuation {
            Some(p) => std::borrow::Cow::Owned(p.apply(&said).into_owned()),
            None => said,
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
            return self.prepare_sentence(model, cfg, live);
        }
        let prompt = prompt?;
        job.next_sentence += 1;
        self.markup_before(range.start, model.sample_rate());
        let job = &mut self.job;
        self.outbox.push_back(Event::Sentence {
            range: range.clone(),
        });
        let seed = job.req.seed.wrapping_add(job.next_sentence as u64 - 1);
        let opts = GenerateOptions {
            max_frames: job.req.max_frames,
            cfg_alpha: job.req.cfg_alpha,
        };
        model.room_for_stream(live)?;
        let noise: Box<dyn NoiseSource> = Box::new(SeededNoise::new(seed));
        #[cfg(test)]
        let noise = super::tests::faulty_noise(&text, noise);
        Ok(Some(SentenceStart {
            prompt,
            noise,
            opts,
            range,
            text,
        }))
    }

    /// Takes the prefilled generation of the sentence `prepare_sentence` made ready.
    pub fn begin_sentence(
        &mut self,
        model: &'m Voxtral,
        cfg: &EngineConfig,
        start: SentenceStart<'m>,
        prefill: Prefill,
    ) -> Result<()> {
        let SentenceStart {
            noise,
            opts,
            range,
            text,
            ..
        } = start;
        let gen = model.generation(prefill, noise, &opts);
        let job = &mut self.job;
        let (rate, pitch, volume) = job.req.markup.prosody_at(range.start);
        let rate = (job.req.rate * rate).clamp(MIN_RATE, MAX_RATE);
        let pitch = (job.req.pitch * pitch).clamp(MIN_PITCH, MAX_PITCH);
        // Where each word starts, at the job's pace, in samples after the rate change.
        let samples_per_char = job.pace * model.samples_per_frame() as f64 / rate as f64;
        let at = |w: &std::ops::Range<usize>| {
            job.offset + ((w.start - range.start) as f64 * samples_per_char) as u64
        };
        // From the sentence already cut out above: no second walk through the whole text.
        let words = words(&text, range.start)
            .into_iter()
            .map(|w| (w.clone(), at(&w)))
            .collect();
        self.utterance = Some(Utterance {
            gen,
            dec: StreamingDecoder::new(cfg.schedule),
            prosody: Prosody::new(model.sample_rate(), rate, pitch)?,
            volume: volume.clamp(0.0, 1.0),
            words,
            chars: range.len(),
            frames: 0,
        });
        Ok(())
    }

    /// This job's result of a decoding step: the frame through the codec and prosody into
    /// audio, or the end of the sentence.
    pub fn take_frame(&mut self, model: &Voxtral, frame: Result<Option<Frame>>) -> Result<()> {
        let Some(utt) = self.utterance.as_mut() else {
            return Ok(());
        };
        let mut out = Vec::new();
        match frame {
            Ok(Some(frame)) => {
                self.job.control.frames.fetch_add(1, Ordering::SeqCst);
                utt.frames += 1;
                if let Some(samples) = utt.dec.push(model.codec(), &frame.codes)? {
                    utt.prosody.push(samples, &mut out)?;
                }
                self.emit_spoken(out, false);
            }
            // A sentence with no audio (e.g. only punctuation) is skipped, not fatal.
            Ok(None) | Err(Error::NoAudio) => {
                utt.prosody.push(utt.dec.flush(model.codec())?, &mut out)?;
                utt.prosody.finish(&mut out)?;
                // The pace of a sentence the model ended itself is the best estimate of the
                // next one's.
                if matches!(frame, Ok(None)) && utt.frames > 0 && utt.chars > 0 {
                    let measured = utt.frames as f64 / utt.chars as f64;
                    let pace = &mut self.job.pace;
                    *pace = 0.5 * *pace + 0.5 * measured;
                }
                self.emit_spoken(out, true);
                self.utterance = None;
                self.spoke = true;
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Queues `Finished` once the last sentence is out.
    pub fn finish_if_done(&mut self, sample_rate: u32) {
        if self.ending
            || self.utterance.is_some()
            || self.job.next_sentence < self.job.sentences.len()
        {
            return;
        }
        self.markup_before(usize::MAX, sample_rate);
        let secs = self.job.offset as f64 / sample_rate as f64;
        let took = self.job.started.map_or(0.0, |t| t.elapsed().as_secs_f64());
        self.end(Event::Finished {
            frames: self.job.control.frames.load(Ordering::SeqCst),
            seconds: secs,
            rtf: took / secs.max(1e-9),
        });
    }
}
