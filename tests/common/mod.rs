//! Shared test helpers: the tiny fixture, its golden arrays, and checkpoint surgery.
#![allow(dead_code)]

pub mod bus;
pub mod http;
pub mod odd;
pub mod pulse;
pub mod python;
pub mod served;
pub mod speechd;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use candle_core::{DType, Tensor};
use voxtrald::{LoadOptions, Voxtral};

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/voxtral-tiny")
}

pub fn golden_dir() -> PathBuf {
    fixture_dir().join("golden")
}

/// The tiny model, loaded once per test binary (f32, CPU).
pub fn model() -> &'static Voxtral {
    static M: OnceLock<Voxtral> = OnceLock::new();
    M.get_or_init(|| Voxtral::load(&fixture_dir(), &LoadOptions::default()).expect("fixture loads"))
}

pub fn oracle() -> &'static HashMap<String, Tensor> {
    static O: OnceLock<HashMap<String, Tensor>> = OnceLock::new();
    O.get_or_init(|| {
        Tensor::read_npz(golden_dir().join("oracle.npz"))
            .expect("oracle.npz")
            .into_iter()
            .collect()
    })
}

pub fn golden(key: &str) -> Tensor {
    oracle()
        .get(key)
        .unwrap_or_else(|| panic!("oracle has no {key}"))
        .clone()
}

pub fn golden_f32(key: &str) -> Vec<f32> {
    golden(key)
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

pub fn golden_i64(key: &str) -> Vec<i64> {
    golden(key)
        .to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

pub fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Asserts `|a - b| <= abs + rel * |b|` elementwise, reporting the worst element.
#[track_caller]
pub fn assert_close(name: &str, a: &[f32], b: &[f32], abs: f32, rel: f32) {
    assert_eq!(
        a.len(),
        b.len(),
        "{name}: length {} vs {}",
        a.len(),
        b.len()
    );
    let mut worst = (0usize, 0f32);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let excess = (x - y).abs() - (abs + rel * y.abs());
        assert!(!x.is_nan(), "{name}[{i}] is NaN");
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    assert!(
        worst.1 <= 0.0,
        "{name}: element {} is {} vs reference {} (tolerance {abs} + {rel} rel)",
        worst.0,
        a[worst.0],
        b[worst.0]
    );
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Golden codes as frames (`[n, 37]` rows).
pub fn frames_from(key: &str, rows_are_frames: bool) -> Vec<Vec<u32>> {
    let t = golden(key).to_dtype(DType::I64).unwrap();
    let t = if rows_are_frames { t } else { t.t().unwrap() };
    t.to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|c| c as u32).collect())
        .collect()
}

/// Deterministic pseudo-random valid frames (semantic 2..8193, acoustic 2..22).
pub fn random_frames(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move |m: u32| {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 33) % m as u64) as u32
    };
    (0..n)
        .map(|_| {
            let mut f = vec![2 + next(8192)];
            f.extend((0..36).map(|_| 2 + next(21)));
            f
        })
        .collect()
}

/// A scratch copy of the fixture: every file symlinked, so a test can replace one.
pub fn scratch_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture_dir();
    for name in ["params.json", "consolidated.safetensors", "tekken.json"] {
        std::os::unix::fs::symlink(src.join(name), dir.path().join(name)).unwrap();
    }
    std::fs::create_dir(dir.path().join("voice_embedding")).unwrap();
    for e in std::fs::read_dir(src.join("voice_embedding")).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(
            e.path(),
            dir.path().join("voice_embedding").join(e.file_name()),
        )
        .unwrap();
    }
    dir
}

/// Rewrites `dir/consolidated.safetensors` from the fixture's tensors after `edit` changes
/// the (name -> (dtype, shape, bytes)) map.
pub fn rewrite_weights(
    dir: &Path,
    edit: impl FnOnce(&mut HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let bytes = std::fs::read(fixture_dir().join("consolidated.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut map: HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect();
    edit(&mut map);
    let views: Vec<(String, safetensors::tensor::TensorView)> = map
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    let path = dir.join("consolidated.safetensors");
    let _ = std::fs::remove_file(&path);
    safetensors::serialize_to_file(views, None, &path).unwrap();
}
