//! Nothing is tied to the fixture's numbers: a checkpoint with other head counts, layer
//! counts, widths, codebook sizes and voice rows loads and runs through every path.

mod common;

use std::sync::OnceLock;

use common::*;
use voxtrald::model::noise::SeededNoise;
use voxtrald::model::stream::{ChunkSchedule, StreamingDecoder};
use voxtrald::model::StopReason;
use voxtrald::{Error, GenerateOptions, LoadOptions, Voxtral};

struct Odd {
    _dir: tempfile::TempDir,
    model: Voxtral,
}

fn odd() -> &'static Voxtral {
    static M: OnceLock<Odd> = OnceLock::new();
    &M.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        odd::write_odd(dir.path());
        let model = Voxtral::load(dir.path(), &LoadOptions::default()).unwrap();
        Odd { _dir: dir, model }
    })
    .model
}

fn generate(
    m: &Voxtral,
    voice: &str,
    seed: u64,
    max_frames: usize,
) -> (Vec<Vec<u32>>, Option<StopReason>) {
    let prompt = m.prompt(voice, "Odd shapes, same code.").unwrap();
    let opts = GenerateOptions {
        max_frames,
        ..Default::default()
    };
    let mut gen = m
        .start(&prompt, Box::new(SeededNoise::new(seed)), &opts)
        .unwrap();
    let mut frames = Vec::new();
    while let Some(f) = gen.next_frame().unwrap() {
        frames.push(f.codes.to_vec());
    }
    (frames, gen.stop_reason())
}

#[test]
fn odd_shapes_generate_and_decode() {
    let m = odd();
    assert_eq!(m.samples_per_frame(), 8 * 60);
    assert_eq!(m.voice("beta").unwrap().dims(), &[9, 48]);
    let prompt = m.prompt("beta", "Hi").unwrap();
    assert_eq!(prompt.ids.iter().filter(|&&i| i == 24).count(), 9);
    let (frames, stop) = generate(m, "beta", 1, 12);
    assert_eq!(frames.len(), 12);
    assert_eq!(stop, Some(StopReason::MaxFrames));
    for f in &frames {
        assert_eq!(f.len(), 9);
        assert!((2..502).contains(&f[0]), "semantic {}", f[0]);
        assert!(f[1..].iter().all(|c| (2..13).contains(c)), "{f:?}");
    }
    let wave = m.decode(&frames).unwrap();
    assert_eq!(wave.len(), 12 * 480);
    assert!(wave.iter().all(|s| s.is_finite()));
    // Same seed, same codes; another seed, other codes.
    assert_eq!(generate(m, "beta", 1, 12).0, frames);
    assert_ne!(generate(m, "beta", 2, 12).0, frames);
}

#[test]
fn odd_shapes_kv_cache_and_streaming() {
    let m = odd();
    let prompt = m.prompt("alpha", "Cache me if you can.").unwrap();
    let mut full = m.backbone().new_cache();
    let want = flat(&m.backbone().forward(&mut full, &prompt.embeddings).unwrap());
    let mut inc = m.backbone().new_cache();
    let mut got = Vec::new();
    for p in 0..prompt.ids.len() {
        let row = prompt.embeddings.narrow(0, p, 1).unwrap();
        got.extend(flat(&m.backbone().forward(&mut inc, &row).unwrap()));
    }
    assert_close("incremental vs full", &got, &want, 1e-5, 1e-5);

    let (frames, _) = generate(m, "alpha", 3, 40);
    let whole = m.decode(&frames).unwrap();
    let mut dec = StreamingDecoder::new(ChunkSchedule::default());
    let mut streamed = Vec::new();
    for f in &frames {
        if let Some(c) = dec.push(m.codec(), f).unwrap() {
            streamed.extend(c);
        }
    }
    streamed.extend(dec.flush(m.codec()).unwrap());
    assert!(max_abs_diff(&streamed, &whole) <= 1e-5);
}

#[test]
fn context_limit_stops_generation_and_rejects_long_prompts() {
    let dir = tempfile::tempdir().unwrap();
    odd::write_odd(dir.path());
    let opts = LoadOptions {
        max_positions: 40,
        ..Default::default()
    };
    let m = Voxtral::load(dir.path(), &opts).unwrap();
    let prompt = m.prompt("alpha", "Short.").unwrap(); // 2 + 6 + 5 = 13 positions
    assert_eq!(prompt.ids.len(), 13);
    let mut gen = m
        .start(
            &prompt,
            Box::new(SeededNoise::new(0)),
            &GenerateOptions::default(),
        )
        .unwrap();
    let mut n = 0;
    while gen.next_frame().unwrap().is_some() {
        n += 1;
    }
    assert_eq!(gen.stop_reason(), Some(StopReason::ContextLimit));
    // Frame k (k >= 1) needs position 13 + k - 1; the last one fits at position 39.
    assert_eq!(n, 40 - 13 + 1);
    assert_eq!(gen.positions(), 40);
    let long = "x".repeat(100);
    assert!(matches!(
        m.prompt("alpha", &long),
        Err(Error::ContextOverflow { limit: 40, .. })
    ));
}

#[test]
fn ending_before_the_first_frame_is_an_error() {
    // With an all-zero semantic head every logit ties and the first allowed index,
    // [END_AUDIO], wins at once.
    let d = scratch_copy();
    rewrite_weights(d.path(), |m| {
        let t = m
            .get_mut("acoustic_transformer.semantic_codebook_output.weight")
            .unwrap();
        t.2.iter_mut().for_each(|b| *b = 0);
    });
    let m = Voxtral::load(d.path(), &LoadOptions::default()).unwrap();
    let prompt = m.prompt("casual_male", "Hello world.").unwrap();
    let mut gen = m
        .start(
            &prompt,
            Box::new(SeededNoise::new(0)),
            &GenerateOptions::default(),
        )
        .unwrap();
    assert!(matches!(gen.next_frame(), Err(Error::NoAudio)));
    assert!(gen.next_frame().unwrap().is_none());
}
