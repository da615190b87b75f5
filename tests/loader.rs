//! Every bad checkpoint gives its own clear error, naming the file and the tensor.

mod common;

use std::path::Path;

use common::*;
use voxtrald::model::random::torch_tensor_archive;
use voxtrald::{Error, LoadOptions, Voxtral};

fn load(dir: &Path) -> Result<Voxtral, Error> {
    Voxtral::load(dir, &LoadOptions::default())
}

fn replace(dir: &Path, name: &str, bytes: &[u8]) {
    let p = dir.join(name);
    let _ = std::fs::remove_file(&p);
    std::fs::write(p, bytes).unwrap();
}

#[test]
fn missing_files_are_named() {
    for name in ["params.json", "consolidated.safetensors", "tekken.json"] {
        let d = scratch_copy();
        std::fs::remove_file(d.path().join(name)).unwrap();
        let err = load(d.path()).err().expect("must fail");
        assert!(matches!(err, Error::Io { .. }), "{name}: {err}");
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn missing_tensor_is_named() {
    let d = scratch_copy();
    rewrite_weights(d.path(), |m| {
        m.remove("layers.1.feed_forward.w3.weight");
    });
    let err = load(d.path()).err().expect("must fail");
    match &err {
        Error::MissingTensor { path, name } => {
            assert_eq!(name, "layers.1.feed_forward.w3.weight");
            assert!(path.ends_with("consolidated.safetensors"));
        }
        e => panic!("unexpected {e}"),
    }
    assert!(err.to_string().contains("layers.1.feed_forward.w3.weight"));
}

#[test]
fn misshaped_tensor_is_named() {
    let d = scratch_copy();
    rewrite_weights(d.path(), |m| {
        let t = m
            .get_mut("audio_tokenizer.decoder_blocks.3.layers.0.attention.wk.weight")
            .unwrap();
        t.1 = vec![32, 64];
        t.2.truncate(32 * 64 * 2);
    });
    match load(d.path()).err().expect("must fail") {
        Error::TensorShape {
            name,
            found,
            expected,
            ..
        } => {
            assert_eq!(
                name,
                "audio_tokenizer.decoder_blocks.3.layers.0.attention.wk.weight"
            );
            assert_eq!(found, vec![32, 64]);
            assert_eq!(expected, "[64, 64]");
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn wrong_dtype_is_named() {
    let d = scratch_copy();
    rewrite_weights(d.path(), |m| {
        let t = m.get_mut("norm.weight").unwrap();
        t.0 = safetensors::Dtype::I16;
    });
    match load(d.path()).err().expect("must fail") {
        Error::TensorDtype { name, found, .. } => {
            assert_eq!(name, "norm.weight");
            assert_eq!(found, "I16");
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn corrupt_weights_are_reported() {
    let d = scratch_copy();
    let bytes = std::fs::read(fixture_dir().join("consolidated.safetensors")).unwrap();
    // Truncated mid-data.
    replace(
        d.path(),
        "consolidated.safetensors",
        &bytes[..bytes.len() / 2],
    );
    let err = load(d.path()).err().expect("must fail");
    assert!(matches!(err, Error::CorruptCheckpoint { .. }), "{err}");
    assert!(err.to_string().contains("consolidated.safetensors"));
    // Garbage header.
    replace(
        d.path(),
        "consolidated.safetensors",
        b"\xff\xff\xff\xff\xff\xff\x00\x00garbage",
    );
    assert!(matches!(
        load(d.path()),
        Err(Error::CorruptCheckpoint { .. })
    ));
    // Empty file.
    replace(d.path(), "consolidated.safetensors", b"");
    assert!(matches!(
        load(d.path()),
        Err(Error::CorruptCheckpoint { .. })
    ));
}

#[test]
fn bad_config_names_the_file() {
    let d = scratch_copy();
    replace(d.path(), "params.json", b"{\"dim\": 64,");
    let err = load(d.path()).err().expect("must fail");
    assert!(matches!(err, Error::Config { .. }), "{err}");
    assert!(err.to_string().contains("params.json"));

    let mut p: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture_dir().join("params.json")).unwrap()).unwrap();
    p["multimodal"]["audio_tokenizer_args"]["decoder_convs_strides_str"] = "1,2,x,2".into();
    replace(d.path(), "params.json", &serde_json::to_vec(&p).unwrap());
    let err = load(d.path()).err().expect("must fail");
    assert!(
        err.to_string().contains("decoder_convs_strides_str"),
        "{err}"
    );
}

#[test]
fn bad_tokenizer_is_reported() {
    let d = scratch_copy();
    replace(d.path(), "tekken.json", b"{\"config\": {}}");
    let err = load(d.path()).err().expect("must fail");
    assert!(matches!(err, Error::Tokenizer { .. }), "{err}");
    assert!(err.to_string().contains("tekken.json"));
}

fn voice_file(rows: usize) -> Vec<u8> {
    let data: Vec<u8> = (0..rows * 64)
        .flat_map(|i| {
            half::bf16::from_f32((i % 7) as f32 * 0.01)
                .to_bits()
                .to_le_bytes()
        })
        .collect();
    torch_tensor_archive("voice_embed", rows, 64, &data)
}

#[test]
fn voice_row_count_must_match_tekken() {
    let d = scratch_copy();
    // casual_male has 4 [AUDIO] rows in tekken.json; give it 5.
    replace(d.path(), "voice_embedding/casual_male.pt", &voice_file(5));
    let m = load(d.path()).unwrap();
    match m.voice("casual_male").expect_err("must fail") {
        Error::VoiceRows {
            path,
            voice,
            rows,
            expected,
        } => {
            assert!(path.ends_with("voice_embedding/casual_male.pt"));
            assert_eq!((voice.as_str(), rows, expected), ("casual_male", 5, 4));
        }
        e => panic!("unexpected {e}"),
    }
    // Other voices still work, and a correct file written by our writer reads back.
    assert_eq!(m.voice("fr_female").unwrap().dims(), &[3, 64]);
    replace(d.path(), "voice_embedding/neutral_male.pt", &voice_file(3));
    let v = m.voice("neutral_male").unwrap();
    assert_eq!(v.dims(), &[3, 64]);
    let vals = flat(&v);
    assert!((vals[8] - 0.01).abs() < 1e-3);
}

#[test]
fn corrupt_or_missing_voice_files_are_reported() {
    let d = scratch_copy();
    replace(
        d.path(),
        "voice_embedding/de_male.pt",
        b"PK\x03\x04 not really a zip",
    );
    std::fs::remove_file(d.path().join("voice_embedding/it_male.pt")).unwrap();
    let m = load(d.path()).unwrap();
    let err = m.voice("de_male").expect_err("must fail");
    assert!(matches!(err, Error::Voice { .. }), "{err}");
    assert!(err.to_string().contains("de_male.pt"), "{err}");
    let err = m.voice("it_male").expect_err("must fail");
    assert!(err.to_string().contains("it_male.pt"), "{err}");
    // A tensor of the wrong width.
    let data = vec![0u8; 4 * 32 * 2];
    replace(
        d.path(),
        "voice_embedding/es_male.pt",
        &torch_tensor_archive("voice_embed", 4, 32, &data),
    );
    let err = m.voice("es_male").expect_err("must fail");
    assert!(err.to_string().contains("[4, 32]"), "{err}");
}

#[test]
fn unknown_voice_and_empty_text() {
    let m = model();
    let err = m.prompt("klingon_male", "Hello").err().expect("must fail");
    assert!(matches!(err, Error::UnknownVoice { .. }));
    assert!(
        err.to_string().contains("casual_male"),
        "lists the voices: {err}"
    );
    assert!(matches!(
        m.prompt("casual_male", "  \n"),
        Err(Error::EmptyText)
    ));
}

#[test]
fn all_release_voices_load_with_their_languages() {
    let m = model();
    let voices: Vec<_> = m.voices().collect();
    assert_eq!(voices.len(), 20);
    for v in voices {
        let rows = m.voice(&v.name).unwrap();
        assert_eq!(Some(rows.dim(0).unwrap()), v.rows);
    }
    let lang = |n: &str| m.voices().find(|v| v.name == n).unwrap().language.clone();
    assert_eq!(lang("fr_female"), "fr");
    assert_eq!(lang("cheerful_female"), "en");
    assert_eq!(lang("hi_male"), "hi");
}
