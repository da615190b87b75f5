//! The per-frame loop on the CPU allocates nothing once its buffers have grown: the frame step
//! (backbone step, semantic code, flow head) and the streaming codec, for one stream as
//! `voxtrald bench` runs it and for several stepped together with marks as the engine does.
//! Counted by the crate's counting allocator, installed in this test binary; it holds this one
//! test, so no other test's allocations mix in.

mod common;

use candle_core::{DType, Device};
use common::*;
use voxtrald::heap;
use voxtrald::model::noise::SeededNoise;
use voxtrald::model::stream::{ChunkSchedule, StreamingDecoder};
use voxtrald::model::{GenerateOptions, Generation, StepMark, Voxtral};

#[global_allocator]
static HEAP: heap::Counted = heap::Counted;

/// Frames before counting: every buffer grows to its chunk's size in the first chunks.
const WARM: usize = 24;
/// Frames counted after those.
const COUNTED: usize = 72;

/// Short chunks, so that the counted frames hold several of them.
const SCHEDULE: ChunkSchedule = ChunkSchedule {
    first: 2,
    ramp: 4,
    ramp_until: 8,
    steady: 6,
};

fn count() -> u64 {
    heap::counts()
        .expect("the counting allocator is installed")
        .0
}

fn start<'m>(m: &'m Voxtral, voice: &str, seed: u64, frames: usize) -> Generation<'m> {
    let prompt = m.prompt(voice, "Hello world.").unwrap();
    let opts = GenerateOptions {
        max_frames: frames,
        ..Default::default()
    };
    m.start(&prompt, Box::new(SeededNoise::new(seed)), &opts)
        .unwrap()
}

/// Once warm, at most one frame in twelve allocates at all, and as rarely in all. What may
/// still allocate is growth that is not per frame: rayon's shared job queue (a block every 63
/// jobs pushed from outside the pool, one a step), the attention scores and the KV cache as
/// the context lengthens.
fn rare(what: &str, per_frame: &[u64]) {
    assert_eq!(per_frame.len(), WARM + COUNTED, "{what}: frames");
    let warm = &per_frame[WARM..];
    let total: u64 = warm.iter().sum();
    let frames = warm.iter().filter(|&&n| n > 0).count();
    assert!(
        frames <= COUNTED / 12 && total <= COUNTED as u64 / 12,
        "{what}: {frames} of {COUNTED} warm frames allocated, {total} allocations in all: {warm:?}"
    );
}

#[test]
fn the_frame_loop_allocates_nothing_once_warm() {
    let m = model();
    // The codec is on host rows wherever the CPU has the panels' kernels (not under
    // `VOXTRALD_KERNEL=candle`, where each chunk runs candle's ops and is not counted).
    let on_panels = voxtrald::model::panels::suit(&Device::Cpu, DType::F32);
    assert_eq!(m.codec().decodes_on_host(), on_panels);
    heap::start_counting();

    // One stream, as `voxtrald bench` runs it: the step's allocations and the codec's apart.
    let mut gen = start(m, "casual_male", 5, WARM + COUNTED);
    let mut dec = StreamingDecoder::new(SCHEDULE);
    let (mut steps, mut codec) = (
        Vec::with_capacity(WARM + COUNTED),
        Vec::with_capacity(WARM + COUNTED),
    );
    let (mut chunks, mut samples) = (0, 0);
    loop {
        let before = count();
        let Some(frame) = gen.next_frame().unwrap() else {
            break;
        };
        let stepped = count();
        if let Some(chunk) = dec.push(m.codec(), &frame.codes).unwrap() {
            chunks += 1;
            samples += chunk.len();
        }
        steps.push(stepped - before);
        codec.push(count() - stepped);
    }
    assert!(
        steps.len() == WARM + COUNTED,
        "the tiny model speaks to its frame limit ({:?})",
        gen.stop_reason()
    );
    assert!(chunks > COUNTED / SCHEDULE.steady && samples > 0);
    rare("one stream's frame step", &steps);
    if on_panels {
        rare("one stream's codec", &codec);
    }

    // Two streams in one step each frame, each marked before it as the engine's worker does
    // (marks kept from step to step, released after it), each with its own decoder. (Two: in
    // f32 the flow head's projections take at most 16 rows on host buffers, 6 a stream;
    // beyond, candle's matmul runs them and allocates its results.)
    // (Two frames more each, for the check at the end.)
    let frames = WARM + COUNTED + 2;
    let mut gens = [
        start(m, "casual_male", 1, frames),
        start(m, "fr_female", 2, frames),
    ];
    let mut refs: Vec<&mut Generation> = gens.iter_mut().collect();
    let mut decs: Vec<StreamingDecoder> = (0..refs.len())
        .map(|_| StreamingDecoder::new(SCHEDULE))
        .collect();
    let mut marks: Vec<StepMark> = refs.iter().map(|g| g.mark()).collect();
    let mut results = Vec::new();
    let (mut steps, mut codecs) = (
        Vec::with_capacity(WARM + COUNTED),
        Vec::with_capacity(WARM + COUNTED),
    );
    for _ in 0..WARM + COUNTED {
        let before = count();
        for (g, mark) in refs.iter().zip(&mut marks) {
            g.mark_into(mark);
        }
        m.next_frames_into(&mut refs[..], &mut results).unwrap();
        marks.iter_mut().for_each(StepMark::release);
        let stepped = count();
        for (r, dec) in results.drain(..).zip(&mut decs) {
            let frame = r
                .unwrap()
                .expect("every stream speaks past the counted frames");
            dec.push(m.codec(), &frame.codes).unwrap();
        }
        steps.push(stepped - before);
        codecs.push(count() - stepped);
    }
    rare("two streams' marks and frame steps", &steps);
    if on_panels {
        rare("two streams' codecs", &codecs);
    }
    // A mark retaken this way still takes a stream back, its cache included: the step after
    // the restore makes the same frames again.
    for (g, mark) in refs.iter().zip(&mut marks) {
        g.mark_into(mark);
    }
    let positions = refs[0].positions();
    m.next_frames_into(&mut refs[..], &mut results).unwrap();
    let first: Vec<_> = results.drain(..).map(|r| r.unwrap().unwrap()).collect();
    assert_eq!(refs[0].positions(), positions + 1);
    for (g, mark) in refs.iter_mut().zip(&marks) {
        g.restore(mark);
    }
    assert_eq!(refs[0].positions(), positions);
    m.next_frames_into(&mut refs[..], &mut results).unwrap();
    let again: Vec<_> = results.drain(..).map(|r| r.unwrap().unwrap()).collect();
    assert_eq!(first, again, "the frames after a restore");
}
