//! Typed mirror of the checkpoint's own `params.json` (Mistral-native keys).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// Top level: the backbone decoder.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    pub dim: usize,
    pub n_layers: usize,
    pub head_dim: usize,
    pub hidden_dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub rope_theta: f64,
    pub norm_eps: f64,
    pub vocab_size: usize,
    #[serde(default)]
    pub use_biases: bool,
    #[serde(default)]
    pub max_seq_len: Option<usize>,
    pub multimodal: Multimodal,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Multimodal {
    pub bos_token_id: u32,
    pub audio_model_args: AudioModelArgs,
    pub audio_tokenizer_args: CodecArgs,
}

/// Generation side: codebooks, special ids and the flow-matching head.
#[derive(Debug, Clone, Deserialize)]
pub struct AudioModelArgs {
    pub semantic_codebook_size: usize,
    pub acoustic_codebook_size: usize,
    pub n_acoustic_codebook: usize,
    pub audio_encoding_args: AudioEncodingArgs,
    pub audio_token_id: u32,
    pub begin_audio_token_id: u32,
    pub input_embedding_concat_type: String,
    pub acoustic_transformer_args: FlowArgs,
}

#[derive(Debug, Clone, Deserialize)]
pub struct AudioEncodingArgs {
    pub codebook_pattern: String,
    pub num_codebooks: usize,
    pub sampling_rate: u32,
    pub frame_rate: f64,
}

/// The acoustic flow-matching transformer.
#[derive(Debug, Clone, Deserialize)]
pub struct FlowArgs {
    pub input_dim: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub head_dim: usize,
    pub hidden_dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    #[serde(default)]
    pub use_biases: bool,
    /// Absent from the release; the official code defaults to 1e-5.
    #[serde(default = "default_flow_eps")]
    pub norm_eps: f64,
    /// Absent from the release; the official code defaults to 7 Euler steps.
    #[serde(default = "default_decoding_steps")]
    pub n_decoding_steps: usize,
    /// Standard deviation of the start noise.
    #[serde(default = "default_sigma_max")]
    pub sigma_max: f64,
}

fn default_flow_eps() -> f64 {
    1e-5
}
fn default_decoding_steps() -> usize {
    7
}
fn default_sigma_max() -> f64 {
    1.0
}
fn default_encoder_strides() -> String {
    "2,2,2,1".into()
}

/// The Voxtral codec (only its decoder is released).
#[derive(Debug, Clone, Deserialize)]
pub struct CodecArgs {
    pub channels: usize,
    pub sampling_rate: u32,
    pub pretransform_patch_size: usize,
    pub patch_proj_kernel_size: usize,
    pub semantic_codebook_size: usize,
    pub semantic_dim: usize,
    pub acoustic_codebook_size: usize,
    pub acoustic_dim: usize,
    pub conv_weight_norm: bool,
    pub causal: bool,
    pub attn_sliding_window_size: usize,
    pub half_attn_window_upon_downsampling: bool,
    pub dim: usize,
    pub hidden_dim: usize,
    pub head_dim: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub qk_norm_eps: f64,
    pub qk_norm: bool,
    #[serde(default)]
    pub use_biases: bool,
    pub norm_eps: f64,
    pub layer_scale: bool,
    pub decoder_transformer_lengths_str: String,
    pub decoder_convs_kernels_str: String,
    pub decoder_convs_strides_str: String,
    #[serde(default = "default_encoder_strides")]
    pub encoder_convs_strides_str: String,
    #[serde(default)]
    pub voice: BTreeMap<String, u32>,
}

/// Numbers every part of the model derives from the config.
#[derive(Debug, Clone)]
pub struct Layout {
    /// 1 semantic + n acoustic.
    pub codes_per_frame: usize,
    /// Semantic codebook rows including the two specials.
    pub semantic_vocab: usize,
    /// Acoustic levels including the two specials.
    pub acoustic_vocab: usize,
    /// Rows of the audio-code embedding table that are addressed.
    pub audio_table_rows_used: usize,
    pub samples_per_frame: usize,
}

/// Codec decoder stages, derived from the `*_str` keys.
#[derive(Debug, Clone)]
pub struct CodecStage {
    pub kernel: usize,
    pub stride: usize,
    pub layers: usize,
    pub window: usize,
}

pub const SPECIAL_CODES: usize = 2;
pub const EMPTY_AUDIO: u32 = 0;
pub const END_AUDIO: u32 = 1;

fn parse_list(path: &Path, key: &str, s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|p| p.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| Error::Config {
            path: path.into(),
            reason: format!("`{key}` must be a comma-separated list of integers, got {s:?}"),
        })
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: ModelConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.into(),
            reason: e.to_string(),
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn audio(&self) -> &AudioModelArgs {
        &self.multimodal.audio_model_args
    }

    pub fn flow(&self) -> &FlowArgs {
        &self.multimodal.audio_model_args.acoustic_transformer_args
    }

    pub fn codec(&self) -> &CodecArgs {
        &self.multimodal.audio_tokenizer_args
    }

    pub fn layout(&self) -> Layout {
        let a = self.audio();
        let semantic_vocab = a.semantic_codebook_size + SPECIAL_CODES;
        let acoustic_vocab = a.acoustic_codebook_size + SPECIAL_CODES;
        let c = self.codec();
        let upsample: usize = self
            .codec_stages_unchecked()
            .iter()
            .map(|s| s.stride)
            .product();
        Layout {
            codes_per_frame: 1 + a.n_acoustic_codebook,
            semantic_vocab,
            acoustic_vocab,
            audio_table_rows_used: semantic_vocab + a.n_acoustic_codebook * acoustic_vocab,
            samples_per_frame: upsample * c.pretransform_patch_size,
        }
    }

    fn codec_stages_unchecked(&self) -> Vec<CodecStage> {
        let p = Path::new("params.json");
        self.codec_stages(p).unwrap_or_default()
    }

    /// Decoder stages with their attention windows. The upstream constructor threads one window
    /// through the encoder (halved per downsampling stage) and then the decoder (doubled per
    /// upsampling stage), so the decoder's windows are narrowest first.
    pub fn codec_stages(&self, path: &Path) -> Result<Vec<CodecStage>> {
        let c = self.codec();
        let lengths = parse_list(
            path,
            "decoder_transformer_lengths_str",
            &c.decoder_transformer_lengths_str,
        )?;
        let kernels = parse_list(
            path,
            "decoder_convs_kernels_str",
            &c.decoder_convs_kernels_str,
        )?;
        let strides = parse_list(
            path,
            "decoder_convs_strides_str",
            &c.decoder_convs_strides_str,
        )?;
        let enc = parse_list(
            path,
            "encoder_convs_strides_str",
            &c.encoder_convs_strides_str,
        )?;
        if lengths.len() != kernels.len() || kernels.len() != strides.len() || lengths.is_empty() {
            return Err(Error::Config {
                path: path.into(),
                reason: "decoder_transformer_lengths_str, decoder_convs_kernels_str and decoder_convs_strides_str must have the same number of entries".into(),
            });
        }
        let mut window = c.attn_sliding_window_size;
        if c.half_attn_window_upon_downsampling {
            for &s in &enc {
                if s > 1 {
                    window /= 2;
                }
            }
        }
        let mut stages = Vec::new();
        for i in 0..lengths.len() {
            if strides[i] == 0 || kernels[i] < strides[i] {
                return Err(Error::Config {
                    path: path.into(),
                    reason: format!(
                        "decoder stage {i}: kernel {} must be >= stride {} > 0",
                        kernels[i], strides[i]
                    ),
                });
            }
            if c.half_attn_window_upon_downsampling && strides[i] > 1 {
                window *= 2;
            }
            stages.push(CodecStage {
                kernel: kernels[i],
                stride: strides[i],
                layers: lengths[i],
                window,
            });
        }
        Ok(stages)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let unsupported = |reason: String| Error::Unsupported {
            path: path.into(),
            reason,
        };
        let a = self.audio();
        let f = self.flow();
        let c = self.codec();
        if self.use_biases || f.use_biases || c.use_biases {
            return Err(unsupported("linear biases (use_biases = true)".into()));
        }
        if a.input_embedding_concat_type != "sum" {
            return Err(unsupported(format!(
                "input_embedding_concat_type {:?} (only \"sum\")",
                a.input_embedding_concat_type
            )));
        }
        if a.audio_encoding_args.codebook_pattern != "parallel" {
            return Err(unsupported(format!(
                "codebook_pattern {:?} (only \"parallel\")",
                a.audio_encoding_args.codebook_pattern
            )));
        }
        if a.audio_encoding_args.num_codebooks != 1 + a.n_acoustic_codebook {
            return Err(unsupported(
                "num_codebooks must be 1 + n_acoustic_codebook".into(),
            ));
        }
        if 1 + a.n_acoustic_codebook > super::frame::MAX_FRAME_CODES {
            return Err(unsupported(format!(
                "{} acoustic codebooks (at most {} codes a frame)",
                a.n_acoustic_codebook,
                super::frame::MAX_FRAME_CODES
            )));
        }
        if f.input_dim != self.dim || f.dim != self.dim {
            return Err(unsupported(format!(
                "acoustic transformer dim {} / input_dim {} must equal the backbone dim {} (the semantic head reads the backbone state)",
                f.dim, f.input_dim, self.dim
            )));
        }
        if c.acoustic_dim != a.n_acoustic_codebook
            || c.acoustic_codebook_size != a.acoustic_codebook_size
            || c.semantic_codebook_size != a.semantic_codebook_size
        {
            return Err(unsupported(
                "codec and generator disagree on codebook sizes".into(),
            ));
        }
        if !c.causal || !c.conv_weight_norm || !c.qk_norm || !c.layer_scale {
            return Err(unsupported(
                "the codec decoder must be causal with weight norm, qk-norm and layer scale".into(),
            ));
        }
        if c.channels != 1 {
            return Err(unsupported(format!(
                "{} audio channels (only mono)",
                c.channels
            )));
        }
        if a.acoustic_codebook_size < 2 || f.n_decoding_steps == 0 {
            return Err(unsupported(
                "acoustic_codebook_size < 2 or zero decoding steps".into(),
            ));
        }
        for (name, heads, kv, hd) in [
            ("backbone", self.n_heads, self.n_kv_heads, self.head_dim),
            ("acoustic transformer", f.n_heads, f.n_kv_heads, f.head_dim),
            ("codec", c.n_heads, c.n_kv_heads, c.head_dim),
        ] {
            if kv == 0 || !heads.is_multiple_of(kv) || hd == 0 {
                return Err(unsupported(format!(
                    "{name}: n_heads {heads} must be a multiple of n_kv_heads {kv}"
                )));
            }
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(unsupported(
                "odd backbone head_dim (RoPE needs pairs)".into(),
            ));
        }
        if !self.dim.is_multiple_of(2) {
            return Err(unsupported(
                "odd dim (the time embedding needs cos/sin halves)".into(),
            ));
        }
        let stages = self.codec_stages(path)?;
        if stages[0].stride != 1 {
            return Err(unsupported(
                "first codec decoder conv must have stride 1".into(),
            ));
        }
        Ok(())
    }
}
