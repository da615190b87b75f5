//! Frame-by-frame generation: each stream's state over the shared weights, and the one frame
//! step that advances one stream or many (a backbone step for all of them, their semantic
//! codes, one flow-head pass per Euler step). On the CPU's host path the step allocates
//! nothing once its buffers have grown: states move as host rows, frames as inline codes,
//! and the bookkeeping lives in buffers the model keeps.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::backbone::{BackboneCache, StepCaches};
use super::config::END_AUDIO;
use super::flow::FlowTrace;
use super::frame::FrameCodes;
use super::noise::NoiseSource;
use super::{Voxtral, DEFAULT_CFG_ALPHA, DEFAULT_MAX_FRAMES};
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_frames: usize,
    pub cfg_alpha: f32,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_frames: DEFAULT_MAX_FRAMES,
            cfg_alpha: DEFAULT_CFG_ALPHA,
        }
    }
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    EndOfAudio,
    MaxFrames,
    ContextLimit,
}

/// One generated frame: its codes with the +2 offset (the semantic code, then the acoustic
/// ones). The backbone state that produced it is [`Generation::hidden`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub codes: FrameCodes,
}

/// Time spent in each network so far, for benchmarks and logs.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepTimings {
    pub prefill: std::time::Duration,
    /// Backbone steps (one per frame after the first).
    pub backbone: std::time::Duration,
    pub backbone_steps: usize,
    /// Semantic head and flow-matching ODE.
    pub flow: std::time::Duration,
}

/// A stream's latest backbone state `[dim]`.
enum Hidden {
    /// In host memory, in a buffer the stream keeps: what a step on host buffers gives.
    Row(Vec<f32>),
    /// A tensor: the prompt's last position, or a step by candle's ops.
    Tensor(Tensor),
}

impl Clone for Hidden {
    fn clone(&self) -> Self {
        match self {
            Hidden::Row(r) => Hidden::Row(r.clone()),
            Hidden::Tensor(t) => Hidden::Tensor(t.clone()),
        }
    }

    /// A row into the row buffer `self` already has.
    fn clone_from(&mut self, source: &Self) {
        match (&mut *self, source) {
            (Hidden::Row(r), Hidden::Row(from)) => r.clone_from(from),
            _ => *self = source.clone(),
        }
    }
}

impl Hidden {
    fn tensor(&self) -> Result<Tensor> {
        Ok(match self {
            Hidden::Row(r) => Tensor::from_slice(r, r.len(), &Device::Cpu)?,
            Hidden::Tensor(t) => t.clone(),
        })
    }

    /// Appends the state's values to `rows` (a tensor is read back: once a stream, for the
    /// first frame after its prefill).
    fn append_to(&self, rows: &mut Vec<f32>) -> Result<()> {
        match self {
            Hidden::Row(r) => rows.extend_from_slice(r),
            Hidden::Tensor(t) => {
                rows.extend(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
            }
        }
        Ok(())
    }

    /// The state becomes `values`, in the buffer it already has.
    fn set_row(&mut self, values: &[f32]) {
        match self {
            Hidden::Row(r) => {
                r.clear();
                r.extend_from_slice(values);
            }
            Hidden::Tensor(_) => *self = Hidden::Row(values.to_vec()),
        }
    }
}

/// Frame-by-frame generation for one utterance; owns its KV cache, which is freed on drop.
pub struct Generation<'m> {
    pub timings: StepTimings,
    model: &'m Voxtral,
    cache: BackboneCache,
    hidden: Hidden,
    /// No frame has been made from `hidden` yet.
    fresh: bool,
    /// The latest frame, to feed back at the next step.
    pending: Option<FrameCodes>,
    frames: usize,
    max_frames: usize,
    cfg_alpha: f32,
    noise: Box<dyn NoiseSource + 'm>,
    finished: Option<StopReason>,
}

/// A prompt run through the backbone: its cache and last hidden state.
pub struct Prefill {
    pub(super) cache: BackboneCache,
    pub(super) h: Tensor,
    /// The whole pass it was part of.
    pub(super) took: std::time::Duration,
}

/// A generation as it was before a step: a shared step that fails goes back to it, so that
/// each job can be retried alone. Cheap: the KV cache's tensors are shared, not copied (a
/// step only writes past the marked length).
pub struct StepMark {
    cache: BackboneCache,
    hidden: Hidden,
    fresh: bool,
    pending: Option<FrameCodes>,
    frames: usize,
    finished: Option<StopReason>,
    timings: StepTimings,
}

impl StepMark {
    /// Lets go of the stream's keys and values, keeping the mark's buffers for the next
    /// [`Generation::mark_into`]: a mark kept between steps must not hold the memory of a
    /// stream that has ended.
    pub fn release(&mut self) {
        self.cache.release();
    }
}

impl Voxtral {
    /// The frame stepper that goes on from a prefill.
    pub fn generation<'m>(
        &'m self,
        prefill: Prefill,
        noise: Box<dyn NoiseSource + 'm>,
        opts: &GenerateOptions,
    ) -> Generation<'m> {
        Generation {
            timings: StepTimings {
                prefill: prefill.took,
                ..Default::default()
            },
            model: self,
            cache: prefill.cache,
            hidden: Hidden::Tensor(prefill.h),
            fresh: true,
            pending: None,
            frames: 0,
            max_frames: opts.max_frames,
            cfg_alpha: opts.cfg_alpha,
            noise,
            finished: None,
        }
    }
}

impl Generation<'_> {
    pub fn mark(&self) -> StepMark {
        StepMark {
            cache: self.cache.clone(),
            hidden: self.hidden.clone(),
            fresh: self.fresh,
            pending: self.pending,
            frames: self.frames,
            finished: self.finished,
            timings: self.timings,
        }
    }

    /// [`Self::mark`] into `mark`, reusing its buffers: a server that marks its streams
    /// before every shared step keeps one mark per stream and allocates nothing.
    pub fn mark_into(&self, mark: &mut StepMark) {
        mark.cache.clone_from(&self.cache);
        mark.hidden.clone_from(&self.hidden);
        mark.fresh = self.fresh;
        mark.pending = self.pending;
        mark.frames = self.frames;
        mark.finished = self.finished;
        mark.timings = self.timings;
    }

    /// Back to `mark`. The noise source is not rewound: seeded noise depends only on the
    /// frame index, so the retried frame draws the same values.
    pub fn restore(&mut self, mark: &StepMark) {
        self.cache.clone_from(&mark.cache);
        self.hidden.clone_from(&mark.hidden);
        self.fresh = mark.fresh;
        self.pending = mark.pending;
        self.frames = mark.frames;
        self.finished = mark.finished;
        self.timings = mark.timings;
    }

    pub fn frames(&self) -> usize {
        self.frames
    }

    pub fn stop_reason(&self) -> Option<StopReason> {
        self.finished
    }

    /// Positions used by prompt and frames so far.
    pub fn positions(&self) -> usize {
        self.cache.len()
    }

    /// The backbone state `[dim]` that produced the latest frame (or ended the audio); before
    /// the first frame, the prompt's last position.
    pub fn hidden(&self) -> Result<Tensor> {
        self.hidden.tensor()
    }

    /// Feeds `codes` to the backbone's next step in place of the frame just generated
    /// (teacher forcing), so that two devices can be compared frame by frame on one path.
    pub fn force_next_input(&mut self, codes: FrameCodes) {
        if self.pending.is_some() {
            self.pending = Some(codes);
        }
    }

    /// The next frame, or `None` once generation has ended. Ending before the first frame is
    /// [`Error::NoAudio`].
    pub fn next_frame(&mut self) -> Result<Option<Frame>> {
        self.next_frame_traced(None)
    }

    /// [`Self::next_frame`], recording the flow head's ODE in `trace`.
    pub fn next_frame_traced(&mut self, trace: Option<&mut FlowTrace>) -> Result<Option<Frame>> {
        let model = self.model;
        let mut out = [Ok(None)];
        model.step_frames(self, &mut out, trace)?;
        let [frame] = out;
        frame
    }
}

/// The frame step's bookkeeping, kept from frame to frame so that the step allocates
/// nothing: the streams at each stage (indices into the step's generations) and their rows.
#[derive(Default)]
pub(super) struct FrameScratch {
    /// Streams not yet finished.
    active: Vec<usize>,
    /// Those with a frame to feed back: the backbone steps them.
    stepping: Vec<usize>,
    /// Those whose state no frame has been made from yet.
    with_state: Vec<usize>,
    /// Those whose semantic code is not the end of the audio.
    going: Vec<usize>,
    /// The frames fed back, one after the other.
    codes: Vec<u32>,
    /// The step's states `[stepping, dim]` (on host buffers).
    stepped: Vec<f32>,
    /// The states the head reads `[with_state, dim]`, then `[going, dim]` (on host buffers).
    states: Vec<f32>,
    /// One per `with_state`, then one per `going`.
    semantics: Vec<u32>,
    /// Start noise `[going, A]`, scaled.
    noise: Vec<f32>,
    /// The ODE's final values `[going, A]`.
    values: Vec<f32>,
}

/// The generations one frame step advances, by index: a slice of them, or a server's view of
/// the jobs that step (so that it keeps no vector of references from step to step).
pub trait Streams<'m>: Send {
    fn count(&self) -> usize;
    fn stream(&mut self, i: usize) -> &mut Generation<'m>;
}

impl<'m> Streams<'m> for [&mut Generation<'m>] {
    fn count(&self) -> usize {
        self.len()
    }
    fn stream(&mut self, i: usize) -> &mut Generation<'m> {
        self[i]
    }
}

/// One stream alone.
impl<'m> Streams<'m> for Generation<'m> {
    fn count(&self) -> usize {
        1
    }
    fn stream(&mut self, _: usize) -> &mut Generation<'m> {
        self
    }
}

/// The caches of the streams at `rows`, for the backbone step.
struct Stepping<'a, 'm, S: ?Sized> {
    gens: &'a mut S,
    rows: &'a [usize],
    _m: std::marker::PhantomData<&'m ()>,
}

impl<'m, S: Streams<'m> + ?Sized> StepCaches for Stepping<'_, 'm, S> {
    fn count(&self) -> usize {
        self.rows.len()
    }
    fn cache(&mut self, row: usize) -> &mut BackboneCache {
        &mut self.gens.stream(self.rows[row]).cache
    }
}

impl Voxtral {
    /// Advances several generations by one frame each, sharing the work: one backbone step
    /// for all of them and one flow-head pass per Euler step over all their rows, so that the
    /// weights are read once per frame for the whole batch. Each result is what
    /// [`Generation::next_frame`] would give for that generation; the frames are the same up
    /// to float rounding (batched matmuls may sum in another order). An error of the shared
    /// compute fails the call.
    pub fn next_frames(
        &self,
        gens: &mut [&mut Generation<'_>],
    ) -> Result<Vec<Result<Option<Frame>>>> {
        let mut out = Vec::new();
        self.next_frames_into(gens, &mut out)?;
        Ok(out)
    }

    /// [`Self::next_frames`] for any [`Streams`], the results into `out` (one per stream,
    /// in their order; emptied first), so that a server's loop can keep both from step to step.
    pub fn next_frames_into<'m, S: Streams<'m> + ?Sized>(
        &self,
        gens: &mut S,
        out: &mut Vec<Result<Option<Frame>>>,
    ) -> Result<()> {
        out.clear();
        out.resize_with(gens.count(), || Ok(None));
        self.step_frames(gens, out, None)
    }

    /// The one frame step, for one generation or many, each one's result into `out`; `trace`
    /// records the first one's ODE. It runs on rayon's pool (see [`super::host::on_pool`]).
    fn step_frames<'m, S: Streams<'m> + ?Sized>(
        &self,
        gens: &mut S,
        out: &mut [Result<Option<Frame>>],
        trace: Option<&mut FlowTrace>,
    ) -> Result<()> {
        super::host::on_pool(|| {
            let mut kept = self.frame_scratch.try_lock();
            let mut fresh = FrameScratch::default();
            let s = kept.as_deref_mut().unwrap_or(&mut fresh);
            self.step_frames_with(s, gens, out, trace)
        })
    }

    fn step_frames_with<'m, S: Streams<'m> + ?Sized>(
        &self,
        s: &mut FrameScratch,
        gens: &mut S,
        out: &mut [Result<Option<Frame>>],
        trace: Option<&mut FlowTrace>,
    ) -> Result<()> {
        let FrameScratch {
            active,
            stepping,
            with_state,
            going,
            codes,
            stepped,
            states,
            semantics,
            noise,
            values,
        } = s;
        let d = self.backbone.dim();
        active.clear();
        for i in 0..gens.count() {
            let g = gens.stream(i);
            if g.finished.is_some() {
                continue;
            }
            if g.frames >= g.max_frames {
                g.finished = Some(StopReason::MaxFrames);
                continue;
            }
            if g.pending.is_some() && g.cache.len() + 1 > self.backbone.max_positions() {
                g.finished = Some(StopReason::ContextLimit);
                continue;
            }
            active.push(i);
        }
        // The backbone step for those that have a frame to feed back.
        stepping.clear();
        stepping.extend(
            active
                .iter()
                .copied()
                .filter(|&i| gens.stream(i).pending.is_some()),
        );
        let mut step_tensor = None;
        if !stepping.is_empty() {
            let t = Instant::now();
            codes.clear();
            for &i in stepping.iter() {
                codes.extend_from_slice(&gens.stream(i).pending.take().unwrap_or_default());
            }
            let caches = &mut Stepping {
                gens: &mut *gens,
                rows: &stepping[..],
                _m: std::marker::PhantomData,
            };
            step_tensor = self.backbone.step_frames(caches, codes, stepped)?;
            // As in `prefill`: on a GPU the step's time is its kernels', not their launches'.
            self.device.synchronize()?;
            let took = t.elapsed();
            for (row, &i) in stepping.iter().enumerate() {
                let g = gens.stream(i);
                match &step_tensor {
                    None => g.hidden.set_row(&stepped[row * d..][..d]),
                    Some(h) => g.hidden = Hidden::Tensor(h.get(row)?),
                }
                g.fresh = true;
                g.timings.backbone += took;
                g.timings.backbone_steps += 1;
            }
        }
        // Semantic codes, then the flow head for those that go on.
        let t = Instant::now();
        with_state.clear();
        with_state.extend(active.iter().copied().filter(|&i| gens.stream(i).fresh));
        if with_state.is_empty() {
            return Ok(());
        }
        // The states as host rows where the step gives rows, else as one tensor: usually
        // this frame's step rows in order, with no stack needed.
        let on_rows = self.backbone.steps_on_host();
        let mut batch = None;
        semantics.clear();
        if on_rows {
            states.clear();
            for &i in with_state.iter() {
                gens.stream(i).hidden.append_to(states)?;
            }
            self.head.semantic_codes_of_rows(states, semantics)?;
        } else {
            let h = match step_tensor {
                Some(h) if with_state == stepping => h,
                _ => self.stack_hidden(gens, with_state)?,
            };
            semantics.extend(self.head.semantic_codes(&h)?);
            batch = Some(h);
        }
        for &i in with_state.iter() {
            gens.stream(i).fresh = false;
        }
        // Those that end here; the others' codes and rows close up in place.
        going.clear();
        for (k, &i) in with_state.iter().enumerate() {
            let g = gens.stream(i);
            if semantics[k] == END_AUDIO {
                g.finished = Some(StopReason::EndOfAudio);
                if g.frames == 0 {
                    out[i] = Err(Error::NoAudio);
                }
                continue;
            }
            let j = going.len();
            semantics[j] = semantics[k];
            if on_rows && j != k {
                states.copy_within(k * d..(k + 1) * d, j * d);
            }
            going.push(i);
        }
        if going.is_empty() {
            return Ok(());
        }
        semantics.truncate(going.len());
        let (a, scale) = (self.head.n_acoustic(), self.head.noise_scale());
        noise.clear();
        noise.resize(going.len() * a, 0.0);
        for (&i, n) in going.iter().zip(noise.chunks_exact_mut(a.max(1))) {
            let g = gens.stream(i);
            g.noise.fill(g.frames, n)?;
            n.iter_mut().for_each(|v| *v *= scale);
        }
        let cfg = gens.stream(going[0]).cfg_alpha;
        // Different guidance strengths cannot share a pass.
        let one_pass = going.iter().all(|&i| gens.stream(i).cfg_alpha == cfg);
        values.clear();
        if on_rows {
            states.truncate(going.len() * d);
            if one_pass {
                self.head
                    .integrate_rows(states, noise, cfg, trace, values)?;
            } else {
                let mut x = Vec::new();
                for (k, &i) in going.iter().enumerate() {
                    let (h, n) = (&states[k * d..][..d], &noise[k * a..][..a]);
                    self.head
                        .integrate_rows(h, n, gens.stream(i).cfg_alpha, None, &mut x)?;
                    values.extend_from_slice(&x);
                }
            }
        } else {
            let h = match batch {
                Some(h) if going.len() == with_state.len() => h,
                _ => self.stack_hidden(gens, going)?,
            };
            let rows: Vec<Vec<f32>> = noise.chunks(a.max(1)).map(<[f32]>::to_vec).collect();
            let xs = if one_pass {
                self.head.integrate_batch(&h, &rows, cfg, trace)?
            } else {
                going
                    .iter()
                    .zip(&rows)
                    .enumerate()
                    .map(|(k, (&i, n))| {
                        self.head
                            .integrate(&h.get(k)?, n, gens.stream(i).cfg_alpha, None)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?
            };
            xs.iter().for_each(|x| values.extend_from_slice(x));
        }
        let took = t.elapsed();
        for (k, (&i, &semantic)) in going.iter().zip(semantics.iter()).enumerate() {
            let x = &values[k * a..][..a];
            let g = gens.stream(i);
            let mut codes = FrameCodes::new();
            codes.push(semantic);
            self.head.quantize_onto(x, &mut codes);
            g.timings.flow += took;
            g.frames += 1;
            g.pending = Some(codes);
            out[i] = Ok(Some(Frame { codes }));
        }
        Ok(())
    }

    /// The states of the generations at `rows`, stacked `[rows, dim]`.
    fn stack_hidden<'m, S: Streams<'m> + ?Sized>(
        &self,
        gens: &mut S,
        rows: &[usize],
    ) -> Result<Tensor> {
        let hs = rows
            .iter()
            .map(|&i| gens.stream(i).hidden.tensor())
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&hs, 0)?)
    }
}
