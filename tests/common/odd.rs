//! A checkpoint of another shape than the fixture's: other head counts, layer counts, widths,
//! codebook sizes, frame length and voice rows, written by the project's own writer.

use std::path::Path;

use voxtrald::model::random::{params_json, write_random_checkpoint_with, Preset};

pub fn odd_params() -> serde_json::Value {
    let mut p = params_json(Preset::Tiny);
    let set = |p: &mut serde_json::Value, path: &[&str], v: serde_json::Value| {
        let mut cur = p;
        for k in &path[..path.len() - 1] {
            cur = cur.get_mut(*k).unwrap();
        }
        cur[path[path.len() - 1]] = v;
    };
    for (k, v) in [
        ("dim", 48),
        ("n_layers", 3),
        ("head_dim", 8),
        ("hidden_dim", 96),
        ("n_heads", 6),
        ("n_kv_heads", 3),
        ("vocab_size", 2048),
    ] {
        set(&mut p, &[k], v.into());
    }
    let a = ["multimodal", "audio_model_args"];
    set(&mut p, &[a[0], a[1], "semantic_codebook_size"], 500.into());
    set(&mut p, &[a[0], a[1], "acoustic_codebook_size"], 11.into());
    set(&mut p, &[a[0], a[1], "n_acoustic_codebook"], 8.into());
    set(
        &mut p,
        &[a[0], a[1], "audio_encoding_args", "num_codebooks"],
        9.into(),
    );
    let f = [a[0], a[1], "acoustic_transformer_args"];
    for (k, v) in [
        ("input_dim", 48),
        ("dim", 48),
        ("n_layers", 2),
        ("head_dim", 16),
        ("hidden_dim", 80),
        ("n_heads", 3),
        ("n_kv_heads", 1),
        ("n_decoding_steps", 3),
    ] {
        set(&mut p, &[f[0], f[1], f[2], k], v.into());
    }
    let c = ["multimodal", "audio_tokenizer_args"];
    for (k, v) in [
        ("semantic_codebook_size", 500),
        ("semantic_dim", 8),
        ("acoustic_codebook_size", 11),
        ("acoustic_dim", 8),
        ("dim", 48),
        ("hidden_dim", 64),
        ("head_dim", 8),
        ("n_heads", 6),
        ("n_kv_heads", 3),
        ("pretransform_patch_size", 60),
    ] {
        set(&mut p, &[c[0], c[1], k], v.into());
    }
    set(
        &mut p,
        &[c[0], c[1], "voice"],
        serde_json::json!({"alpha": 0, "beta": 1}),
    );
    p
}

/// Writes the odd checkpoint (voices `alpha` of 2 rows and `beta` of 9) into `dir`.
pub fn write_odd(dir: &Path) {
    write_random_checkpoint_with(dir, &odd_params(), &[("alpha", 2), ("beta", 9)], 5)
        .expect("the odd checkpoint is written");
}
