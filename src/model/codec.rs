//! The Voxtral codec decoder: codes `[T, 37]` to `T * samples_per_frame` samples at 24 kHz.
//! Every op is causal, so a stream keeps each op's own left context in a [`CodecState`]
//! (conv tails, the attention windows' keys and values) and decodes only new frames; a full
//! decode is one chunk on a fresh state. Attention is computed in query blocks over the
//! sliding window only, so memory grows linearly with the length of the utterance.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::codec_host::{window_attention, HostCarry, HostScratch};
use super::config::{CodecStage, ModelConfig, END_AUDIO, SPECIAL_CODES};
use super::flow::fsq_value;
use super::nn::{with_host_f32, AttentionProj, FeedForward, Quant, RmsNorm};
use super::panels::PanelWeights;

/// Chunks on candle's ops are computed at least this many frames long, padded with repeats of
/// the last frame whose samples are dropped. The ops' matmul kernels for fewer rows round
/// differently, so this keeps a streamed decode bit-identical to a full one; the codec is
/// causal, so the padding cannot change the real frames' samples. The CPU's f32 panels give
/// the same result for every row count and need no padding.
const MIN_DECODE_FRAMES: usize = 8;

/// Queries per attention block; keys span the block plus the window.
const QUERY_BLOCK: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Pad {
    Replicate,
    Reflect,
}

/// Weight-normalized conv: `W = g * v / |v|`, the norm taken per index of dim 0, in f32.
fn fold_weight_norm(vb: &VarBuilder, g_shape: &[usize], v_shape: &[usize]) -> Result<Tensor> {
    let vb = vb.pp("parametrizations").pp("weight");
    let g = vb.get_with_hints_dtype(g_shape, "original0", Default::default(), DType::F32)?;
    let v = vb.get_with_hints_dtype(v_shape, "original1", Default::default(), DType::F32)?;
    let norm = v.sqr()?.sum_keepdim((1, 2))?.sqrt()?;
    let w = v.broadcast_div(&norm)?.broadcast_mul(&g)?;
    w.to_dtype(vb.dtype())
}

/// Whether the codec loaded on `vb`'s device and dtype runs on [`PanelWeights`].
fn on_panels(vb: &VarBuilder) -> bool {
    super::panels::suit(vb.device(), vb.dtype())
}

/// A conv's weight: candle's layout for its conv ops, or, on the CPU in f32, panels of the
/// matrix that maps a window of consecutive input steps (`taps * c_in` values, step-major,
/// as time-first steps lie in memory) to outputs.
enum ConvWeight {
    Ops(Tensor),
    Panels(Arc<PanelWeights>),
}

impl ConvWeight {
    /// The panels, for the decode on host rows.
    fn panels(&self) -> Result<&PanelWeights> {
        match self {
            Self::Panels(p) => Ok(p),
            Self::Ops(_) => candle_core::bail!("a conv on candle's ops given host rows"),
        }
    }

    /// `weight` (candle's layout) as is for the ops, or on panels as the `[out, inp]` matrix
    /// that `window_matrix` makes of it.
    fn new(
        vb: &VarBuilder,
        weight: Tensor,
        (out, inp): (usize, usize),
        window_matrix: impl FnOnce(&Tensor) -> Result<Tensor>,
    ) -> Result<Self> {
        if !on_panels(vb) {
            return Ok(Self::Ops(weight));
        }
        let m = window_matrix(&weight)?;
        let packed = with_host_f32(&m, |w| PanelWeights::pack(w, out, inp))?;
        Ok(Self::Panels(Arc::new(packed)))
    }

    /// The weight in candle's layout: as kept, or `layout` of the panels' `[out, inp]` matrix.
    fn candle_layout(&self, layout: impl FnOnce(Tensor) -> Result<Tensor>) -> Result<Tensor> {
        match self {
            Self::Ops(w) => Ok(w.clone()),
            Self::Panels(p) => layout(Tensor::from_vec(p.unpack(), p.dims(), &Device::Cpu)?),
        }
    }
}

/// The `taps - 1` steps (time-first, dim 1) before a window's last, zeros where a stream has
/// fewer.
fn left_steps(prev: Option<Tensor>, x: &Tensor, taps: usize) -> Result<Tensor> {
    let want = taps - 1;
    let prev = match prev {
        Some(p) if p.dim(1)? >= want => p,
        Some(p) => p.pad_with_zeros(1, want - p.dim(1)?, 0)?,
        None => Tensor::zeros((1, want, x.dim(2)?), x.dtype(), x.device())?,
    };
    Tensor::cat(&[&prev, x], 1)
}

/// `x` `[1, len + taps - 1, c_in]` through panels whose rows are windows of `taps` steps:
/// `[1, len, out]`.
fn windows(w: &PanelWeights, x: &Tensor, taps: usize) -> Result<Tensor> {
    let c_in = x.dim(2)?;
    let len = x.dim(1)? + 1 - taps;
    let y = with_host_f32(x, |x| w.matmul(x, len, c_in))?;
    Tensor::from_vec(y, (1, len, w.dims().0), x.device())
}

/// Stride-1 causal conv with `kernel - 1` steps of left padding.
pub(crate) struct CausalConv {
    weight: ConvWeight,
    pub(crate) taps: usize,
    pub(crate) pad: Pad,
}

impl CausalConv {
    fn load(vb: VarBuilder, c_in: usize, c_out: usize, k: usize, pad: Pad) -> Result<Self> {
        let weight = fold_weight_norm(&vb.pp("conv"), &[c_out, 1, 1], &[c_out, c_in, k])?;
        // [c_out, c_in, k] to [c_out, k * c_in].
        let weight = ConvWeight::new(&vb, weight, (c_out, k * c_in), |w| w.permute((0, 2, 1)))?;
        Ok(Self {
            weight,
            taps: k,
            pad,
        })
    }

    /// Its panels (on the CPU in f32).
    pub(crate) fn panels(&self) -> Result<&PanelWeights> {
        self.weight.panels()
    }

    /// The weight `[c_out, c_in, k]`.
    pub(crate) fn weight(&self) -> Result<Tensor> {
        self.weight.candle_layout(|m| {
            let (c_out, inp) = m.dims2()?;
            m.reshape((c_out, self.taps, inp / self.taps))?
                .permute((0, 2, 1))?
                .contiguous()
        })
    }

    /// `[1, L, C]` to `[1, L, C_out]`. `tail` holds the last `kernel - 1` inputs of the
    /// previous chunk; at the start of a stream the padding mode stands in for it. Only the
    /// first `real` steps of `x` are the stream's; the rest is padding.
    fn forward(&self, x: &Tensor, real: usize, tail: &mut Option<Tensor>) -> Result<Tensor> {
        let p = self.taps - 1;
        let x = match (tail.take(), self.pad) {
            (Some(t), _) => Tensor::cat(&[&t, x], 1)?,
            (None, Pad::Replicate) => x.pad_with_same(1, p, 0)?,
            (None, Pad::Reflect) => reflect_pad_left(x, p, 1)?,
        };
        *tail = Some(steps_before(&x, 1, p + real, p)?);
        match &self.weight {
            ConvWeight::Panels(w) => windows(w, &x, self.taps),
            ConvWeight::Ops(w) => x
                .transpose(1, 2)?
                .contiguous()?
                .conv1d(w, 0, 1, 1, 1)?
                .transpose(1, 2)?
                .contiguous(),
        }
    }
}

/// The `n` steps before step `end` along `dim` (time: 1 in `[1, L, C]`, 2 in
/// `[1, heads, L, d]`), copied so the chunk they came from can be freed.
fn steps_before(x: &Tensor, dim: usize, end: usize, n: usize) -> Result<Tensor> {
    let n = n.min(end);
    x.narrow(dim, end - n, n)?.contiguous()
}

/// Mirror padding on the left of `dim` without repeating the edge (`x_p .. x_1 | x_0 x_1 ..`).
/// Inputs no longer than the pad are zero-extended on the right first, as the reference does.
fn reflect_pad_left(x: &Tensor, p: usize, dim: usize) -> Result<Tensor> {
    if p == 0 {
        return Ok(x.clone());
    }
    let len = x.dim(dim)?;
    let extra = (p + 1).saturating_sub(len);
    let x = if extra > 0 {
        x.pad_with_zeros(dim, 0, extra)?
    } else {
        x.clone()
    };
    let idx: Vec<u32> = (1..=p).rev().map(|i| i as u32).collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    let left = x.index_select(&idx, dim)?;
    let y = Tensor::cat(&[&left, &x], dim)?;
    y.narrow(dim, 0, p + len)
}

/// Causal transposed conv: raw length `(L-1)*s + k`, the last `k - s` samples trimmed.
pub(crate) struct CausalConvTranspose {
    weight: ConvWeight,
    kernel: usize,
    pub(crate) stride: usize,
}

impl CausalConvTranspose {
    fn load(vb: VarBuilder, c: usize, k: usize, stride: usize) -> Result<Self> {
        // ConvTranspose1d stores [in, out, k]; weight norm's dim 0 is the input channel.
        let weight = fold_weight_norm(&vb.pp("conv"), &[c, 1, 1], &[c, c, k])?;
        // Output step `m * s + r` takes tap `r + g * s` of input `m - g`: one matrix
        // `[s * c_out, taps * c_in]` maps the window of inputs `m - taps + 1 ..= m` to the `s`
        // output steps of input `m`, row `r * c_out + o`, column `(taps - 1 - g) * c_in + i`
        // (missing taps past `k` are zero).
        let taps = k.div_ceil(stride);
        let weight = ConvWeight::new(&vb, weight, (stride * c, taps * c), |w| {
            w.pad_with_zeros(2, 0, taps * stride - k)?
                .reshape((c, c, taps, stride))?
                .index_select(&reversed(taps, vb.device())?, 2)?
                .permute((3, 1, 2, 0))
        })?;
        Ok(Self {
            weight,
            kernel: k,
            stride,
        })
    }

    /// The weight `[c_in, c_out, k]`.
    pub(crate) fn weight(&self) -> Result<Tensor> {
        self.weight.candle_layout(|m| {
            let s = self.stride;
            let taps = self.kernel.div_ceil(s);
            let (rows, cols) = m.dims2()?;
            let (c_out, c_in) = (rows / s, cols / taps);
            m.reshape((s, c_out, taps, c_in))?
                .index_select(&reversed(taps, &Device::Cpu)?, 2)?
                .permute((3, 1, 2, 0))?
                .reshape((c_in, c_out, taps * s))?
                .narrow(2, 0, self.kernel)?
                .contiguous()
        })
    }

    /// Its panels (on the CPU in f32).
    pub(crate) fn panels(&self) -> Result<&PanelWeights> {
        self.weight.panels()
    }

    /// Inputs whose overlapping outputs reach into the next input's span.
    pub(crate) fn overlap(&self) -> usize {
        (self.kernel - self.stride).div_ceil(self.stride)
    }

    /// `[1, L, C]` to `[1, L * s, C]`. `prev` holds the last inputs of the previous chunk:
    /// their overlap lands on this chunk's first outputs.
    fn forward(&self, x: &Tensor, real: usize, prev: &mut Option<Tensor>) -> Result<Tensor> {
        let len = x.dim(1)?;
        let (input, skip) = match (prev.take(), &self.weight) {
            (p, ConvWeight::Panels(_)) => (left_steps(p, x, self.overlap() + 1)?, 0),
            (Some(p), ConvWeight::Ops(_)) => {
                let skip = p.dim(1)? * self.stride;
                (Tensor::cat(&[&p, x], 1)?, skip)
            }
            (None, ConvWeight::Ops(_)) => (x.clone(), 0),
        };
        let before = input.dim(1)? - len;
        *prev = Some(steps_before(&input, 1, before + real, self.overlap())?);
        match &self.weight {
            ConvWeight::Panels(w) => {
                let y = windows(w, &input, self.overlap() + 1)?; // [1, len, s * c]
                y.reshape((1, len * self.stride, y.dim(2)? / self.stride))
            }
            ConvWeight::Ops(w) => input
                .transpose(1, 2)?
                .contiguous()?
                .conv_transpose1d(w, 0, 0, self.stride, 1, 1)?
                .narrow(2, skip, len * self.stride)?
                .transpose(1, 2)?
                .contiguous(),
        }
    }
}

/// Indices `n - 1, .., 0`.
fn reversed(n: usize, device: &Device) -> Result<Tensor> {
    let idx: Vec<u32> = (0..n as u32).rev().collect();
    Tensor::new(idx.as_slice(), device)
}

pub(crate) struct CodecLayer {
    pub(crate) attention_norm: RmsNorm,
    pub(crate) attention: AttentionProj,
    pub(crate) q_norm: RmsNorm,
    pub(crate) k_norm: RmsNorm,
    pub(crate) attention_scale: Tensor,
    pub(crate) ffn_norm: RmsNorm,
    pub(crate) feed_forward: FeedForward,
    pub(crate) ffn_scale: Tensor,
}

pub(crate) struct CodecTransformer {
    pub(crate) layers: Vec<CodecLayer>,
    pub(crate) window: usize,
}

/// The decoder's blocks in order (read by the differentiable copy in `clone::decoder`).
pub(crate) enum Block {
    Conv(CausalConv),
    ConvTranspose(CausalConvTranspose),
    Transformer(CodecTransformer),
}

/// One block's left context in a stream.
#[derive(Clone)]
enum BlockState {
    Conv(Option<Tensor>),
    ConvTranspose(Option<Tensor>),
    /// Per layer: keys and values `[1, kv_heads, <= window, head_dim]` of the latest steps.
    Transformer(Vec<Option<(Tensor, Tensor)>>),
}

/// What a streaming decode carries between chunks. Bounded: at most a window of keys and
/// values per layer and a few conv inputs, whatever the utterance's length, so a clone is
/// cheap and one stream can try several continuations.
#[derive(Clone)]
pub struct CodecState(Carry);

#[derive(Clone)]
enum Carry {
    /// On candle's tensors (a clone shares them).
    Tensors {
        blocks: Vec<BlockState>,
        output: Option<Tensor>,
    },
    /// On host rows ([`super::codec_host`]).
    Host(HostCarry),
}

pub struct CodecDecoder {
    /// `embedding_sum / max(cluster_usage, 1e-5)`, f32 `[codebook, semantic_dim]`.
    pub(crate) semantic_codebook: Tensor,
    pub(crate) blocks: Vec<Block>,
    pub(crate) output_proj: CausalConv,
    pub(crate) slopes: Vec<f32>,
    pub(crate) semantic_size: usize,
    pub(crate) levels: usize,
    pub(crate) n_acoustic: usize,
    pub(crate) patch: usize,
    /// On panels: the buffers of the decode on host rows.
    pub(crate) host: Option<Mutex<HostScratch>>,
    dtype: DType,
    device: Device,
}

/// ALiBi slopes as in Mistral's codec: `2^(-8h/n)` for h = 0..n (starting at 1.0); for a
/// head count that is not a power of two, the closest power's series followed by every other
/// slope of the series for twice that many heads.
pub fn alibi_slopes(n: usize) -> Vec<f32> {
    fn pow2(n: usize) -> Vec<f64> {
        let r = 2f64.powf(-8.0 / n as f64);
        (0..n).map(|h| r.powi(h as i32)).collect()
    }
    let out = if n.is_power_of_two() {
        pow2(n)
    } else {
        let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
        let mut s = pow2(p);
        s.extend(pow2(2 * p).into_iter().step_by(2).take(n - p));
        s
    };
    out.into_iter().map(|v| v as f32).collect()
}

impl CodecDecoder {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig, stages: &[CodecStage]) -> Result<Self> {
        let c = cfg.codec();
        let q = vb.pp("quantizer").pp("semantic_codebook");
        let usage = q.get_with_hints_dtype(
            c.semantic_codebook_size,
            "cluster_usage",
            Default::default(),
            DType::F32,
        )?;
        let sum = q.get_with_hints_dtype(
            (c.semantic_codebook_size, c.semantic_dim),
            "embedding_sum",
            Default::default(),
            DType::F32,
        )?;
        let semantic_codebook = sum.broadcast_div(&usage.clamp(1e-5, f32::MAX)?.unsqueeze(1)?)?;
        let latent = c.semantic_dim + c.acoustic_dim;
        let mut blocks = Vec::new();
        for (i, st) in stages.iter().enumerate() {
            let vb = vb.pp("decoder_blocks");
            blocks.push(if i == 0 {
                Block::Conv(CausalConv::load(
                    vb.pp(0),
                    latent,
                    c.dim,
                    st.kernel,
                    Pad::Replicate,
                )?)
            } else {
                Block::ConvTranspose(CausalConvTranspose::load(
                    vb.pp(2 * i),
                    c.dim,
                    st.kernel,
                    st.stride,
                )?)
            });
            let mut layers = Vec::new();
            for l in 0..st.layers {
                let vb = vb.pp(2 * i + 1).pp("layers").pp(l);
                let inner = c.n_heads * c.head_dim;
                let inner_kv = c.n_kv_heads * c.head_dim;
                let va = vb.pp("attention");
                layers.push(CodecLayer {
                    attention_norm: RmsNorm::load(vb.pp("attention_norm"), c.dim, c.norm_eps)?,
                    attention: AttentionProj::load(
                        va.clone(),
                        c.dim,
                        c.n_heads,
                        c.n_kv_heads,
                        c.head_dim,
                        Quant::Plain,
                    )?,
                    q_norm: RmsNorm::load(va.pp("q_norm"), inner, c.qk_norm_eps)?,
                    k_norm: RmsNorm::load(va.pp("k_norm"), inner_kv, c.qk_norm_eps)?,
                    attention_scale: vb.get(c.dim, "attention_scale")?,
                    ffn_norm: RmsNorm::load(vb.pp("ffn_norm"), c.dim, c.norm_eps)?,
                    feed_forward: FeedForward::load(
                        vb.pp("feed_forward"),
                        c.dim,
                        c.hidden_dim,
                        Quant::Plain,
                    )?,
                    ffn_scale: vb.get(c.dim, "ffn_scale")?,
                });
            }
            blocks.push(Block::Transformer(CodecTransformer {
                layers,
                window: st.window,
            }));
        }
        let patch = c.pretransform_patch_size * c.channels;
        let output_proj = CausalConv::load(
            vb.pp("output_proj"),
            c.dim,
            patch,
            c.patch_proj_kernel_size,
            Pad::Reflect,
        )?;
        Ok(Self {
            semantic_codebook,
            blocks,
            output_proj,
            slopes: alibi_slopes(c.n_heads),
            semantic_size: c.semantic_codebook_size,
            levels: c.acoustic_codebook_size,
            n_acoustic: c.acoustic_dim,
            patch,
            host: on_panels(&vb).then(Default::default),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn codes_per_frame(&self) -> usize {
        1 + self.n_acoustic
    }

    /// Checks model-side codes (with the +2 offset) and returns how many frames precede the
    /// first `[END_AUDIO]` frame.
    pub fn valid_frames<F: AsRef<[u32]>>(&self, frames: &[F]) -> crate::Result<usize> {
        let bad = |m: String| crate::Error::InvalidCodes(m);
        for (t, f) in frames.iter().enumerate() {
            let f = f.as_ref();
            if f.len() != self.codes_per_frame() {
                return Err(bad(format!(
                    "frame {t} has {} codes, expected {}",
                    f.len(),
                    self.codes_per_frame()
                )));
            }
            if f[0] == END_AUDIO {
                return Ok(t);
            }
            let off = SPECIAL_CODES as u32;
            if f[0] < off || f[0] >= off + self.semantic_size as u32 {
                return Err(bad(format!(
                    "frame {t}: semantic code {} out of range",
                    f[0]
                )));
            }
            if let Some((j, c)) = f[1..]
                .iter()
                .enumerate()
                .find(|(_, &c)| c < off || c >= off + self.levels as u32)
            {
                return Err(bad(format!(
                    "frame {t}: acoustic code {} = {c} out of range",
                    j + 1
                )));
            }
        }
        Ok(frames.len())
    }

    /// Dequantized latent `[1, T, semantic_dim + acoustic_dim]` of validated frames.
    pub fn latent<F: AsRef<[u32]>>(&self, frames: &[F]) -> Result<Tensor> {
        let off = SPECIAL_CODES as u32;
        let sem: Vec<u32> = frames.iter().map(|f| f.as_ref()[0] - off).collect();
        let sem = Tensor::new(sem.as_slice(), &self.device)?;
        let sem = self.semantic_codebook.index_select(&sem, 0)?; // [T, sd]
        let ac: Vec<f32> = frames
            .iter()
            .flat_map(|f| {
                f.as_ref()[1..]
                    .iter()
                    .map(|&c| fsq_value(c - off, self.levels))
            })
            .collect();
        let ac = Tensor::from_vec(ac, (frames.len(), self.n_acoustic), &self.device)?;
        Tensor::cat(&[&sem, &ac], 1)?
            .unsqueeze(0)?
            .to_dtype(self.dtype)
    }

    /// Frames a chunk on tensors is padded to: [`MIN_DECODE_FRAMES`] on candle's ops, 1 on
    /// panels (which give the same result for every row count).
    fn min_frames(&self) -> usize {
        if self.decodes_on_host() {
            1
        } else {
            MIN_DECODE_FRAMES
        }
    }

    /// Whether a new stream decodes on host rows (the CPU in f32 with the panels), where a
    /// chunk allocates nothing once the buffers have grown.
    pub fn decodes_on_host(&self) -> bool {
        self.host.is_some()
    }

    /// A state for a new stream: on host rows where the weights are on panels.
    pub fn start(&self) -> CodecState {
        match self.host {
            Some(_) => CodecState(Carry::Host(self.start_host())),
            None => self.start_tensors(),
        }
    }

    /// A state for a new stream on candle's tensors, whatever the weights: on the CPU in f32,
    /// the reference the decode on host rows is tested against.
    #[doc(hidden)]
    pub fn start_tensors(&self) -> CodecState {
        CodecState(Carry::Tensors {
            blocks: self
                .blocks
                .iter()
                .map(|b| match b {
                    Block::Conv(_) => BlockState::Conv(None),
                    Block::ConvTranspose(_) => BlockState::ConvTranspose(None),
                    Block::Transformer(t) => BlockState::Transformer(vec![None; t.layers.len()]),
                })
                .collect(),
            output: None,
        })
    }

    /// Decodes frames to samples in one go. `stages`, when given, receives each block's
    /// output (channels last) for debugging.
    pub fn decode_frames<F: AsRef<[u32]> + Sync>(
        &self,
        frames: &[F],
        stages: Option<&mut Vec<Tensor>>,
    ) -> crate::Result<Vec<f32>> {
        self.decode_chunk(&mut self.start(), frames, stages)
    }

    /// Decodes the next frames of a stream: the samples equal the matching part of a full
    /// decode (to float rounding), however the frames are split into chunks. Frames from an
    /// `[END_AUDIO]` frame on are ignored.
    pub fn decode_chunk<F: AsRef<[u32]> + Sync>(
        &self,
        state: &mut CodecState,
        frames: &[F],
        stages: Option<&mut Vec<Tensor>>,
    ) -> crate::Result<Vec<f32>> {
        let mut out = Vec::new();
        self.decode_chunk_into(state, frames, stages, &mut out)?;
        Ok(out)
    }

    /// [`Self::decode_chunk`], the samples appended to `out`. On host rows it allocates
    /// nothing once its buffers and `out` have grown; it runs on rayon's pool (see
    /// [`super::host::on_pool`]).
    pub fn decode_chunk_into<F: AsRef<[u32]> + Sync>(
        &self,
        state: &mut CodecState,
        frames: &[F],
        stages: Option<&mut Vec<Tensor>>,
        out: &mut Vec<f32>,
    ) -> crate::Result<()> {
        super::host::on_pool(|| self.decode_chunk_with(state, frames, stages, out))
    }

    fn decode_chunk_with<F: AsRef<[u32]>>(
        &self,
        state: &mut CodecState,
        frames: &[F],
        mut stages: Option<&mut Vec<Tensor>>,
        out: &mut Vec<f32>,
    ) -> crate::Result<()> {
        let n = self.valid_frames(frames)?;
        if n == 0 {
            return Ok(());
        }
        let (blocks, output) = match (&mut state.0, &self.host) {
            (Carry::Host(carry), Some(scratch)) => {
                return Ok(self.decode_host(scratch, carry, &frames[..n], stages, out)?)
            }
            (Carry::Host(_), None) => {
                return Err(candle_core::Error::Msg(
                    "a codec state on host rows given to a decoder on candle's ops".into(),
                )
                .into())
            }
            (Carry::Tensors { blocks, output }, _) => (blocks, output),
        };
        let mut padded: Vec<&[u32]> = frames[..n].iter().map(AsRef::as_ref).collect();
        if n < self.min_frames() && stages.is_none() {
            padded.resize(self.min_frames(), frames[n - 1].as_ref());
        }
        let mut x = self.latent(&padded)?; // [1, L, C]
        let mut real = n; // steps of x that belong to the stream
        for (block, st) in self.blocks.iter().zip(blocks) {
            x = match (block, st) {
                (Block::Conv(c), BlockState::Conv(tail)) => c.forward(&x, real, tail)?,
                (Block::ConvTranspose(c), BlockState::ConvTranspose(prev)) => {
                    let y = c.forward(&x, real, prev)?;
                    real *= c.stride;
                    y
                }
                (Block::Transformer(t), BlockState::Transformer(caches)) => {
                    self.transformer(t, &x, real, caches)?
                }
                _ => unreachable!("a state is made by start() for these blocks"),
            };
            if let Some(s) = stages.as_deref_mut() {
                s.push(x.squeeze(0)?.to_dtype(DType::F32)?);
            }
        }
        let y = self.output_proj.forward(&x, real, output)?; // [1, L, patch]
        let y = y.squeeze(0)?.narrow(0, 0, real)?.to_dtype(DType::F32)?; // [L, patch]
        if let Some(s) = stages {
            s.push(y.clone());
        }
        out.extend(y.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    /// `x` `[1, L, dim]` through one stage's layers; `caches` holds each layer's keys and
    /// values of the steps before `x` (at most a window of them) and moves on to the first
    /// `real` steps of `x`.
    fn transformer(
        &self,
        t: &CodecTransformer,
        x: &Tensor,
        real: usize,
        caches: &mut [Option<(Tensor, Tensor)>],
    ) -> Result<Tensor> {
        let mut x = x.clone();
        for (layer, cache) in t.layers.iter().zip(caches) {
            let a = layer.attention_norm.forward(&x)?;
            let att = &layer.attention;
            let q = layer.q_norm.forward(&att.wq.forward(&a)?)?;
            let k = layer.k_norm.forward(&att.wk.forward(&a)?)?;
            let v = att.wv.forward(&a)?;
            let q = att.split_heads(&q, att.n_heads)?;
            let k = att.split_heads(&k, att.n_kv_heads)?;
            let v = att.split_heads(&v, att.n_kv_heads)?;
            let (k, v, ctx) = match cache.take() {
                Some((ck, cv)) => {
                    let ctx = ck.dim(2)?;
                    (
                        Tensor::cat(&[&ck, &k], 2)?,
                        Tensor::cat(&[&cv, &v], 2)?,
                        ctx,
                    )
                }
                None => (k, v, 0),
            };
            *cache = Some((
                steps_before(&k, 2, ctx + real, t.window)?,
                steps_before(&v, 2, ctx + real, t.window)?,
            ));
            let h = self.windowed_attention(&q, &k, &v, t.window, ctx)?;
            let h = att.wo.forward(&h)?.broadcast_mul(&layer.attention_scale)?;
            x = (x + h)?;
            let b = layer.ffn_norm.forward(&x)?;
            let f = layer
                .feed_forward
                .forward(&b)?
                .broadcast_mul(&layer.ffn_scale)?;
            x = (x + f)?;
        }
        Ok(x)
    }

    /// Causal sliding-window attention with ALiBi: query `i` sees keys `i - window ..= i`, with
    /// bias `slope_h * (j - i)`. `k` and `v` hold `ctx <= window` earlier steps before the
    /// queries' own. Each query gathers exactly its own `window + 1` keys, so its result does
    /// not depend on where a chunk starts, and memory stays linear in the length.
    fn windowed_attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: usize,
        ctx: usize,
    ) -> Result<Tensor> {
        if q.device().is_cpu() && q.dtype() == DType::F32 {
            return self.windowed_attention_cpu(q, k, v, window, ctx);
        }
        self.windowed_attention_ops(q, k, v, window, ctx)
    }

    /// [`Self::windowed_attention`] in tensor ops, for any device and dtype.
    fn windowed_attention_ops(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: usize,
        ctx: usize,
    ) -> Result<Tensor> {
        let (b, h, len, d) = q.dims4()?;
        let (kv, klen) = (k.dim(1)?, k.dim(2)?);
        let expand = |t: &Tensor| -> Result<Tensor> {
            let t = if kv == h {
                t.clone()
            } else {
                t.unsqueeze(2)?
                    .broadcast_as((b, kv, h / kv, klen, d))?
                    .reshape((b, h, klen, d))?
            };
            // Zero keys in front so every query has W + 1 slots.
            t.pad_with_zeros(2, window - ctx, 0)
        };
        let (kp, vp) = (expand(k)?, expand(v)?);
        let dtype = q.dtype();
        let scale = 1.0 / (d as f64).sqrt();
        let mut outs = Vec::with_capacity(len.div_ceil(QUERY_BLOCK));
        let mut s0 = 0;
        while s0 < len {
            let nq = (s0 + QUERY_BLOCK).min(len) - s0;
            // Slot o of query i holds key i - window + o.
            let band = |t: &Tensor| -> Result<Tensor> {
                let slots = (0..=window)
                    .map(|o| t.narrow(2, s0 + o, nq))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&slots, 3) // [b, h, nq, W+1, d]
            };
            let qb = q.narrow(2, s0, nq)?.unsqueeze(3)?;
            let scores = qb
                .broadcast_mul(&band(&kp)?)?
                .to_dtype(DType::F32)?
                .sum(4)?; // [b, h, nq, W+1]
            let scores =
                (scores * scale)?.broadcast_add(&self.alibi_band(ctx + s0, nq, window)?)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
            let out = probs.unsqueeze(4)?.broadcast_mul(&band(&vp)?)?.sum(3)?; // [b, h, nq, d]
            outs.push(out);
            s0 += nq;
        }
        let out = Tensor::cat(&outs, 2)?; // [b, h, len, d]
        out.transpose(1, 2)?.reshape((b, len, h * d))
    }

    /// [`Self::windowed_attention`] on f32 CPU tensors by the host rows' loops
    /// ([`window_attention`]): each query reads its own `window + 1` keys where they are,
    /// instead of the ops' stacked copies of the window, in one fixed order, so a chunk's
    /// result does not depend on where it starts.
    fn windowed_attention_cpu(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: usize,
        ctx: usize,
    ) -> Result<Tensor> {
        let (b, h, len, d) = q.dims4()?;
        let (kv, klen) = (k.dim(1)?, k.dim(2)?);
        // Time-first rows `[b, steps, heads · d]`, as the decode on host rows keeps them.
        let rows = |t: &Tensor| t.transpose(1, 2)?.flatten_all()?.to_vec1::<f32>();
        let (q, k, v) = (rows(q)?, rows(k)?, rows(v)?);
        let (qn, kn) = (len * h * d, klen * kv * d);
        let mut out = vec![0f32; b * qn];
        let mut scores = vec![0f32; len * (window + 1)];
        for (bi, out) in out.chunks_exact_mut(qn).enumerate() {
            let (k, v) = (&k[bi * kn..][..kn], &v[bi * kn..][..kn]);
            window_attention(
                (&q[bi * qn..][..qn], k, v),
                (h, kv, d),
                (window, ctx),
                &self.slopes,
                &mut scores,
                out,
            );
        }
        Tensor::from_vec(out, (b, len, h * d), &Device::Cpu)
    }

    /// Bias `[H, nq, W+1]` for the queries at steps `s0..s0+nq` of the keys: ALiBi by
    /// distance, `-inf` for the slots before the first key.
    fn alibi_band(&self, s0: usize, nq: usize, window: usize) -> Result<Tensor> {
        let mut bias = Vec::with_capacity(self.slopes.len() * nq * (window + 1));
        for &m in &self.slopes {
            for i in s0..s0 + nq {
                for o in 0..=window {
                    let dist = window - o;
                    bias.push(if dist > i {
                        f32::NEG_INFINITY
                    } else {
                        -m * dist as f32
                    });
                }
            }
        }
        Tensor::from_vec(bias, (self.slopes.len(), nq, window + 1), &self.device)
    }

    pub fn samples_per_frame(&self) -> usize {
        let up: usize = self
            .blocks
            .iter()
            .map(|b| match b {
                Block::ConvTranspose(c) => c.stride,
                _ => 1,
            })
            .product();
        up * self.patch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_alibi_slopes_start_at_one() {
        let s = alibi_slopes(8);
        assert_eq!(
            s,
            vec![1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125]
        );
        assert_eq!(alibi_slopes(4), vec![1.0, 0.25, 0.0625, 0.015625]);
        // 6 heads: the 4-head series, then slopes 0 and 2 of the 8-head series.
        assert_eq!(
            alibi_slopes(6),
            vec![1.0, 0.25, 0.0625, 0.015625, 1.0, 0.25]
        );
    }

    /// The CPU loops and the tensor ops give the same attention: every window against the
    /// cache lengths a stream meets (none, partial, full) and grouped heads.
    #[test]
    fn cpu_window_attention_equals_the_ops() -> Result<()> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/voxtral-tiny");
        let (codec, _) = crate::model::Voxtral::load_codec(&dir, &Device::Cpu).expect("fixture");
        let h = codec.slopes.len();
        for (window, ctx, len, kv) in [
            (2, 0, 5, h),
            (4, 3, 7, h),
            (16, 16, 40, h),
            (8, 0, 300, h / 2),
        ] {
            let d = 8;
            let q = Tensor::randn(0f32, 1.0, (1, h, len, d), &Device::Cpu)?;
            let k = Tensor::randn(0f32, 1.0, (1, kv, ctx + len, d), &Device::Cpu)?;
            let v = Tensor::randn(0f32, 1.0, (1, kv, ctx + len, d), &Device::Cpu)?;
            let ops = codec.windowed_attention_ops(&q, &k, &v, window, ctx)?;
            let cpu = codec.windowed_attention_cpu(&q, &k, &v, window, ctx)?;
            assert_eq!(ops.dims(), cpu.dims());
            let diff = (ops - cpu)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 1e-5, "window {window}, ctx {ctx}, len {len}: {diff}");
        }
        Ok(())
    }

    /// candle's ops (the GPU's path; here in bf16 on the CPU) and the CPU's f32 panels decode
    /// the same audio, in one go and streamed in uneven chunks (the ops padding short ones).
    #[test]
    fn ops_path_agrees_with_panels() -> Result<()> {
        use crate::model::checkpoint::{Weights, PARAMS_FILE, WEIGHTS_FILE};
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/voxtral-tiny");
        let load = |dtype| -> Result<CodecDecoder> {
            let params = dir.join(PARAMS_FILE);
            let cfg = ModelConfig::from_file(&params).expect("fixture config");
            let stages = cfg.codec_stages(&params).expect("fixture stages");
            let weights = Weights::open(&dir.join(WEIGHTS_FILE), &cfg).expect("fixture weights");
            let vb = weights.into_var_builder(dtype, &Device::Cpu);
            CodecDecoder::load(vb.pp("audio_tokenizer"), &cfg, &stages)
        };
        let (panels, ops) = (load(DType::F32)?, load(DType::BF16)?);
        let on_panels = crate::model::panels::suit(&Device::Cpu, DType::F32);
        assert_eq!(panels.min_frames() == 1, on_panels);
        assert_eq!(ops.min_frames(), MIN_DECODE_FRAMES);
        let frames = crate::clone::search::random_codes(&panels, 21, 5);
        let want = panels.decode_frames(&frames, None).expect("panels");
        let full = ops.decode_frames(&frames, None).expect("ops");
        let mut streamed = Vec::new();
        let mut state = ops.start();
        for chunk in [&frames[..2], &frames[2..11], &frames[11..]] {
            streamed.extend(ops.decode_chunk(&mut state, chunk, None).expect("chunk"));
        }
        let peak = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (name, got) in [("full", &full), ("streamed", &streamed)] {
            assert_eq!(got.len(), want.len(), "{name}");
            let dot: f32 = got.iter().zip(&want).map(|(a, b)| a * b).sum();
            let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
            let cos = dot / (norm(got) * norm(&want));
            assert!(cos > 0.99, "{name}: cosine {cos} against the panels");
        }
        let diff = full
            .iter()
            .zip(&streamed)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff <= 0.02 * peak,
            "ops streamed vs full: {diff} (peak {peak})"
        );
        Ok(())
    }

    #[test]
    fn reflect_pad_mirrors_without_edge() -> Result<()> {
        let x = Tensor::new(&[[[0f32, 1., 2., 3., 4., 5., 6., 7.]]], &Device::Cpu)?;
        let y = reflect_pad_left(&x, 3, 2)?;
        assert_eq!(
            y.flatten_all()?.to_vec1::<f32>()?,
            vec![3., 2., 1., 0., 1., 2., 3., 4., 5., 6., 7.]
        );
        // Shorter than the pad: zero-extend on the right, reflect, drop the extension.
        let x = Tensor::new(&[[[1f32, 2.]]], &Device::Cpu)?;
        let y = reflect_pad_left(&x, 3, 2)?;
        assert_eq!(y.flatten_all()?.to_vec1::<f32>()?, vec![0., 0., 2., 1., 2.]);
        Ok(())
    }
}
