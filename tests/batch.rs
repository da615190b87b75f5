//! Several utterances decoded together share each backbone step and flow-head pass, and
//! prompts arriving together share one prefill pass; the frames must be those of decoding
//! each alone.

mod common;

use common::*;
use voxtrald::model::noise::SeededNoise;
use voxtrald::model::{Frame, FrameCodes, GenerateOptions, Generation, Voxtral};

fn start<'m>(m: &'m Voxtral, voice: &str, text: &str, seed: u64, frames: usize) -> Generation<'m> {
    let prompt = m.prompt(voice, text).unwrap();
    let opts = GenerateOptions {
        max_frames: frames,
        ..Default::default()
    };
    m.start(&prompt, Box::new(SeededNoise::new(seed)), &opts)
        .unwrap()
}

/// A frame's codes and the backbone state that produced it.
type Made = (FrameCodes, Vec<f32>);

fn made(g: &Generation, f: Frame) -> Made {
    let hidden = g.hidden().unwrap().flatten_all().unwrap();
    (f.codes, hidden.to_vec1().unwrap())
}

fn next(g: &mut Generation) -> Option<Made> {
    let f = g.next_frame().unwrap()?;
    Some(made(g, f))
}

#[test]
fn batched_frames_equal_frames_decoded_alone() {
    let m = model();
    let cases = [
        ("casual_male", "Hello world.", 3, 9),
        ("fr_female", "Bonjour à tous, comment allez-vous ?", 4, 6),
        ("de_male", "Guten Tag.", 5, 12),
    ];
    let alone: Vec<Vec<Made>> = cases
        .iter()
        .map(|&(v, t, seed, n)| {
            let mut g = start(m, v, t, seed, n);
            std::iter::from_fn(|| next(&mut g)).collect()
        })
        .collect();
    let mut gens: Vec<Generation> = cases
        .iter()
        .map(|&(v, t, seed, n)| start(m, v, t, seed, n))
        .collect();
    let mut together: Vec<Vec<Made>> = vec![Vec::new(); cases.len()];
    loop {
        let mut refs: Vec<&mut Generation> = gens.iter_mut().collect();
        let step = m.next_frames(&mut refs).unwrap();
        if step.iter().all(|r| matches!(r, Ok(None))) {
            break;
        }
        for (i, r) in step.into_iter().enumerate() {
            if let Some(f) = r.unwrap() {
                together[i].push(made(&gens[i], f));
            }
        }
    }
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a.len(), b.len(), "utterance {i}: frame counts");
        assert_eq!(a.len(), cases[i].3, "utterance {i} ran to its frame limit");
        for (fa, fb) in a.iter().zip(b) {
            assert_eq!(fa.0, fb.0, "utterance {i}: codes");
            let d = max_abs_diff(&fa.1, &fb.1);
            assert!(d <= 1e-4, "utterance {i}: hidden states differ by {d}");
        }
    }
    for g in &gens {
        assert!(g.stop_reason().is_some());
    }
}

#[test]
fn prompts_prefilled_together_give_the_frames_of_each_alone() {
    let m = model();
    let cases = [
        ("casual_male", "Hello world.", 3),
        (
            "fr_female",
            "Bonjour à tous, comment allez-vous ce matin ?",
            4,
        ),
        ("de_male", "Guten Tag.", 5),
    ];
    let prompts: Vec<_> = cases
        .iter()
        .map(|&(v, t, _)| m.prompt(v, t).unwrap())
        .collect();
    let lens: Vec<usize> = prompts.iter().map(|p| p.ids.len()).collect();
    assert!(
        lens[0] != lens[1] && lens[1] != lens[2],
        "prompts of different lengths: {lens:?}"
    );
    let opts = GenerateOptions {
        max_frames: 5,
        ..Default::default()
    };
    let refs: Vec<&_> = prompts.iter().collect();
    let prefills = m.prefill(&refs).unwrap();
    for ((&(v, t, seed), prefill), prompt) in cases.iter().zip(prefills).zip(&prompts) {
        let mut together = m.generation(prefill, Box::new(SeededNoise::new(seed)), &opts);
        let mut alone = start(m, v, t, seed, 5);
        assert_eq!(together.positions(), prompt.ids.len());
        assert_eq!(together.positions(), alone.positions());
        let mut n = 0;
        while let Some(fa) = next(&mut alone) {
            let fb = next(&mut together).expect("as many frames");
            assert_eq!(fa.0, fb.0, "{t}: codes of frame {n}");
            let d = max_abs_diff(&fa.1, &fb.1);
            assert!(d <= 1e-4, "{t}: hidden states of frame {n} differ by {d}");
            n += 1;
        }
        assert_eq!(n, 5);
        assert!(together.next_frame().unwrap().is_none());
    }
}

/// The warm-up a server runs on a GPU before its first client speaks a sentence and leaves
/// nothing behind: the frames after it are those of a model that never ran.
#[test]
fn a_warm_up_leaves_the_model_as_it_was() {
    let m = model();
    let codes = |m: &Voxtral| -> Vec<Vec<u32>> {
        let mut g = start(m, "casual_male", "Hello world.", 5, 6);
        std::iter::from_fn(|| g.next_frame().unwrap())
            .map(|f| f.codes.to_vec())
            .collect()
    };
    let before = codes(m);
    assert!(!before.is_empty());
    let took = m.warm_up().expect("warm-up");
    assert!(took.as_nanos() > 0);
    assert_eq!(codes(m), before);
}
