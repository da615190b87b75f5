//! Property-based fuzzing of the parsers that take outside input: the Tekken tokenizer, SSML,
//! sentence splitting, the socket protocol, the config file, and the voice and checkpoint
//! loaders (bytes flipped and files cut short). No panic, a clear error, and the properties
//! that must hold. (The Wyoming framing has its own in `src/frontends/wyoming.rs`.)
//!
//! A fixed seed and case count by default, so CI is repeatable; a longer run:
//! `VOXTRALD_FUZZ_CASES=20000 VOXTRALD_FUZZ_SEED=$RANDOM cargo test --test fuzz`.

mod common;

use std::path::Path;

use common::{fixture_dir, model};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed};
use voxtrald::frontends::protocol::Message;
use voxtrald::library::store::read_voice;
use voxtrald::library::{CodeOffset, Codes, Library};
use voxtrald::text::sentences::split_sentences;
use voxtrald::text::ssml;

fn config(scale: u32) -> Config {
    let cases = std::env::var("VOXTRALD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256u32);
    let seed = std::env::var("VOXTRALD_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_u64);
    Config {
        cases: (cases / scale).max(4),
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Text with the characters that matter: markup, entities, punctuation of every script the
/// model reads, whitespace, and anything else.
/// `src` with bytes flipped (never to themselves) and, when given, cut short.
fn damage(
    src: &[u8],
    flips: &[(prop::sample::Index, u8)],
    cut: Option<prop::sample::Index>,
) -> Vec<u8> {
    let mut bytes = src.to_vec();
    for (i, b) in flips {
        let i = i.index(bytes.len());
        bytes[i] ^= b | 1;
    }
    if let Some(c) = cut {
        bytes.truncate(c.index(src.len()));
    }
    bytes
}

fn texty() -> impl Strategy<Value = String> {
    let pieces = prop_oneof![
        Just("<speak>".to_string()),
        Just("</speak>".to_string()),
        Just("<mark name=\"1:2\"/>".to_string()),
        Just("<say-as interpret-as=\"characters\">".to_string()),
        Just("</say-as>".to_string()),
        Just("<sub alias=\"x\">".to_string()),
        Just("<break time=\"200ms\"/>".to_string()),
        Just("&amp;".to_string()),
        Just("&#x263A;".to_string()),
        Just("&bogus;".to_string()),
        Just("<".to_string()),
        Just(">".to_string()),
        Just(". ".to_string()),
        Just("? ".to_string()),
        Just("। ".to_string()),
        Just("。".to_string()),
        Just("Dr. ".to_string()),
        Just("\n".to_string()),
        "[a-zA-Z ]{0,12}",
        any::<String>(),
    ];
    proptest::collection::vec(pieces, 0..24).prop_map(|v| v.concat())
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn ssml_never_panics_and_marks_fall_inside_the_text(s in texty()) {
        let (text, marks) = ssml::to_text(&s);
        let n = text.chars().count();
        let mut last = 0;
        for m in &marks {
            prop_assert!(m.offset <= n, "mark at {} beyond {n}", m.offset);
            prop_assert!(m.offset >= last, "marks out of order");
            last = m.offset;
        }
    }

    #[test]
    fn plain_text_passes_ssml_unchanged(s in "[a-zA-Z0-9 .,!?']{0,80}") {
        prop_assert_eq!(ssml::to_text(&s).0, s);
    }

    #[test]
    fn sentences_are_ordered_nonempty_and_bounded(s in texty(), max in 1usize..400) {
        let n = s.chars().count();
        let mut end = 0;
        for r in split_sentences(&s, max) {
            prop_assert!(r.start >= end && r.start < r.end && r.end <= n, "{r:?} of {n}");
            prop_assert!(r.len() <= max, "{r:?} longer than {max}");
            end = r.end;
        }
    }

    #[test]
    fn the_tokenizer_takes_any_text_and_round_trips(s in texty()) {
        let tok = model().tokenizer();
        let ids = tok.encode(&s);
        prop_assert_eq!(tok.decode(&ids), s);
    }

    #[test]
    fn socket_messages_never_panic_and_speak_round_trips(
        raw in any::<String>(),
        text in any::<String>(),
    ) {
        let _ = serde_json::from_str::<Message>(&raw);
        let line = serde_json::to_string(&Message::speak(text.clone(), Default::default())).unwrap();
        match serde_json::from_str::<Message>(&line).unwrap() {
            Message::Speak(s) => prop_assert_eq!(s.text, text),
            other => prop_assert!(false, "{other:?}"),
        }
    }

    #[test]
    fn socket_messages_with_wrong_fields_are_errors(
        op in "(speak|cancel|stop|pause|voices|status|fly)",
        key in "(text|job|rate|pitch|volume|priority|output|seed|bogus)",
        value in prop_oneof![Just("1".to_string()), Just("\"x\"".to_string()), Just("null".to_string()), Just("[]".to_string()), Just("-7".to_string()), Just("1e400".to_string())],
    ) {
        let raw = format!("{{\"op\": \"{op}\", \"{key}\": {value}}}");
        // Either a message or an error; never a panic.
        let _ = serde_json::from_str::<Message>(&raw);
    }
}

proptest! {
    #![proptest_config(config(4))]

    #[test]
    fn config_files_are_read_or_refused_with_a_reason(
        lines in proptest::collection::vec(prop_oneof![
            Just("rate = 2.0".to_string()),
            Just("rate = \"fast\"".to_string()),
            Just("pitch = 9".to_string()),
            Just("device = \"cuda:x\"".to_string()),
            Just("quant = \"q8\"".to_string()),
            Just("max_memory = \"12 parsecs\"".to_string()),
            Just("http = \"0.0.0.0:1\"".to_string()),
            Just("wyoming = \"unix:relative\"".to_string()),
            Just("[limits]".to_string()),
            Just("stall_timeout = -1".to_string()),
            Just("[lexicon]".to_string()),
            Just("\"\" = \"x\"".to_string()),
            Just("[[".to_string()),
            any::<String>(),
        ], 0..8),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(&path, lines.join("\n")).unwrap();
        if let Err(e) = voxtrald::settings::Config::load(&path) {
            let msg = e.to_string();
            prop_assert!(msg.contains("config.toml"), "the error names the file: {msg}");
        }
    }

    #[test]
    fn damaged_code_files_are_errors(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>(), truncate in any::<bool>()) {
        let src = Codes::new(common::random_frames(6, 3)).unwrap().to_npy();
        let bytes = damage(&src, &flips, truncate.then_some(cut));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("codes.npy");
        std::fs::write(&path, &bytes).unwrap();
        let read = std::panic::catch_unwind(|| Codes::read_npy(&path, CodeOffset::Auto).map(|_| ()));
        let Ok(result) = read else {
            return Err(TestCaseError::fail("read_npy panicked"));
        };
        if let Err(e) = result {
            prop_assert!(e.to_string().contains("codes.npy"), "{e}");
        }
    }

    #[test]
    fn damaged_user_voice_files_are_errors(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>(), truncate in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let npy = dir.path().join("in.npy");
        std::fs::write(&npy, Codes::new(common::random_frames(4, 2)).unwrap().to_npy()).unwrap();
        let lib = Library::new(dir.path().join("voices"));
        let v = lib.import("mine", "en", &npy, CodeOffset::Auto).unwrap();
        let src = std::fs::read(&v.path).unwrap();
        let path = dir.path().join("voices/hurt.json");
        std::fs::write(&path, damage(&src, &flips, truncate.then_some(cut))).unwrap();
        let read = std::panic::catch_unwind(|| read_voice(&path).map(|_| ()));
        let Ok(result) = read else {
            return Err(TestCaseError::fail("read_voice panicked"));
        };
        if let Err(e) = result {
            prop_assert!(e.to_string().contains("hurt"), "{e}");
        }
        // The library lists the damaged file beside the good one, whatever the damage.
        let scanned = lib.scan();
        prop_assert_eq!(scanned.len(), 2);
        prop_assert!(scanned.iter().any(|r| r.as_ref().is_ok_and(|u| u.name == "mine")));
    }

    #[test]
    fn damaged_voice_files_are_errors(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6), cut in any::<prop::sample::Index>(), truncate in any::<bool>()) {
        let src = std::fs::read(fixture_dir().join("voice_embedding/fr_female.pt")).unwrap();
        let bytes = damage(&src, &flips, truncate.then_some(cut));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fr_female.pt");
        std::fs::write(&path, &bytes).unwrap();
        // A flip can land where nothing is checked (padding, the float data itself); what
        // must never happen is a panic, and a refusal must name the file.
        let read = std::panic::catch_unwind(|| {
            voxtrald::model::voice::read_voice_file(&path, "fr_female", 64).map(|_| ())
        });
        let Ok(result) = read else {
            return Err(TestCaseError::fail("read_voice_file panicked"));
        };
        if let Err(e) = result {
            prop_assert!(e.to_string().contains("fr_female"), "{e}");
        }
    }
}

proptest! {
    #![proptest_config(config(16))]

    #[test]
    fn damaged_checkpoint_headers_are_errors(
        flips in proptest::collection::vec((0usize..4096, any::<u8>()), 1..4),
        cut in prop_oneof![Just(None), (0usize..8192).prop_map(Some)],
    ) {
        let dir = common::scratch_copy();
        let path = dir.path().join("consolidated.safetensors");
        let mut bytes = std::fs::read(fixture_dir().join("consolidated.safetensors")).unwrap();
        for (i, b) in &flips {
            bytes[*i] ^= b | 1;
        }
        if let Some(n) = cut {
            bytes.truncate(n);
        }
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        let loaded = std::panic::catch_unwind(|| {
            voxtrald::Voxtral::load(dir.path(), &voxtrald::LoadOptions::default()).map(|_| ())
        });
        let Ok(result) = loaded else {
            return Err(TestCaseError::fail("loading panicked"));
        };
        if let Err(e) = result {
            let msg = e.to_string();
            prop_assert!(!msg.is_empty());
            prop_assert!(
                msg.contains("consolidated.safetensors") || msg.contains("tensor"),
                "the error names the file or tensor: {msg}"
            );
        }
    }
}

#[test]
fn the_fixture_is_where_the_fuzzers_expect_it() {
    assert!(Path::new(&fixture_dir())
        .join("voice_embedding/fr_female.pt")
        .exists());
}
