//! The flow head's transformer on plain f32 buffers on the CPU. Its rows are three tokens
//! each (six for one stream with guidance), too few for candle's ops to pay: every op
//! allocated its result, about 7,400 allocations and 32 MB a frame. Here a layer runs over
//! buffers kept from frame to frame, through the same projection kernels, and allocates
//! nothing once the buffers have grown to the batch.

use candle_core::Result;

use super::nn::{with_host_f32, TransformerLayer};

/// Buffers for one pass of the flow head's layers, grown on first use and then reused.
#[derive(Default)]
pub struct LayerScratch {
    normed: Vec<f32>,
    queries_in: Vec<f32>,
    residual: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attended: Vec<f32>,
    projected: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

/// The first `n` values of `buf`, grown with zeros if it is shorter.
pub fn room(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}

/// RMSNorm of each row of `x` (rows as long as `weight`) into `out`, as candle's CPU kernel
/// computes it: the mean square in f32, then `x / sqrt(ms + eps) * weight`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (x, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let sum2 = x.iter().map(|v| v * v).sum::<f32>();
        let m = (sum2 / d as f32 + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = v / m * w;
        }
    }
}

/// Softmax of `scores` in place, as candle's: the maximum off, `exp`, divided by the sum.
fn softmax(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in scores.iter_mut() {
        *s /= sum;
    }
}

/// Most tokens a group may have (the flow head has three).
const MAX_TOKENS: usize = 8;

impl TransformerLayer {
    /// The layer over `z`: `groups` groups of `tokens` rows of `dim` values, each group
    /// attending within itself (bidirectional, no positions). With `token = Some(j)` only
    /// token `j` of each group is computed (keys and values still come from every token),
    /// and its `groups` rows are written to the start of `z`; otherwise every row is updated
    /// in place.
    pub fn forward_host(
        &self,
        z: &mut [f32],
        (groups, tokens): (usize, usize),
        token: Option<usize>,
        s: &mut LayerScratch,
    ) -> Result<()> {
        let att = &self.attention;
        let dim = z.len() / (groups * tokens).max(1);
        let rows = groups * tokens;
        if tokens == 0 || tokens > MAX_TOKENS || z.len() != rows * dim {
            candle_core::bail!(
                "flow layer: {} values for {groups} x {tokens} rows",
                z.len()
            );
        }
        let (hd, heads, kv) = (att.head_dim, att.n_heads, att.n_kv_heads);
        let rep = heads / kv.max(1);
        let queries = if token.is_some() { groups } else { rows };
        let (norm_w, eps) = self.attention_norm.parts();
        let normed = room(&mut s.normed, rows * dim);
        with_host_f32(norm_w, |w| {
            rms_norm(z, w, eps as f32, normed);
            Ok(())
        })?;
        let (queries_in, residual) = match token {
            Some(j) => {
                let q_in = room(&mut s.queries_in, groups * dim);
                let res = room(&mut s.residual, groups * dim);
                for g in 0..groups {
                    let at = (g * tokens + j) * dim;
                    q_in[g * dim..][..dim].copy_from_slice(&normed[at..][..dim]);
                    res[g * dim..][..dim].copy_from_slice(&z[at..][..dim]);
                }
                (&*q_in, &mut *res)
            }
            None => (&*normed, &mut *z),
        };
        let q = room(&mut s.q, queries * heads * hd);
        att.wq.forward_host(queries_in, queries, q)?;
        let k = room(&mut s.k, rows * kv * hd);
        att.wk.forward_host(normed, rows, k)?;
        let v = room(&mut s.v, rows * kv * hd);
        att.wv.forward_host(normed, rows, v)?;
        let attended = room(&mut s.attended, queries * heads * hd);
        let scale = 1.0 / (hd as f32).sqrt();
        for qr in 0..queries {
            let g = if token.is_some() { qr } else { qr / tokens };
            for h in 0..heads {
                let qv = &q[(qr * heads + h) * hd..][..hd];
                let kh = h / rep;
                let mut scores = [0f32; MAX_TOKENS];
                let scores = &mut scores[..tokens];
                for (t, sc) in scores.iter_mut().enumerate() {
                    let kv_row = ((g * tokens + t) * kv + kh) * hd;
                    let dot: f32 = qv.iter().zip(&k[kv_row..][..hd]).map(|(a, b)| a * b).sum();
                    *sc = dot * scale;
                }
                softmax(scores);
                let out = &mut attended[(qr * heads + h) * hd..][..hd];
                out.fill(0.0);
                for (t, &p) in scores.iter().enumerate() {
                    let vv = &v[((g * tokens + t) * kv + kh) * hd..][..hd];
                    for (o, &x) in out.iter_mut().zip(vv) {
                        *o += p * x;
                    }
                }
            }
        }
        let projected = room(&mut s.projected, queries * dim);
        att.wo.forward_host(attended, queries, projected)?;
        for (r, p) in residual.iter_mut().zip(projected.iter()) {
            *r += p;
        }
        let (norm_w, eps) = self.ffn_norm.parts();
        let normed = room(&mut s.normed, queries * dim);
        with_host_f32(norm_w, |w| {
            rms_norm(residual, w, eps as f32, normed);
            Ok(())
        })?;
        let ff = &self.feed_forward;
        let hidden = ff_hidden(ff, queries, normed, &mut s.gate, &mut s.up)?;
        let gate = &mut s.gate[..queries * hidden];
        for (g, &u) in gate.iter_mut().zip(&s.up[..queries * hidden]) {
            // silu(g) * u, as candle's silu: g / (1 + exp(-g)).
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
        ff.w2.forward_host(gate, queries, projected)?;
        for (r, p) in residual.iter_mut().zip(projected.iter()) {
            *r += p;
        }
        if token.is_some() {
            z[..groups * dim].copy_from_slice(&s.residual[..groups * dim]);
        }
        Ok(())
    }
}

/// The gate and up projections of `x` into `gate` and `up`; returns the hidden width.
fn ff_hidden(
    ff: &super::nn::FeedForward,
    rows: usize,
    x: &[f32],
    gate: &mut Vec<f32>,
    up: &mut Vec<f32>,
) -> Result<usize> {
    let hidden = ff.w1.out_features()?;
    ff.w1.forward_host(x, rows, room(gate, rows * hidden))?;
    ff.w3.forward_host(x, rows, room(up, rows * hidden))?;
    Ok(hidden)
}
