//! Building blocks shared by the three networks: RMSNorm with f32 statistics, the SwiGLU
//! feed-forward, and grouped-query attention.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{linear_no_bias, Linear, VarBuilder};

use super::few_rows;
use super::int4::Q4Weights;
use super::int8::{CpuKernel, Q8Weights, StripKernels};
use super::panels::{self, PanelWeights};

/// Weight storage for the big projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    /// Weights in the compute dtype.
    #[default]
    None,
    /// Int8 weight-only (ggml Q8_0, blocks of 32) with f32 activations: about a quarter of
    /// the f32 memory traffic on CPU.
    Q8,
    /// 4-bit feed-forward: the gate and up projections (`w1`, `w3`, half of all projection
    /// weights) in ggml Q4_1 blocks (32 values with an f16 scale and minimum, 5 bits a
    /// weight, fitted by least squares); attention and the down projection (`w2`), which the
    /// hidden states are most sensitive to, stay Q8_0. About 6.8 bits a weight on average:
    /// less memory than q8, and faster on CPUs bound by their multiply port (see README).
    Q4,
    /// Dense with one kernel for every row count (the codec: chunked decodes stay
    /// bit-identical to full ones).
    #[value(skip)]
    #[serde(skip)]
    Plain,
}

/// Up to this many rows, a dense projection is computed as `(W · xᵀ)ᵀ`: with the checkpoint's
/// `[out, in]` layout that streams the weights about twice as fast on CPU as `x · Wᵀ` does
/// (measured: 6 rows × 8 [9216, 3072] f32 matrices, 85 ms against 164 ms).
const SMALL_BATCH_ROWS: usize = 16;

/// A bias-free projection `x · Wᵀ`, dense or quantized.
#[derive(Debug, Clone)]
pub enum Proj {
    Dense(Linear),
    /// Dense, taking the weight-major path for few rows.
    DenseFewRows(Linear),
    /// Int8 or 4-bit blocks (`--quant q8|q4`), by candle's kernels.
    Quantized(QMatMul),
    /// Int8 blocks by [`int8`](super::int8)'s kernels (`--quant q8` on an x86 CPU with AVX2).
    Int8(std::sync::Arc<Q8Weights>),
    /// 4-bit blocks by [`int4`](super::int4)'s kernels (`--quant q4` on an x86 CPU with AVX2).
    Int4(std::sync::Arc<Q4Weights>),
    /// f32 panels by [`panels`](super::panels)' kernel (`Quant::Plain` on the CPU in f32):
    /// the same result for every row count.
    Panels(std::sync::Arc<PanelWeights>),
}

/// Projections `--quant q4` stores in 4 bits, by the end of their tensor path.
const FOUR_BIT: [&str; 2] = ["feed_forward.w1", "feed_forward.w3"];

/// The block format the projection `name` (its tensor path without `.weight`), with rows
/// `in_dim` long, is stored in under `quant`, if any.
pub fn block_format(quant: Quant, name: &str, in_dim: usize) -> Option<GgmlDType> {
    let format = match quant {
        Quant::Q8 => GgmlDType::Q8_0,
        Quant::Q4 if FOUR_BIT.iter().any(|end| name.ends_with(end)) => GgmlDType::Q4_1,
        Quant::Q4 => GgmlDType::Q8_0,
        Quant::None | Quant::Plain => return None,
    };
    Some(format).filter(|t| in_dim.is_multiple_of(t.block_size()))
}

impl Proj {
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, quant: Quant) -> Result<Self> {
        if let Some(format) = block_format(quant, &vb.prefix(), in_dim) {
            // One tensor at a time in f32, dropped once quantized: the peak stays near the
            // quantized model's size.
            let w = vb.get_with_hints_dtype(
                (out_dim, in_dim),
                "weight",
                Default::default(),
                DType::F32,
            )?;
            let device = w.device().clone();
            // The values on the host, the tensor dropped: the packers read plain slices.
            let host = |w: Tensor| w.flatten_all()?.to_vec1::<f32>();
            let own_kernel = device.is_cpu() && CpuKernel::for_this_cpu() != CpuKernel::Candle;
            if format == GgmlDType::Q8_0 && own_kernel {
                let packed = Q8Weights::quantize(&host(w)?, out_dim, in_dim)?;
                return Ok(Proj::Int8(std::sync::Arc::new(packed)));
            }
            if format == GgmlDType::Q4_1 {
                let packed = Q4Weights::quantize(&host(w)?, out_dim, in_dim)?;
                if own_kernel {
                    return Ok(Proj::Int4(std::sync::Arc::new(packed)));
                }
                // Elsewhere the same blocks through candle's Q4_1 kernel.
                let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    format,
                    packed.to_ggml().bytes(),
                    vec![out_dim, in_dim],
                    &device,
                )?;
                return Ok(Proj::Quantized(QMatMul::from_qtensor(q)?));
            }
            let q = QTensor::quantize(&w, format)?;
            return Ok(Proj::Quantized(QMatMul::from_qtensor(q)?));
        }
        if quant == Quant::Plain && panels::suit(vb.device(), vb.dtype()) {
            let w = vb.get((out_dim, in_dim), "weight")?;
            // Read in place: no second copy of the f32 values.
            let packed = with_host_f32(&w, |w| PanelWeights::pack(w, out_dim, in_dim))?;
            return Ok(Proj::Panels(std::sync::Arc::new(packed)));
        }
        let linear = linear_no_bias(in_dim, out_dim, vb)?;
        Ok(match quant {
            Quant::Plain => Proj::Dense(linear),
            _ => Proj::DenseFewRows(linear),
        })
    }
}

impl Proj {
    /// The dense `[out, in]` weight; `None` for a quantized projection.
    pub fn dense_weight(&self) -> Result<Option<Tensor>> {
        Ok(match self {
            Proj::Dense(l) | Proj::DenseFewRows(l) => Some(l.weight().clone()),
            Proj::Panels(w) => Some(Tensor::from_vec(
                w.unpack(),
                w.dims(),
                &candle_core::Device::Cpu,
            )?),
            Proj::Quantized(_) | Proj::Int8(_) | Proj::Int4(_) => None,
        })
    }
}

impl Proj {
    /// Outputs per row.
    pub fn out_features(&self) -> Result<usize> {
        Ok(match self {
            Proj::Dense(l) | Proj::DenseFewRows(l) => l.weight().dim(0)?,
            Proj::Quantized(QMatMul::QTensor(t)) => t.shape().dims()[0],
            Proj::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.dim(0)?,
            Proj::Int8(w) => w.dims().0,
            Proj::Int4(w) => w.dims().0,
            Proj::Panels(w) => w.dims().0,
        })
    }

    /// `x` `[rows, in]` (f32, on the CPU) into `y` `[rows, out]`, which it overwrites. This
    /// crate's kernels allocate nothing; candle's layers (dense with many rows, or candle's
    /// quantized kernels) go through tensors and are copied.
    pub fn forward_host(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        match self {
            Proj::Int8(w) => w.matmul_into(x, rows, y),
            Proj::Int4(w) => w.matmul_into(x, rows, y),
            Proj::Panels(w) => w.matmul_into(x, rows, w.dims().1, y),
            Proj::DenseFewRows(l)
                if rows <= SMALL_BATCH_ROWS
                    && l.weight().dtype() == DType::F32
                    && l.weight().device().is_cpu()
                    && few_rows::available() =>
            {
                let out = l.weight().dim(0)?;
                with_host_f32(l.weight(), |w| few_rows::matmul_into(w, out, x, rows, y))
            }
            _ => {
                let inp = x.len().checked_div(rows).unwrap_or(0);
                let t = Tensor::from_slice(x, (rows, inp), &candle_core::Device::Cpu)?;
                let out = self.forward(&t)?;
                with_host_f32(&out, |v| {
                    if v.len() != y.len() {
                        candle_core::bail!(
                            "projection: {} values for room of {}",
                            v.len(),
                            y.len()
                        );
                    }
                    y.copy_from_slice(v);
                    Ok(())
                })
            }
        }
    }
}

impl Module for Proj {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => l.forward(x),
            Proj::DenseFewRows(l) => {
                let dims = x.dims();
                let k = dims[dims.len() - 1];
                let rows = x.elem_count() / k.max(1);
                if rows > SMALL_BATCH_ROWS || !x.device().is_cpu() {
                    return l.forward(x);
                }
                let w = l.weight();
                if x.dtype() == DType::F32 && w.dtype() == DType::F32 && few_rows::available() {
                    let out = w.dim(0)?;
                    return with_host_f32(w, |w| {
                        by_rows(x, (out, k), |rows, n| few_rows::matmul(w, out, rows, n))
                    });
                }
                let xt = x.reshape((rows, k))?.t()?.contiguous()?;
                let y = l.weight().matmul(&xt)?.t()?.contiguous()?; // [rows, out]
                let mut shape = dims.to_vec();
                let last = shape.len() - 1;
                shape[last] = y.dim(1)?;
                y.reshape(shape)
            }
            Proj::Quantized(q) => {
                let dtype = x.dtype();
                q.forward(&x.to_dtype(DType::F32)?)?.to_dtype(dtype)
            }
            Proj::Int8(w) => by_rows(x, w.dims(), |rows, n| w.matmul(rows, n)),
            Proj::Int4(w) => by_rows(x, w.dims(), |rows, n| w.matmul(rows, n)),
            Proj::Panels(w) => by_rows(x, w.dims(), |rows, n| w.matmul(rows, n, w.dims().1)),
        }
    }
}

/// `x` `[.., inp]` through a CPU kernel that takes f32 rows: the rows are read in place when
/// `x` is f32 and contiguous (no copy), and the result `[.., out]` gets `x`'s dtype back.
fn by_rows(
    x: &Tensor,
    (out, inp): (usize, usize),
    kernel: impl FnOnce(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<Tensor> {
    let dims = x.dims();
    let rows = x.elem_count() / inp.max(1);
    let mut shape = dims.to_vec();
    if let Some(last) = shape.last_mut() {
        *last = out;
    }
    let y = with_host_f32(&x.to_dtype(DType::F32)?, |x| kernel(x, rows))?;
    Tensor::from_vec(y, shape, x.device())?.to_dtype(x.dtype())
}

/// `f` on `t`'s values as one f32 slice, read in place where `t` is f32 and contiguous on the
/// CPU (copied into a contiguous tensor first otherwise).
pub(super) fn with_host_f32<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<T>) -> Result<T> {
    let t = t.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("a CPU kernel given a tensor on {:?}", t.device());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("a CPU kernel given non-contiguous values");
    };
    f(&cpu.as_slice::<f32>()?[start..end])
}

/// RMSNorm whose reduction always runs in f32, whatever the activation dtype.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints_dtype(dim, "weight", Default::default(), DType::F32)?;
        Ok(Self {
            weight,
            eps: eps as f32,
        })
    }

    /// The scale `[dim]` (f32) and epsilon, for code that re-implements the norm.
    pub fn parts(&self) -> (&Tensor, f64) {
        (&self.weight, self.eps as f64)
    }

    pub fn from_weight(weight: Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: weight.to_dtype(DType::F32)?,
            eps: eps as f32,
        })
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let y = candle_nn::ops::rms_norm(&x, &self.weight, self.eps)?;
        y.to_dtype(dtype)
    }
}

/// `w2(silu(w1 x) * w3 x)`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    pub w1: Proj,
    pub w2: Proj,
    pub w3: Proj,
}

impl FeedForward {
    pub fn load(vb: VarBuilder, dim: usize, hidden: usize, quant: Quant) -> Result<Self> {
        Ok(Self {
            w1: Proj::load(vb.pp("w1"), dim, hidden, quant)?,
            w2: Proj::load(vb.pp("w2"), hidden, dim, quant)?,
            w3: Proj::load(vb.pp("w3"), dim, hidden, quant)?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.w1.forward(x)?)?;
        self.w2.forward(&(gate * self.w3.forward(x)?)?)
    }
}

/// The four projections of a Mistral attention block (`attention.wq/wk/wv/wo`).
#[derive(Debug, Clone)]
pub struct AttentionProj {
    pub wq: Proj,
    pub wk: Proj,
    pub wv: Proj,
    pub wo: Proj,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionProj {
    pub fn load(
        vb: VarBuilder,
        dim: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        quant: Quant,
    ) -> Result<Self> {
        Ok(Self {
            wq: Proj::load(vb.pp("wq"), dim, n_heads * head_dim, quant)?,
            wk: Proj::load(vb.pp("wk"), dim, n_kv_heads * head_dim, quant)?,
            wv: Proj::load(vb.pp("wv"), dim, n_kv_heads * head_dim, quant)?,
            wo: Proj::load(vb.pp("wo"), n_heads * head_dim, dim, quant)?,
            n_heads,
            n_kv_heads,
            head_dim,
        })
    }

    /// `[b, s, heads*hd]` to `[b, heads, s, hd]`, contiguous.
    pub fn split_heads(&self, x: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        x.reshape((b, s, heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()
    }
}

/// A pre-norm Mistral block (`attention_norm`, `attention`, `ffn_norm`, `feed_forward`), shared
/// by the backbone and the flow-matching transformer. How queries meet keys (RoPE, cache,
/// mask) is the caller's, through `attend`.
#[derive(Debug, Clone)]
pub struct TransformerLayer {
    pub(super) attention_norm: RmsNorm,
    pub(super) attention: AttentionProj,
    pub(super) ffn_norm: RmsNorm,
    pub(super) feed_forward: FeedForward,
}

impl TransformerLayer {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        vb: VarBuilder,
        dim: usize,
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        hidden: usize,
        eps: f64,
        quant: Quant,
    ) -> Result<Self> {
        Ok(Self {
            attention_norm: RmsNorm::load(vb.pp("attention_norm"), dim, eps)?,
            attention: AttentionProj::load(
                vb.pp("attention"),
                dim,
                n_heads,
                n_kv_heads,
                head_dim,
                quant,
            )?,
            ffn_norm: RmsNorm::load(vb.pp("ffn_norm"), dim, eps)?,
            feed_forward: FeedForward::load(vb.pp("feed_forward"), dim, hidden, quant)?,
        })
    }

    /// `x` `[b, s, dim]`; `attend` maps q `[b, H, s, d]`, k and v `[b, KV, s, d]` to
    /// `[b, s, H*d]`.
    pub fn forward(
        &self,
        x: &Tensor,
        attend: impl FnOnce(Tensor, Tensor, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.forward_queries(x, None, attend)
    }

    /// [`Self::forward`] for token `token` alone, `[b, 1, dim]`: keys and values still come
    /// from every token, but the query, the output projection and the feed-forward run on that
    /// one row. A last layer whose other rows nobody reads costs a third as much on 3 tokens.
    pub fn forward_token(
        &self,
        x: &Tensor,
        token: usize,
        attend: impl FnOnce(Tensor, Tensor, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.forward_queries(x, Some(token), attend)
    }

    fn forward_queries(
        &self,
        x: &Tensor,
        token: Option<usize>,
        attend: impl FnOnce(Tensor, Tensor, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let a = self.attention_norm.forward(x)?;
        let (x, a_q) = match token {
            Some(t) => (x.narrow(1, t, 1)?, a.narrow(1, t, 1)?.contiguous()?),
            None => (x.clone(), a.clone()),
        };
        let att = &self.attention;
        let q = att.split_heads(&att.wq.forward(&a_q)?, att.n_heads)?;
        let k = att.split_heads(&att.wk.forward(&a)?, att.n_kv_heads)?;
        let v = att.split_heads(&att.wv.forward(&a)?, att.n_kv_heads)?;
        let h = attend(q, k, v)?;
        let x = (x + att.wo.forward(&h)?)?;
        let b = self.ffn_norm.forward(&x)?;
        &x + self.feed_forward.forward(&b)?
    }
}

/// Grouped-query attention. `q` is `[b, H, S, D]`, `k`/`v` are `[b, KV, T, D]` (they may be
/// narrowed views of a larger cache). `bias`, added to the scaled scores, is `[S, T]` (shared by
/// all heads) or `[H, S, T]`. Query heads are grouped per kv head instead of repeating K/V, so
/// the cache is never copied. Scores and softmax run in f32. Returns `[b, S, H*D]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let (_, kv, t, _) = k.dims4()?;
    let rep = h / kv;
    let dtype = q.dtype();
    let scale = 1.0 / (d as f64).sqrt();
    let q = q.reshape((b, kv, rep * s, d))?;
    let scores = (q.matmul(&k.t()?)?.to_dtype(DType::F32)? * scale)?;
    let scores = match bias {
        None => scores,
        Some(bias) => {
            let scores = scores.reshape((b, kv, rep, s, t))?;
            let bias = match bias.rank() {
                2 => bias.reshape((1, 1, 1, s, t))?,
                _ => bias.reshape((1, kv, rep, s, t))?,
            };
            scores.broadcast_add(&bias)?.reshape((b, kv, rep * s, t))?
        }
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    let out = probs.matmul(v)?; // [b, kv, rep*s, d]
    out.reshape((b, h, s, d))?
        .transpose(1, 2)?
        .reshape((b, s, h * d))
}

/// `-inf` where a key is in the future of its query; queries start at `offset`.
pub fn causal_mask(s: usize, offset: usize, device: &candle_core::Device) -> Result<Tensor> {
    let t = offset + s;
    let mask: Vec<f32> = (0..s)
        .flat_map(|i| {
            (0..t).map(move |j| {
                if j > offset + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(mask, (s, t), device)
}

/// Index of the largest value (first on ties) among `allowed`; NaNs never win.
pub fn argmax_in(values: &[f32], allowed: std::ops::Range<usize>) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for i in allowed {
        let v = *values.get(i)?;
        if v.is_nan() {
            continue;
        }
        if best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// q4 puts only the feed-forward's gate and up projections in 4 bits (the rest int8, the
    /// codec never), and a row that blocks do not divide stays dense.
    #[test]
    fn q4_stores_gate_and_up_in_four_bits() {
        let q4 = |name: &str| block_format(Quant::Q4, name, 3072);
        for name in [
            "layers.3.feed_forward.w1",
            "acoustic_transformer.layers.0.feed_forward.w3",
        ] {
            assert_eq!(q4(name), Some(GgmlDType::Q4_1), "{name}");
        }
        for name in [
            "layers.3.feed_forward.w2",
            "layers.3.attention.wq",
            "acoustic_transformer.layers.1.attention.wo",
            "acoustic_transformer.llm_projection",
        ] {
            assert_eq!(q4(name), Some(GgmlDType::Q8_0), "{name}");
        }
        assert_eq!(
            block_format(Quant::Q8, "layers.0.feed_forward.w1", 3072),
            Some(GgmlDType::Q8_0)
        );
        assert_eq!(
            block_format(Quant::Q4, "layers.0.feed_forward.w1", 40),
            None
        );
        assert_eq!(
            block_format(Quant::Plain, "decoder.feed_forward.w1", 3072),
            None
        );
        assert_eq!(
            block_format(Quant::None, "layers.0.feed_forward.w1", 3072),
            None
        );
    }
}
