//! The official checkpoint directory: file names, the tensor manifest implied by `params.json`,
//! and validation of `consolidated.safetensors` against it before anything is computed.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::config::ModelConfig;
use crate::error::{Error, Result};

pub const PARAMS_FILE: &str = "params.json";
pub const WEIGHTS_FILE: &str = "consolidated.safetensors";
pub const TOKENIZER_FILE: &str = "tekken.json";
pub const VOICE_DIR: &str = "voice_embedding";

/// Rows that the checkpoint pads its code tables to.
pub const ROW_PADDING: usize = 128;

pub fn padded_rows(n: usize) -> usize {
    n.div_ceil(ROW_PADDING) * ROW_PADDING
}

/// What a tensor's shape must be.
#[derive(Debug, Clone)]
pub enum Expect {
    Exact(Vec<usize>),
    /// Code tables padded by the exporter: at least `min_rows` rows of width `cols`.
    RowsAtLeast {
        min_rows: usize,
        cols: usize,
    },
}

impl Expect {
    fn matches(&self, shape: &[usize]) -> bool {
        match self {
            Expect::Exact(s) => s.as_slice() == shape,
            Expect::RowsAtLeast { min_rows, cols } => {
                shape.len() == 2 && shape[0] >= *min_rows && shape[1] == *cols
            }
        }
    }
    fn describe(&self) -> String {
        match self {
            Expect::Exact(s) => format!("{s:?}"),
            Expect::RowsAtLeast { min_rows, cols } => format!("[>= {min_rows}, {cols}]"),
        }
    }
}

/// Every tensor the decoder-only release must hold, named exactly as on disk.
pub fn manifest(cfg: &ModelConfig) -> Result<Vec<(String, Expect)>> {
    let mut m: Vec<(String, Expect)> = Vec::new();
    let mut push = |name: String, shape: Vec<usize>| m.push((name, Expect::Exact(shape)));
    let lay = cfg.layout();
    let d = cfg.dim;

    let transformer = |push: &mut dyn FnMut(String, Vec<usize>),
                       prefix: &str,
                       n_layers: usize,
                       dim: usize,
                       heads: usize,
                       kv: usize,
                       hd: usize,
                       hidden: usize| {
        for i in 0..n_layers {
            let p = format!("{prefix}layers.{i}.");
            push(format!("{p}attention_norm.weight"), vec![dim]);
            push(format!("{p}attention.wq.weight"), vec![heads * hd, dim]);
            push(format!("{p}attention.wk.weight"), vec![kv * hd, dim]);
            push(format!("{p}attention.wv.weight"), vec![kv * hd, dim]);
            push(format!("{p}attention.wo.weight"), vec![dim, heads * hd]);
            push(format!("{p}ffn_norm.weight"), vec![dim]);
            push(format!("{p}feed_forward.w1.weight"), vec![hidden, dim]);
            push(format!("{p}feed_forward.w3.weight"), vec![hidden, dim]);
            push(format!("{p}feed_forward.w2.weight"), vec![dim, hidden]);
        }
    };

    // Backbone.
    push(
        "mm_audio_embeddings.tok_embeddings.weight".into(),
        vec![cfg.vocab_size, d],
    );
    transformer(
        &mut push,
        "",
        cfg.n_layers,
        d,
        cfg.n_heads,
        cfg.n_kv_heads,
        cfg.head_dim,
        cfg.hidden_dim,
    );
    push("norm.weight".into(), vec![d]);

    // Flow-matching head.
    let f = cfg.flow();
    let a = cfg.audio();
    push(
        "acoustic_transformer.input_projection.weight".into(),
        vec![f.dim, a.n_acoustic_codebook],
    );
    push(
        "acoustic_transformer.time_projection.weight".into(),
        vec![f.dim, f.dim],
    );
    push(
        "acoustic_transformer.llm_projection.weight".into(),
        vec![f.dim, f.input_dim],
    );
    transformer(
        &mut push,
        "acoustic_transformer.",
        f.n_layers,
        f.dim,
        f.n_heads,
        f.n_kv_heads,
        f.head_dim,
        f.hidden_dim,
    );
    push("acoustic_transformer.norm.weight".into(), vec![f.dim]);
    push(
        "acoustic_transformer.acoustic_codebook_output.weight".into(),
        vec![a.n_acoustic_codebook, f.dim],
    );

    // Codec decoder.
    let c = cfg.codec();
    let stages = cfg.codec_stages(Path::new(PARAMS_FILE))?;
    let latent = c.semantic_dim + c.acoustic_dim;
    let inner = c.n_heads * c.head_dim;
    let inner_kv = c.n_kv_heads * c.head_dim;
    for (i, st) in stages.iter().enumerate() {
        let conv = format!(
            "audio_tokenizer.decoder_blocks.{}.conv.parametrizations.weight.",
            2 * i
        );
        if i == 0 {
            push(format!("{conv}original0"), vec![c.dim, 1, 1]);
            push(format!("{conv}original1"), vec![c.dim, latent, st.kernel]);
        } else {
            push(format!("{conv}original0"), vec![c.dim, 1, 1]);
            push(format!("{conv}original1"), vec![c.dim, c.dim, st.kernel]);
        }
        for l in 0..st.layers {
            let p = format!("audio_tokenizer.decoder_blocks.{}.layers.{l}.", 2 * i + 1);
            push(format!("{p}attention_norm.weight"), vec![c.dim]);
            push(format!("{p}attention.wq.weight"), vec![inner, c.dim]);
            push(format!("{p}attention.wk.weight"), vec![inner_kv, c.dim]);
            push(format!("{p}attention.wv.weight"), vec![inner_kv, c.dim]);
            push(format!("{p}attention.wo.weight"), vec![c.dim, inner]);
            push(format!("{p}attention.q_norm.weight"), vec![inner]);
            push(format!("{p}attention.k_norm.weight"), vec![inner_kv]);
            push(format!("{p}attention_scale"), vec![c.dim]);
            push(format!("{p}ffn_norm.weight"), vec![c.dim]);
            push(
                format!("{p}feed_forward.w1.weight"),
                vec![c.hidden_dim, c.dim],
            );
            push(
                format!("{p}feed_forward.w3.weight"),
                vec![c.hidden_dim, c.dim],
            );
            push(
                format!("{p}feed_forward.w2.weight"),
                vec![c.dim, c.hidden_dim],
            );
            push(format!("{p}ffn_scale"), vec![c.dim]);
        }
    }
    let patch = c.pretransform_patch_size * c.channels;
    push(
        "audio_tokenizer.output_proj.conv.parametrizations.weight.original0".into(),
        vec![patch, 1, 1],
    );
    push(
        "audio_tokenizer.output_proj.conv.parametrizations.weight.original1".into(),
        vec![patch, c.dim, c.patch_proj_kernel_size],
    );
    push(
        "audio_tokenizer.quantizer.semantic_codebook.cluster_usage".into(),
        vec![c.semantic_codebook_size],
    );
    push(
        "audio_tokenizer.quantizer.semantic_codebook.embedding_sum".into(),
        vec![c.semantic_codebook_size, c.semantic_dim],
    );

    // Padded code tables.
    m.push((
        "mm_audio_embeddings.audio_codebook_embeddings.embeddings.weight".into(),
        Expect::RowsAtLeast {
            min_rows: lay.audio_table_rows_used,
            cols: d,
        },
    ));
    m.push((
        "acoustic_transformer.semantic_codebook_output.weight".into(),
        Expect::RowsAtLeast {
            min_rows: lay.semantic_vocab,
            cols: f.dim,
        },
    ));
    Ok(m)
}

/// The memory-mapped weights, validated against the manifest. Each tensor is copied out (to
/// its dtype, its device, maybe quantized) and its pages of the mapping are released at once,
/// so a load never holds the file and the model together: the peak stays near the model's
/// own size plus one tensor.
pub struct Weights {
    pub path: PathBuf,
    map: memmap2::Mmap,
    /// Where tensor data begins: after the 8-byte header length and the header.
    data_start: usize,
    tensors: std::collections::HashMap<String, safetensors::tensor::TensorInfo>,
}

/// Release granularity: 64 KiB covers every page size Linux uses.
const RELEASE_ALIGN: usize = 64 << 10;

impl Weights {
    /// Maps the file and checks every manifest entry's presence, shape and dtype.
    pub fn open(path: &Path, cfg: &ModelConfig) -> Result<Self> {
        let corrupt = |reason: String| Error::CorruptCheckpoint {
            path: path.into(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the file is mapped read-only; the daemon never writes to model files while
        // they are mapped (downloads go to a temporary name and are renamed into place).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let (header, meta) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| corrupt(e.to_string()))?;
        let data_start = 8 + header;
        let tensors: std::collections::HashMap<String, safetensors::tensor::TensorInfo> = meta
            .tensors()
            .into_iter()
            .map(|(n, info)| (n, info.clone()))
            .collect();
        for (name, info) in &tensors {
            let (a, b) = info.data_offsets;
            if a > b || data_start + b > map.len() {
                return Err(corrupt(format!("tensor {name} lies outside the file")));
            }
        }
        for (name, expect) in manifest(cfg)? {
            let Some(info) = tensors.get(&name) else {
                return Err(Error::MissingTensor {
                    path: path.into(),
                    name,
                });
            };
            let (dtype, shape) = (info.dtype, &info.shape);
            if !matches!(
                dtype,
                safetensors::Dtype::BF16 | safetensors::Dtype::F16 | safetensors::Dtype::F32
            ) {
                return Err(Error::TensorDtype {
                    path: path.into(),
                    name,
                    found: format!("{dtype:?}"),
                });
            }
            if !expect.matches(shape) {
                return Err(Error::TensorShape {
                    path: path.into(),
                    name,
                    found: shape.clone(),
                    expected: expect.describe(),
                });
            }
        }
        Ok(Weights {
            path: path.into(),
            map,
            data_start,
            tensors,
        })
    }

    /// The dtype `name` is stored in, if the file has it.
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        match self.tensors.get(name)?.dtype {
            safetensors::Dtype::BF16 => Some(DType::BF16),
            safetensors::Dtype::F16 => Some(DType::F16),
            safetensors::Dtype::F32 => Some(DType::F32),
            _ => None,
        }
    }

    /// A VarBuilder over the mapped file that converts every tensor to `dtype` on `device`.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// One tensor, copied out of the mapping, whose pages are then given back.
    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let info = self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })?;
        let (a, b) = info.data_offsets;
        let (start, end) = (self.data_start + a, self.data_start + b);
        let view = safetensors::tensor::TensorView::new(
            info.dtype,
            info.shape.clone(),
            &self.map[start..end],
        )
        .map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
        let t = candle_core::safetensors::Load::load(&view, dev)?.to_dtype(dtype)?;
        // The tensor owns a copy now: its pages of the file can go. Whole aligned pages only.
        let from = start.next_multiple_of(RELEASE_ALIGN);
        let to = end - end % RELEASE_ALIGN;
        if to > from {
            // SAFETY: a read-only shared mapping of a file: released pages are read from the
            // file again if touched, and no reference into the range outlives this call.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, from, to - from)
            };
        }
        Ok(t)
    }
}

impl candle_nn::var_builder::SimpleBackend for Weights {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
