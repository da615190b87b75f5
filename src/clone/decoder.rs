//! A differentiable copy of the codec decoder, for searching codes by gradient descent.
//! It reads the loaded decoder's weights and computes the same function with ops candle can
//! differentiate: causal convs and the transposed convs as sums of matmuls over shifted rows
//! (candle has no backward for `conv_transpose1d`, and its conv1d backward is slow), RMSNorm
//! written out, masked full attention with the plain softmax. Layout is time-first: `[L, C]`.

use candle_core::{DType, Device, Result, Tensor, D};

use crate::model::codec::{Block, CodecDecoder, CodecLayer, Pad};
use crate::model::nn::RmsNorm;

/// RMSNorm as plain ops: `x / sqrt(mean(x²) + eps) * w`.
struct Norm {
    weight: Tensor,
    eps: f64,
}

impl Norm {
    fn new(n: &RmsNorm, dtype: DType) -> Result<Self> {
        let (w, eps) = n.parts();
        Ok(Self {
            weight: w.to_dtype(dtype)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let rms = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        x.broadcast_div(&rms)?.broadcast_mul(&self.weight)
    }
}

/// A stride-1 causal conv: one `[C_in, C_out]` matrix per tap.
struct Conv {
    taps: Vec<Tensor>,
    pad: Pad,
}

impl Conv {
    fn new(weight: &Tensor, pad: Pad, dtype: DType) -> Result<Self> {
        let k = weight.dim(2)?;
        let taps = (0..k)
            .map(|j| {
                weight
                    .narrow(2, j, 1)?
                    .squeeze(2)?
                    .t()?
                    .to_dtype(dtype)?
                    .contiguous()
            })
            .collect::<Result<_>>()?;
        Ok(Self { taps, pad })
    }

    /// `[L, C_in]` to `[L, C_out]`, padded on the left as the decoder pads a stream's start.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let p = self.taps.len() - 1;
        let len = x.dim(0)?;
        let x = match self.pad {
            Pad::Replicate => x.pad_with_same(0, p, 0)?,
            Pad::Reflect => reflect_rows(x, p)?,
        };
        let mut y = x.narrow(0, 0, len)?.matmul(&self.taps[0])?;
        for (j, w) in self.taps.iter().enumerate().skip(1) {
            y = (y + x.narrow(0, j, len)?.matmul(w)?)?;
        }
        Ok(y)
    }
}

/// Mirror padding of `p` rows on top without repeating the edge; inputs no longer than the
/// pad are zero-extended first, as the inference path does.
fn reflect_rows(x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 0 {
        return Ok(x.clone());
    }
    let len = x.dim(0)?;
    let extra = (p + 1).saturating_sub(len);
    let x = if extra > 0 {
        x.pad_with_zeros(0, 0, extra)?
    } else {
        x.clone()
    };
    let idx: Vec<u32> = (1..=p).rev().map(|i| i as u32).collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    let y = Tensor::cat(&[&x.index_select(&idx, 0)?, &x], 0)?;
    y.narrow(0, 0, p + len)
}

/// A causal transposed conv (`k` taps, stride `s`, the last `k - s` outputs trimmed) as
/// `ceil(k / s)` matmuls whose outputs are shifted by whole strides and added.
struct Upsample {
    /// Per group of `s` taps: `[C_in, s * C_out]`, column `r * C_out + o` for tap `g*s + r`.
    pieces: Vec<Tensor>,
    stride: usize,
    c_out: usize,
}

impl Upsample {
    fn new(weight: &Tensor, stride: usize, dtype: DType) -> Result<Self> {
        let (c_in, c_out, k) = weight.dims3()?;
        let groups = k.div_ceil(stride);
        let w = weight
            .to_dtype(dtype)?
            .pad_with_zeros(2, 0, groups * stride - k)?;
        let pieces = (0..groups)
            .map(|g| {
                w.narrow(2, g * stride, stride)?
                    .permute((0, 2, 1))?
                    .contiguous()?
                    .reshape((c_in, stride * c_out))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            pieces,
            stride,
            c_out,
        })
    }

    /// `[L, C_in]` to `[L * s, C_out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let len = x.dim(0)?;
        let out = len * self.stride;
        let mut y: Option<Tensor> = None;
        for (g, w) in self.pieces.iter().enumerate() {
            let shift = g * self.stride;
            if shift >= out {
                break;
            }
            let keep = len - g;
            let p = x
                .narrow(0, 0, keep)?
                .matmul(w)?
                .reshape((keep * self.stride, self.c_out))?
                .pad_with_zeros(0, shift, 0)?;
            y = Some(match y {
                None => p,
                Some(y) => (y + p)?,
            });
        }
        Ok(y.expect("a transposed conv has at least one tap"))
    }
}

struct Layer {
    attention_norm: Norm,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    q_norm: Norm,
    k_norm: Norm,
    attention_scale: Tensor,
    ffn_norm: Norm,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor,
    ffn_scale: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// `[in, out]` (transposed) copy of a dense projection's weight.
fn dense(p: &crate::model::nn::Proj, dtype: DType) -> Result<Tensor> {
    let w = p
        .dense_weight()?
        .ok_or_else(|| candle_core::Error::Msg("the codec's projections must be dense".into()))?;
    w.t()?.to_dtype(dtype)?.contiguous()
}

impl Layer {
    fn new(l: &CodecLayer, dtype: DType) -> Result<Self> {
        let a = &l.attention;
        Ok(Self {
            attention_norm: Norm::new(&l.attention_norm, dtype)?,
            wq: dense(&a.wq, dtype)?,
            wk: dense(&a.wk, dtype)?,
            wv: dense(&a.wv, dtype)?,
            wo: dense(&a.wo, dtype)?,
            q_norm: Norm::new(&l.q_norm, dtype)?,
            k_norm: Norm::new(&l.k_norm, dtype)?,
            attention_scale: l.attention_scale.to_dtype(dtype)?,
            ffn_norm: Norm::new(&l.ffn_norm, dtype)?,
            w1: dense(&l.feed_forward.w1, dtype)?,
            w2: dense(&l.feed_forward.w2, dtype)?,
            w3: dense(&l.feed_forward.w3, dtype)?,
            ffn_scale: l.ffn_scale.to_dtype(dtype)?,
            heads: a.n_heads,
            kv_heads: a.n_kv_heads,
            head_dim: a.head_dim,
        })
    }

    /// `[L, dim]` through the block; `bias` is `[H, L, L]` (ALiBi in the window, `-inf` out).
    fn forward(&self, x: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let len = x.dim(0)?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            let t = t.reshape((len, n, self.head_dim))?.transpose(0, 1)?;
            if n == self.heads {
                return t.contiguous();
            }
            t.unsqueeze(1)?
                .broadcast_as((n, self.heads / n, len, self.head_dim))?
                .reshape((self.heads, len, self.head_dim))
        };
        let a = self.attention_norm.forward(x)?;
        let q = heads(self.q_norm.forward(&a.matmul(&self.wq)?)?, self.heads)?;
        let k = heads(self.k_norm.forward(&a.matmul(&self.wk)?)?, self.kv_heads)?;
        let v = heads(a.matmul(&self.wv)?, self.kv_heads)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let scores = ((q.matmul(&k.t()?)? * scale)? + bias)?;
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let h = probs
            .matmul(&v)?
            .transpose(0, 1)?
            .reshape((len, self.heads * self.head_dim))?;
        let x = (x + h.matmul(&self.wo)?.broadcast_mul(&self.attention_scale)?)?;
        let b = self.ffn_norm.forward(&x)?;
        let gate = candle_nn::ops::silu(&b.matmul(&self.w1)?)?;
        let f = (gate * b.matmul(&self.w3)?)?.matmul(&self.w2)?;
        x + f.broadcast_mul(&self.ffn_scale)?
    }
}

enum Stage {
    Conv(Conv),
    Up(Upsample),
    Transformer { layers: Vec<Layer>, window: usize },
}

/// The decoder as differentiable ops over shared weights converted to `dtype`.
pub struct TrainDecoder {
    codebook: Tensor,
    stages: Vec<Stage>,
    output: Conv,
    slopes: Vec<f32>,
    semantic_dim: usize,
    levels: usize,
    n_acoustic: usize,
    patch: usize,
    dtype: DType,
    device: Device,
}

impl TrainDecoder {
    pub fn new(codec: &CodecDecoder, dtype: DType) -> Result<Self> {
        let stages = codec
            .blocks
            .iter()
            .map(|b| {
                Ok(match b {
                    Block::Conv(c) => Stage::Conv(Conv::new(&c.weight()?, c.pad, dtype)?),
                    Block::ConvTranspose(c) => {
                        Stage::Up(Upsample::new(&c.weight()?, c.stride, dtype)?)
                    }
                    Block::Transformer(t) => Stage::Transformer {
                        layers: t
                            .layers
                            .iter()
                            .map(|l| Layer::new(l, dtype))
                            .collect::<Result<_>>()?,
                        window: t.window,
                    },
                })
            })
            .collect::<Result<_>>()?;
        let codebook = codec.semantic_codebook.to_dtype(dtype)?;
        Ok(Self {
            semantic_dim: codebook.dim(1)?,
            device: codebook.device().clone(),
            codebook,
            stages,
            output: Conv::new(&codec.output_proj.weight()?, codec.output_proj.pad, dtype)?,
            slopes: codec.slopes.clone(),
            levels: codec.levels,
            n_acoustic: codec.n_acoustic,
            patch: codec.patch,
            dtype,
        })
    }

    pub fn codebook(&self) -> &Tensor {
        &self.codebook
    }
    pub fn semantic_dim(&self) -> usize {
        self.semantic_dim
    }
    pub fn levels(&self) -> usize {
        self.levels
    }
    pub fn n_acoustic(&self) -> usize {
        self.n_acoustic
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn samples_per_frame(&self) -> usize {
        let up: usize = self
            .stages
            .iter()
            .map(|s| match s {
                Stage::Up(u) => u.stride,
                _ => 1,
            })
            .product();
        up * self.patch
    }

    /// Frames before a frame that can change its samples: each op's left reach, converted
    /// to frames at the rate it runs at, summed and rounded up. A crop decoded with this many
    /// frames of left context matches a full decode closely (exactly at the clip's start).
    pub fn receptive_frames(&self) -> usize {
        let mut rate = 1usize; // steps per frame at this point
        let mut steps_at = 0f64; // reach in frames
        for s in &self.stages {
            match s {
                Stage::Conv(c) => steps_at += (c.taps.len() - 1) as f64 / rate as f64,
                Stage::Up(u) => {
                    steps_at += (u.pieces.len() - 1) as f64 / rate as f64;
                    rate *= u.stride;
                }
                Stage::Transformer { layers, window } => {
                    steps_at += (layers.len() * window) as f64 / rate as f64
                }
            }
        }
        steps_at += (self.output.taps.len() - 1) as f64 / rate as f64;
        steps_at.ceil() as usize
    }

    /// Latent `[T, semantic_dim + acoustic_dim]` to samples `[T * samples_per_frame]`.
    pub fn forward(&self, latent: &Tensor) -> Result<Tensor> {
        let mut x = latent.to_dtype(self.dtype)?;
        for s in &self.stages {
            x = match s {
                Stage::Conv(c) => c.forward(&x)?,
                Stage::Up(u) => u.forward(&x)?,
                Stage::Transformer { layers, window } => {
                    let bias = self.alibi(x.dim(0)?, *window)?;
                    let mut h = x;
                    for l in layers {
                        h = l.forward(&h, &bias)?;
                    }
                    h
                }
            };
        }
        self.output.forward(&x)?.flatten_all()
    }

    /// `[H, L, L]`: `-slope * (i - j)` for `i - window <= j <= i`, `-inf` elsewhere.
    fn alibi(&self, len: usize, window: usize) -> Result<Tensor> {
        let mut bias = Vec::with_capacity(self.slopes.len() * len * len);
        for &m in &self.slopes {
            for i in 0..len {
                for j in 0..len {
                    bias.push(if j <= i && i - j <= window {
                        -m * (i - j) as f32
                    } else {
                        f32::NEG_INFINITY
                    });
                }
            }
        }
        Tensor::from_vec(bias, (self.slopes.len(), len, len), &self.device)?.to_dtype(self.dtype)
    }

    /// The decoder's latent of model-side codes (with the +2 offset): `[T, latent]`.
    pub fn latent_of(&self, frames: &[Vec<u32>]) -> Result<Tensor> {
        let off = crate::model::config::SPECIAL_CODES as u32;
        let sem: Vec<u32> = frames.iter().map(|f| f[0] - off).collect();
        let sem = self
            .codebook
            .index_select(&Tensor::new(sem.as_slice(), &self.device)?, 0)?;
        let ac: Vec<f32> = frames
            .iter()
            .flat_map(|f| {
                f[1..]
                    .iter()
                    .map(|&c| crate::model::flow::fsq_value(c - off, self.levels))
            })
            .collect();
        let ac = Tensor::from_vec(ac, (frames.len(), self.n_acoustic), &self.device)?
            .to_dtype(self.dtype)?;
        Tensor::cat(&[&sem, &ac], 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clone::search::random_codes;
    use candle_core::Var;

    fn tiny() -> CodecDecoder {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/voxtral-tiny");
        crate::model::Voxtral::load_codec(&dir, &Device::Cpu)
            .expect("the tiny fixture's codec")
            .0
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn matches_the_inference_decoder() -> Result<()> {
        let codec = tiny();
        let dec = TrainDecoder::new(&codec, DType::F32)?;
        assert_eq!(dec.samples_per_frame(), codec.samples_per_frame());
        for (frames, seed) in [(1, 1), (5, 2), (23, 3)] {
            let codes = random_codes(&codec, frames, seed);
            let want = codec.decode_frames(&codes, None).expect("decode");
            let got = dec.forward(&dec.latent_of(&codes)?)?.to_vec1::<f32>()?;
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(
                max_diff(&got, &want) <= 1e-4 * scale.max(1e-3),
                "{frames} frames: {} (scale {scale})",
                max_diff(&got, &want)
            );
        }
        Ok(())
    }

    #[test]
    fn a_crop_with_its_context_decodes_as_in_the_full_clip() -> Result<()> {
        let codec = tiny();
        let dec = TrainDecoder::new(&codec, DType::F32)?;
        let ctx = dec.receptive_frames();
        assert!(ctx >= 10, "context {ctx}");
        let spf = dec.samples_per_frame();
        let codes = random_codes(&codec, ctx + 12, 9);
        let full = dec.forward(&dec.latent_of(&codes)?)?.to_vec1::<f32>()?;
        let start = ctx + 4;
        let part = dec
            .forward(&dec.latent_of(&codes[start - ctx..])?)?
            .to_vec1::<f32>()?;
        let scale = full.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = max_diff(&part[ctx * spf..], &full[start * spf..]);
        assert!(d <= 1e-4 * scale, "crop differs by {d} (scale {scale})");
        // With too little context the crop's samples do change: the reach is real.
        let short = dec
            .forward(&dec.latent_of(&codes[start - 2..])?)?
            .to_vec1::<f32>()?;
        assert!(max_diff(&short[2 * spf..], &full[start * spf..]) > 1e-3 * scale);
        Ok(())
    }

    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let codec = tiny();
        let dec = TrainDecoder::new(&codec, DType::F64)?;
        let codes = random_codes(&codec, 4, 5);
        let latent = Var::from_tensor(&dec.latent_of(&codes)?)?;
        let n = 4 * dec.samples_per_frame();
        let probe: Vec<f64> = (0..n).map(|i| ((i * 7919) % 13) as f64 - 6.0).collect();
        let probe = Tensor::from_vec(probe, n, &Device::Cpu)?;
        let f = |x: &Tensor| -> Result<Tensor> { (dec.forward(x)? * &probe)?.sum_all() };
        let grads = f(latent.as_tensor())?.backward()?;
        let g = grads
            .get(latent.as_tensor())
            .expect("a gradient")
            .to_vec2::<f64>()?;
        let base = latent.as_tensor().to_vec2::<f64>()?;
        let (rows, cols) = (base.len(), base[0].len());
        let h = 1e-5;
        for (t, c) in [(0, 0), (1, 3), (2, cols - 1), (3, cols / 2), (rows - 1, 20)] {
            let at = |d: f64| -> Result<f64> {
                let mut x = base.clone();
                x[t][c] += d;
                let x = Tensor::new(x, &Device::Cpu)?;
                f(&x)?.to_scalar::<f64>()
            };
            let fd = (at(h)? - at(-h)?) / (2.0 * h);
            let tol = 1e-4 * fd.abs().max(g[t][c].abs()).max(1e-3);
            assert!(
                (fd - g[t][c]).abs() <= tol,
                "d/d latent[{t}][{c}]: backward {} finite differences {fd}",
                g[t][c]
            );
        }
        Ok(())
    }
}
