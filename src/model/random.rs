//! Random checkpoints in the official layout, so loading, speed and memory can be measured
//! without the real weights. Tensors are generated and written one at a time, so even the
//! full-size preset never needs its 8 GB in memory.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::json;

use super::checkpoint::{
    manifest, padded_rows, Expect, PARAMS_FILE, TOKENIZER_FILE, VOICE_DIR, WEIGHTS_FILE,
};
use super::config::ModelConfig;
use crate::atomic::write_atomic;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// The shapes of the test fixture (dim 64, 2 layers).
    Tiny,
    /// Real widths with 4 backbone layers.
    Bench,
    /// Exactly the shapes of the released model (8 GB).
    Full,
}

/// Preset voices with their `[AUDIO]` row counts in the release.
pub const RELEASE_VOICES: [(&str, usize); 20] = [
    ("casual_female", 214),
    ("casual_male", 147),
    ("cheerful_female", 132),
    ("neutral_female", 218),
    ("neutral_male", 169),
    ("pt_male", 144),
    ("pt_female", 175),
    ("nl_male", 138),
    ("nl_female", 146),
    ("it_male", 168),
    ("it_female", 172),
    ("fr_male", 97),
    ("fr_female", 97),
    ("es_male", 208),
    ("es_female", 138),
    ("de_male", 163),
    ("de_female", 147),
    ("ar_male", 67),
    ("hi_male", 94),
    ("hi_female", 86),
];

/// The tekken split pattern shipped with the release.
pub const TEKKEN_PATTERN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub fn params_json(preset: Preset) -> serde_json::Value {
    let (dim, layers, hd, hidden, heads, kv) = match preset {
        Preset::Tiny => (64, 2, 16, 128, 4, 2),
        Preset::Bench => (3072, 4, 128, 9216, 32, 8),
        Preset::Full => (3072, 26, 128, 9216, 32, 8),
    };
    let (fm_layers, c_dim, c_hidden, c_hd, c_heads, sem_dim) = match preset {
        Preset::Tiny => (3, 64, 128, 8, 8, 16),
        _ => (3, 1024, 4096, 128, 8, 256),
    };
    let voices: serde_json::Map<String, serde_json::Value> = RELEASE_VOICES
        .iter()
        .enumerate()
        .map(|(i, (n, _))| (n.to_string(), json!(i)))
        .collect();
    json!({
        "dim": dim, "n_layers": layers, "head_dim": hd, "hidden_dim": hidden,
        "n_heads": heads, "n_kv_heads": kv, "use_biases": false, "causal": true,
        "rope_theta": 1000000.0, "norm_eps": 1e-05, "vocab_size": 131072,
        "model_parallel": 1, "tied_embeddings": true, "max_seq_len": 65536,
        "model_type": "voxtral_tts", "max_position_embeddings": 128000,
        "multimodal": {
            "bos_token_id": 1,
            "audio_model_args": {
                "semantic_codebook_size": 8192, "acoustic_codebook_size": 21,
                "n_acoustic_codebook": 36,
                "audio_encoding_args": {
                    "codebook_pattern": "parallel",
                    "interleave_audio_tokens_per_segment": 8192,
                    "interleave_text_tokens_per_segment": 8192,
                    "single_trailing_segment": false, "num_codebooks": 37,
                    "sampling_rate": 24000, "frame_rate": 12.5
                },
                "audio_token_id": 24, "begin_audio_token_id": 25,
                "input_embedding_concat_type": "sum",
                "acoustic_transformer_args": {
                    "input_dim": dim, "dim": dim, "n_layers": fm_layers, "head_dim": hd,
                    "hidden_dim": hidden, "n_heads": heads, "n_kv_heads": kv,
                    "use_biases": false, "rope_theta": 10000.0, "sigma": 1e-05, "sigma_max": 1.0
                },
                "p_uncond": 0.0, "text_feature_bugged": false, "condition_dropped_token_id": 42
            },
            "audio_tokenizer_args": {
                "channels": 1, "sampling_rate": 24000, "pretransform_patch_size": 240,
                "patch_proj_kernel_size": 7, "semantic_codebook_size": 8192,
                "semantic_dim": sem_dim, "acoustic_codebook_size": 21, "acoustic_dim": 36,
                "conv_weight_norm": true, "causal": true, "attn_sliding_window_size": 16,
                "half_attn_window_upon_downsampling": true, "dim": c_dim,
                "hidden_dim": c_hidden, "head_dim": c_hd, "n_heads": c_heads,
                "n_kv_heads": c_heads, "qk_norm_eps": 1e-06, "qk_norm": true,
                "use_biases": false, "norm_eps": 0.01, "layer_scale": true,
                "layer_scale_init": 0.01, "decoder_transformer_lengths_str": "2,2,2,2",
                "decoder_convs_kernels_str": "3,4,4,4", "decoder_convs_strides_str": "1,2,2,2",
                "voice": voices
            }
        }
    })
}

/// A byte-level Tekken file: the 256 single bytes, plus the special tokens by their real ids.
pub fn tekken_json(vocab_size: usize, voice_rows: &[(&str, usize)]) -> serde_json::Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let vocab: Vec<_> = (0..=255u8)
        .map(|b| json!({"rank": b, "token_bytes": b64.encode([b]), "token_str": null}))
        .collect();
    let names: [(u32, &str); 8] = [
        (0, "<unk>"),
        (1, "<s>"),
        (2, "</s>"),
        (24, "[AUDIO]"),
        (25, "[BEGIN_AUDIO]"),
        (26, "[OUTPUT_AUDIO]"),
        (35, "[REPEAT_AUDIO_TEXT]"),
        (36, "[NEXT_AUDIO_TEXT]"),
    ];
    let specials: Vec<_> = (0..1000u32)
        .map(|r| {
            let name = names
                .iter()
                .find(|(i, _)| *i == r)
                .map(|(_, n)| n.to_string())
                .unwrap_or_else(|| format!("<SPECIAL_{r}>"));
            json!({"rank": r, "token_str": name, "is_control": true})
        })
        .collect();
    let rows: serde_json::Map<String, serde_json::Value> = voice_rows
        .iter()
        .map(|(n, r)| (n.to_string(), json!(r)))
        .collect();
    json!({
        "config": {
            "pattern": TEKKEN_PATTERN, "num_vocab_tokens": 256,
            "default_vocab_size": vocab_size, "default_num_special_tokens": 1000, "version": "v7"
        },
        "vocab": vocab,
        "special_tokens": specials,
        "audio": {
            "sampling_rate": 24000, "frame_rate": 12.5,
            "audio_encoding_config": {"num_mel_bins": 128, "hop_length": 160, "window_size": 400},
            "voice_num_audio_tokens": rows
        }
    })
}

/// xorshift64*: fast, seedable, good enough for noise weights.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Uniform in [-1, 1).
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        v as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// How a tensor's random values are drawn.
fn init_for(name: &str, shape: &[usize]) -> (f32, f32) {
    // (center, half-width) of a uniform distribution.
    let fan_in = if shape.len() >= 2 {
        shape[1..].iter().product::<usize>()
    } else {
        1
    } as f32;
    if name.ends_with("norm.weight") {
        (1.0, 0.1)
    } else if name.ends_with("_scale") {
        (0.01, 0.005)
    } else if name.ends_with("original0") {
        (1.0, 0.5)
    } else if name.ends_with("cluster_usage") {
        (50.0, 49.0)
    } else if name.contains("embeddings") || name.ends_with("embedding_sum") {
        (0.0, 0.05)
    } else {
        (0.0, (3.0 / fan_in).sqrt())
    }
}

fn write_bf16(
    out: &mut impl Write,
    n: usize,
    rng: &mut Rng,
    (c, w): (f32, f32),
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1 << 20);
    let mut left = n;
    while left > 0 {
        let k = left.min(1 << 19);
        buf.clear();
        for _ in 0..k {
            let v = half::bf16::from_f32(c + w * rng.next());
            buf.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        out.write_all(&buf)?;
        left -= k;
    }
    Ok(())
}

/// A `torch.save` archive holding one bare BF16 tensor `[rows, cols]`, laid out as torch
/// writes it (`<root>/data.pkl`, `<root>/data/0`, ...).
pub fn torch_tensor_archive(root: &str, rows: usize, cols: usize, data_bf16: &[u8]) -> Vec<u8> {
    fn global(p: &mut Vec<u8>, module: &str, name: &str) {
        p.push(b'c');
        p.extend_from_slice(module.as_bytes());
        p.push(b'\n');
        p.extend_from_slice(name.as_bytes());
        p.push(b'\n');
    }
    fn unicode(p: &mut Vec<u8>, s: &str) {
        p.push(b'X');
        p.extend_from_slice(&(s.len() as u32).to_le_bytes());
        p.extend_from_slice(s.as_bytes());
    }
    fn int(p: &mut Vec<u8>, v: usize) {
        p.push(b'J');
        p.extend_from_slice(&(v as i32).to_le_bytes());
    }
    let mut p = vec![0x80, 2];
    global(&mut p, "torch._utils", "_rebuild_tensor_v2");
    p.extend_from_slice(b"((");
    unicode(&mut p, "storage");
    global(&mut p, "torch", "BFloat16Storage");
    unicode(&mut p, "0");
    unicode(&mut p, "cpu");
    int(&mut p, rows * cols);
    p.extend_from_slice(b"tQ");
    int(&mut p, 0);
    int(&mut p, rows);
    int(&mut p, cols);
    p.push(0x86);
    int(&mut p, cols);
    int(&mut p, 1);
    p.push(0x86);
    p.push(0x89);
    global(&mut p, "collections", "OrderedDict");
    p.extend_from_slice(b")RtR.");

    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let files: [(&str, &[u8]); 4] = [
        ("data.pkl", &p),
        ("byteorder", b"little"),
        ("data/0", data_bf16),
        ("version", b"3\n"),
    ];
    for (name, bytes) in files {
        // Writing to memory cannot fail.
        zip.start_file(format!("{root}/{name}"), opts)
            .expect("zip entry");
        zip.write_all(bytes).expect("zip write");
    }
    zip.finish().expect("zip finish").into_inner()
}

/// Writes a complete random checkpoint directory for `preset`.
pub fn write_random_checkpoint(dir: &Path, preset: Preset, seed: u64) -> Result<PathBuf> {
    let voice_rows: Vec<(&str, usize)> = RELEASE_VOICES
        .iter()
        .enumerate()
        .map(|(i, &(n, r))| (n, if preset == Preset::Tiny { 3 + i % 4 } else { r }))
        .collect();
    write_random_checkpoint_with(dir, &params_json(preset), &voice_rows, seed)
}

/// Writes a random checkpoint for any `params.json` and voice table.
pub fn write_random_checkpoint_with(
    dir: &Path,
    params: &serde_json::Value,
    voice_rows: &[(&str, usize)],
    seed: u64,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir.join(VOICE_DIR)).map_err(|e| Error::io(dir, e))?;
    let params_path = dir.join(PARAMS_FILE);
    write_atomic(&params_path, |w| {
        serde_json::to_writer_pretty(&mut *w, params).map_err(std::io::Error::other)
    })?;
    let cfg = ModelConfig::from_file(&params_path)?;
    let tekken = tekken_json(cfg.vocab_size, voice_rows);
    write_atomic(&dir.join(TOKENIZER_FILE), |w| {
        serde_json::to_writer(&mut *w, &tekken).map_err(std::io::Error::other)
    })?;

    // Weights: header first (offsets are known from the shapes), then the data in order.
    let mut tensors: Vec<(String, Vec<usize>)> = manifest(&cfg)?
        .into_iter()
        .map(|(n, e)| {
            let shape = match e {
                Expect::Exact(s) => s,
                Expect::RowsAtLeast { min_rows, cols } => vec![padded_rows(min_rows), cols],
            };
            (n, shape)
        })
        .collect();
    tensors.sort();
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in &tensors {
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name.clone(),
            json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut header = serde_json::to_vec(&header).map_err(|e| Error::InvalidInput(e.to_string()))?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut rng = Rng::new(seed);
    write_atomic(&dir.join(WEIGHTS_FILE), |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        for (name, shape) in &tensors {
            let n = shape.iter().product::<usize>();
            write_bf16(w, n, &mut rng, init_for(name, shape))?;
        }
        Ok(())
    })?;

    for &(name, rows) in voice_rows {
        let mut data = Vec::new();
        write_bf16(&mut data, rows * cfg.dim, &mut rng, (0.0, 0.05))
            .map_err(|e| Error::io(dir, e))?;
        let archive = torch_tensor_archive("voice_embed", rows, cfg.dim, &data);
        write_atomic(&dir.join(VOICE_DIR).join(format!("{name}.pt")), |w| {
            w.write_all(&archive)
        })?;
    }
    Ok(dir.into())
}
