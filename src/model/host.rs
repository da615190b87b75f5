//! Transformer layers on plain f32 buffers on the CPU, for the per-frame loop: the flow
//! head's rows (three tokens each, six for one stream with guidance) and a backbone step's
//! (one per stream) are too few for candle's ops to pay, and every op allocated its result
//! (about 8,800 allocations and 42 MB a frame on the bench checkpoint). Here a layer runs over
//! buffers kept from frame to frame, through the same projection kernels; the caller brings
//! the attention (within token groups for the flow head, over the KV cache for the backbone).

use candle_core::Result;

use super::nn::{with_host_f32, FeedForward, RmsNorm, TransformerLayer};

/// Runs `f` on rayon's pool (in place when already on it). Every kernel of the per-frame loop
/// splits its rows with rayon; pushed from outside the pool, each split goes through the
/// pool's shared queue, which allocates a block every 63 jobs, while from inside it goes on
/// the worker's own queue, which allocates nothing. The calling thread waits either way.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Buffers for one layer on host rows (the flow head's or a backbone step's), grown on first
/// use and then reused.
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
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let d = weight.len();
    for (x, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let sum2 = x.iter().map(|v| v * v).sum::<f32>();
        let m = (sum2 / d as f32 + eps).sqrt();
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
            *o = v / m * w;
        }
    }
}

/// `norm` over the rows of `x` into `out`.
pub fn norm_into(norm: &RmsNorm, x: &[f32], out: &mut [f32]) -> Result<()> {
    let (weight, eps) = norm.parts();
    with_host_f32(weight, |w| {
        rms_norm(x, w, eps as f32, out);
        Ok(())
    })
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

/// Attention within groups of `tokens` rows (bidirectional, no positions), as the flow head
/// uses it: `q` `[queries, H·hd]` (every row, or with `token = Some(j)` row `j` of each group),
/// `k` and `v` `[groups·tokens, KV·hd]`, into `out` `[queries, H·hd]`.
pub fn group_attention(
    (q, k, v): (&[f32], &[f32], &[f32]),
    (heads, kv, hd): (usize, usize, usize),
    (groups, tokens, token): (usize, usize, Option<usize>),
    out: &mut [f32],
) -> Result<()> {
    if tokens > MAX_TOKENS {
        candle_core::bail!("group attention: {tokens} tokens a group, at most {MAX_TOKENS}");
    }
    let rep = heads / kv.max(1);
    let scale = 1.0 / (hd as f32).sqrt();
    let queries = if token.is_some() {
        groups
    } else {
        groups * tokens
    };
    for qr in 0..queries {
        let g = if token.is_some() { qr } else { qr / tokens };
        for h in 0..heads {
            let qv = &q[(qr * heads + h) * hd..][..hd];
            let kh = h / rep;
            let mut scores = [0f32; MAX_TOKENS];
            let scores = &mut scores[..tokens];
            for (t, sc) in scores.iter_mut().enumerate() {
                let at = ((g * tokens + t) * kv + kh) * hd;
                *sc = dot(qv, &k[at..][..hd]) * scale;
            }
            softmax(scores);
            let out = &mut out[(qr * heads + h) * hd..][..hd];
            out.fill(0.0);
            for (t, &p) in scores.iter().enumerate() {
                let vv = &v[((g * tokens + t) * kv + kh) * hd..][..hd];
                for (o, &x) in out.iter_mut().zip(vv) {
                    *o += p * x;
                }
            }
        }
    }
    Ok(())
}

/// Attention of one query row `q` `[H·hd]` over `len` cached positions, read in place from a
/// cache laid out `[KV, capacity, hd]` (`stride` values from one position to the next,
/// `head_stride` from one kv head to the next), into `out` `[H·hd]`; `scores` is scratch.
#[allow(clippy::too_many_arguments)]
pub fn cached_attention(
    q: &[f32],
    (k, v): (&[f32], &[f32]),
    (heads, kv, hd): (usize, usize, usize),
    (len, stride, head_stride): (usize, usize, usize),
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let rep = heads / kv.max(1);
    let scale = 1.0 / (hd as f32).sqrt();
    let scores = room(scores, len);
    for h in 0..heads {
        let qv = &q[h * hd..][..hd];
        let base = (h / rep) * head_stride;
        for (t, sc) in scores.iter_mut().enumerate() {
            *sc = dot(qv, &k[base + t * stride..][..hd]) * scale;
        }
        softmax(scores);
        let out = &mut out[h * hd..][..hd];
        out.fill(0.0);
        for (t, &p) in scores.iter().enumerate() {
            for (o, &x) in out.iter_mut().zip(&v[base + t * stride..][..hd]) {
                *o += p * x;
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// What a layer's attention gets: `q` `[queries, H·hd]`, `k` and `v` `[rows, KV·hd]`, the
/// output `[queries, H·hd]` to fill.
pub struct Heads<'a> {
    pub q: &'a mut [f32],
    pub k: &'a mut [f32],
    pub v: &'a mut [f32],
    pub out: &'a mut [f32],
}

impl TransformerLayer {
    /// `(heads, kv heads, head width)`.
    pub fn head_shape(&self) -> (usize, usize, usize) {
        let att = &self.attention;
        (att.n_heads, att.n_kv_heads, att.head_dim)
    }

    /// The layer over `z`: `groups` groups of `tokens` rows of `dim` values; `attend` fills
    /// the heads' output from the projected queries, keys and values (it may rotate them or
    /// keep them in a cache). With `token = Some(j)` only token `j` of each group is computed
    /// (keys and values still come from every token), and its `groups` rows are written to the
    /// start of `z`; otherwise every row is updated in place.
    pub fn forward_host(
        &self,
        z: &mut [f32],
        (groups, tokens): (usize, usize),
        token: Option<usize>,
        s: &mut LayerScratch,
        attend: impl FnOnce(Heads) -> Result<()>,
    ) -> Result<()> {
        let att = &self.attention;
        let dim = z.len() / (groups * tokens).max(1);
        let rows = groups * tokens;
        if tokens == 0 || z.len() != rows * dim || token.is_some_and(|j| j >= tokens) {
            candle_core::bail!("layer: {} values for {groups} x {tokens} rows", z.len());
        }
        let (heads, kv, hd) = self.head_shape();
        let queries = if token.is_some() { groups } else { rows };
        let normed = room(&mut s.normed, rows * dim);
        norm_into(&self.attention_norm, z, normed)?;
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
        let out = room(&mut s.attended, queries * heads * hd);
        attend(Heads { q, k, v, out })?;
        let projected = room(&mut s.projected, queries * dim);
        att.wo
            .forward_host(&s.attended[..queries * heads * hd], queries, projected)?;
        for (r, p) in residual.iter_mut().zip(projected.iter()) {
            *r += p;
        }
        let normed = room(&mut s.normed, queries * dim);
        norm_into(&self.ffn_norm, residual, normed)?;
        let (gate, up) = (&mut s.gate, &mut s.up);
        feed_forward_into(&self.feed_forward, queries, normed, (gate, up), projected)?;
        for (r, p) in residual.iter_mut().zip(projected.iter()) {
            *r += p;
        }
        if token.is_some() {
            z[..groups * dim].copy_from_slice(&s.residual[..groups * dim]);
        }
        Ok(())
    }
}

/// The SwiGLU feed-forward of `rows` rows `x` into `out`: `w2(silu(w1 x) · w3 x)`, the
/// hidden rows in `gate` and `up`.
pub fn feed_forward_into(
    ff: &FeedForward,
    rows: usize,
    x: &[f32],
    (gate, up): (&mut Vec<f32>, &mut Vec<f32>),
    out: &mut [f32],
) -> Result<()> {
    let hidden = ff.w1.out_features()?;
    let gate = room(gate, rows * hidden);
    ff.w1.forward_host(x, rows, gate)?;
    let up = room(up, rows * hidden);
    ff.w3.forward_host(x, rows, up)?;
    for (g, &u) in gate.iter_mut().zip(up.iter()) {
        // silu(g) * u, as candle's silu: g / (1 + exp(-g)).
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
    ff.w2.forward_host(gate, rows, out)
}
