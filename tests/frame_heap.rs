//! The per-frame loop on the CPU allocates nothing once its buffers have grown: the frame step
//! (backbone step, semantic code, flow head) and the streaming codec, as `voxtrald bench` runs
//! them. Counted by the crate's counting allocator, installed in this test binary; it holds
//! this one test, so no other test's allocations mix in.

mod common;

use candle_core::{DType, Device};
use common::*;
use voxtrald::heap;
use voxtrald::model::noise::SeededNoise;
use voxtrald::model::stream::{ChunkSchedule, StreamingDecoder};
use voxtrald::model::GenerateOptions;

#[global_allocator]
static HEAP: heap::Counted = heap::Counted;

/// Frames before counting: every buffer grows to its chunk's size in the first chunks.
const WARM: usize = 24;
/// Frames counted after those.
const COUNTED: usize = 72;

#[test]
fn the_frame_loop_allocates_nothing_once_warm() {
    let m = model();
    let prompt = m.prompt("casual_male", "Hello world.").unwrap();
    let opts = GenerateOptions {
        max_frames: WARM + COUNTED,
        ..Default::default()
    };
    let mut gen = m
        .start(&prompt, Box::new(SeededNoise::new(5)), &opts)
        .unwrap();
    // Short chunks, so that the counted frames hold several of them.
    let schedule = ChunkSchedule {
        first: 2,
        ramp: 4,
        ramp_until: 8,
        steady: 6,
    };
    let mut dec = StreamingDecoder::new(schedule);
    // Allocations of each frame's step, and of its codec push.
    let (mut steps, mut codec) = (
        Vec::with_capacity(WARM + COUNTED),
        Vec::with_capacity(WARM + COUNTED),
    );
    let (mut chunks, mut samples) = (0, 0);
    let count = || {
        heap::counts()
            .expect("the counting allocator is installed")
            .0
    };
    heap::start_counting();
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
    assert_eq!(
        steps.len(),
        WARM + COUNTED,
        "the tiny model speaks to its frame limit ({:?})",
        gen.stop_reason()
    );
    assert!(chunks > COUNTED / schedule.steady && samples > 0);
    // What may still allocate is growth that is not per frame: rayon's shared job queue (a
    // block every 63 jobs pushed from outside the pool, one a frame), the attention scores
    // and the KV cache as the context lengthens.
    let rare = |what: &str, per_frame: &[u64]| {
        let warm = &per_frame[WARM..];
        let total: u64 = warm.iter().sum();
        let frames = warm.iter().filter(|&&n| n > 0).count();
        assert!(
            frames <= COUNTED / 12 && total <= COUNTED as u64 / 12,
            "{what}: {frames} of {COUNTED} warm frames allocated, {total} allocations in all: \
             {warm:?}"
        );
    };
    // The frame step runs on host buffers wherever the model is on the CPU in f32.
    rare("the frame step", &steps);
    // The codec, on host rows wherever the CPU has the panels' kernels (not under
    // `VOXTRALD_KERNEL=candle`, where each chunk runs candle's ops).
    let on_panels = voxtrald::model::panels::suit(&Device::Cpu, DType::F32);
    assert_eq!(m.codec().decodes_on_host(), on_panels);
    if on_panels {
        rare("the codec", &codec);
    }
}
