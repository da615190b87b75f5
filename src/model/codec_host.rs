//! The codec's streaming decode on host rows (the CPU in f32): the same blocks as the tensor
//! path in `codec.rs`, over time-first rows in buffers kept from chunk to chunk, through the
//! same panel kernels. Candle's ops allocated every intermediate (about 190 allocations and
//! 3.6 MB a frame on the bench checkpoint); here a chunk allocates only its samples.

use std::sync::Mutex;

use candle_core::{Device, Result, Tensor};

use super::codec::{Block, CausalConv, CausalConvTranspose, CodecDecoder, CodecLayer, Pad};
use super::config::SPECIAL_CODES;
use super::flow::fsq_value;
use super::host::{feed_forward_into, norm_into, room};
use super::nn::with_host_f32;
use super::panels::PanelWeights;

/// A stream's left context on host rows: what each block needs of the steps before a chunk.
#[derive(Clone)]
pub(crate) struct HostCarry {
    blocks: Vec<BlockCarry>,
    output: Steps,
}

#[derive(Clone)]
enum BlockCarry {
    Conv(Steps),
    ConvTranspose(Steps),
    /// Per layer, the keys and values of the latest steps (at most a window of them).
    Transformer(Vec<Window>),
}

/// A conv's last input steps, as rows; before a stream's first chunk, none (`started` false:
/// the conv's padding stands in for them).
#[derive(Clone, Default)]
struct Steps {
    rows: Vec<f32>,
    started: bool,
}

/// One attention layer's latest keys and values, rows of `KV · hd`.
#[derive(Clone, Default)]
struct Window {
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// Buffers of a decode, grown on first use and then reused.
#[derive(Default)]
pub(crate) struct HostScratch {
    x: Vec<f32>,
    y: Vec<f32>,
    input: Vec<f32>,
    normed: Vec<f32>,
    raw: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    keys: Vec<f32>,
    values: Vec<f32>,
    scores: Vec<f32>,
    attended: Vec<f32>,
    projected: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
}

impl CodecDecoder {
    /// A new stream's left context on host rows.
    pub(crate) fn start_host(&self) -> HostCarry {
        HostCarry {
            blocks: self
                .blocks
                .iter()
                .map(|b| match b {
                    Block::Conv(_) => BlockCarry::Conv(Steps::default()),
                    Block::ConvTranspose(_) => BlockCarry::ConvTranspose(Steps::default()),
                    Block::Transformer(t) => {
                        BlockCarry::Transformer(vec![Window::default(); t.layers.len()])
                    }
                })
                .collect(),
            output: Steps::default(),
        }
    }

    /// Decodes validated `frames` (none of them `[END_AUDIO]`) after `carry`'s steps, the
    /// samples appended to `out`; `stages` as in `decode_chunk`.
    pub(crate) fn decode_host<F: AsRef<[u32]>>(
        &self,
        scratch: &Mutex<HostScratch>,
        carry: &mut HostCarry,
        frames: &[F],
        mut stages: Option<&mut Vec<Tensor>>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let mut kept = scratch.try_lock();
        let mut fresh = HostScratch::default();
        let s = kept.as_deref_mut().unwrap_or(&mut fresh);
        let mut width = self.latent_rows(frames, &mut s.x)?;
        let mut record = |rows: &[f32], width: usize| -> Result<()> {
            if let Some(st) = stages.as_deref_mut() {
                let n = rows.len() / width;
                st.push(Tensor::from_slice(rows, (n, width), &Device::Cpu)?);
            }
            Ok(())
        };
        for (block, c) in self.blocks.iter().zip(&mut carry.blocks) {
            match (block, c) {
                (Block::Conv(conv), BlockCarry::Conv(tail)) => {
                    width = conv_rows(conv, width, tail, s)?;
                }
                (Block::ConvTranspose(conv), BlockCarry::ConvTranspose(prev)) => {
                    width = conv_transpose_rows(conv, width, prev, s)?;
                }
                (Block::Transformer(t), BlockCarry::Transformer(windows)) => {
                    for (layer, w) in t.layers.iter().zip(windows) {
                        self.layer_rows(layer, t.window, width, w, s)?;
                    }
                }
                _ => candle_core::bail!("a codec state made for another decoder"),
            }
            record(&s.x, width)?;
        }
        let width = conv_rows(&self.output_proj, width, &mut carry.output, s)?;
        record(&s.x, width)?;
        out.extend_from_slice(&s.x);
        Ok(())
    }

    /// The dequantized latent of `frames` as rows in `x`; returns their width.
    fn latent_rows<F: AsRef<[u32]>>(&self, frames: &[F], x: &mut Vec<f32>) -> Result<usize> {
        let off = SPECIAL_CODES as u32;
        with_host_f32(&self.semantic_codebook, |book| {
            let sd = book.len() / self.semantic_size.max(1);
            let width = sd + self.n_acoustic;
            x.clear();
            for f in frames {
                let f = f.as_ref();
                let r = f[0].wrapping_sub(off) as usize;
                let Some(row) = book.get(r * sd..(r + 1) * sd) else {
                    candle_core::bail!("semantic code {} past the codebook", f[0]);
                };
                x.extend_from_slice(row);
                x.extend(
                    f[1..]
                        .iter()
                        .map(|&c| fsq_value(c.saturating_sub(off), self.levels)),
                );
            }
            if x.len() != frames.len() * width {
                candle_core::bail!("frames of {} codes for a latent of {width}", x.len());
            }
            Ok(width)
        })
    }

    /// One transformer layer over the rows in `s.x` (`width` values each), in place; `w`
    /// holds the keys and values of the steps before them and moves on to the latest.
    fn layer_rows(
        &self,
        layer: &CodecLayer,
        window: usize,
        width: usize,
        w: &mut Window,
        s: &mut HostScratch,
    ) -> Result<()> {
        let att = &layer.attention;
        let (heads, kv, hd) = (att.n_heads, att.n_kv_heads, att.head_dim);
        let len = s.x.len() / width;
        let x = &mut s.x[..len * width];
        let normed = room(&mut s.normed, len * width);
        norm_into(&layer.attention_norm, x, normed)?;
        let raw = room(&mut s.raw, len * heads * hd);
        att.wq.forward_host(normed, len, raw)?;
        let q = room(&mut s.q, len * heads * hd);
        norm_into(&layer.q_norm, raw, q)?;
        let raw = &mut raw[..len * kv * hd];
        att.wk.forward_host(normed, len, raw)?;
        let k = room(&mut s.k, len * kv * hd);
        norm_into(&layer.k_norm, raw, k)?;
        let v = room(&mut s.v, len * kv * hd);
        att.wv.forward_host(normed, len, v)?;
        // The window's steps, then this chunk's.
        let row = kv * hd;
        let ctx = w.keys.len() / row;
        for (all, before, new) in [
            (&mut s.keys, &mut w.keys, &*k),
            (&mut s.values, &mut w.values, &*v),
        ] {
            all.clear();
            all.extend_from_slice(before);
            all.extend_from_slice(new);
            let keep = (ctx + len).min(window) * row;
            before.clear();
            before.extend_from_slice(&all[all.len() - keep..]);
        }
        let attended = room(&mut s.attended, len * heads * hd);
        let scores = room(&mut s.scores, len * (window + 1));
        window_attention(
            (q, &s.keys, &s.values),
            (heads, kv, hd),
            (window, ctx),
            &self.slopes,
            scores,
            attended,
        );
        let projected = room(&mut s.projected, len * width);
        att.wo.forward_host(attended, len, projected)?;
        add_scaled(x, projected, &layer.attention_scale)?;
        norm_into(&layer.ffn_norm, x, normed)?;
        let hidden = (&mut s.gate, &mut s.up);
        feed_forward_into(&layer.feed_forward, len, normed, hidden, projected)?;
        add_scaled(x, projected, &layer.ffn_scale)
    }
}

/// `x += y · scale`, `scale` one value per column.
fn add_scaled(x: &mut [f32], y: &[f32], scale: &Tensor) -> Result<()> {
    with_host_f32(scale, |scale| {
        for (x, y) in x
            .chunks_exact_mut(scale.len())
            .zip(y.chunks_exact(scale.len()))
        {
            for ((x, &y), &m) in x.iter_mut().zip(y).zip(scale) {
                *x += y * m;
            }
        }
        Ok(())
    })
}

/// The causal sliding-window attention with ALiBi of the codec (see `windowed_attention`):
/// query row `i` (`q` `[len, H·hd]`) at step `ctx + i` of `keys` and `values` (`[ctx + len,
/// KV·hd]`) sees the steps `ctx + i - window ..= ctx + i`, with bias `−slope · distance`.
/// Query rows run in parallel; each sums in the order of the tensor path's loops.
pub(super) fn window_attention(
    (q, keys, values): (&[f32], &[f32], &[f32]),
    (heads, kv, hd): (usize, usize, usize),
    (window, ctx): (usize, usize),
    slopes: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    use rayon::prelude::*;
    let group = heads / kv.max(1);
    let scale = 1.0 / (hd as f32).sqrt();
    let key = |step: usize, h: usize| (step * kv + h / group) * hd;
    out.par_chunks_mut(heads * hd)
        .zip(scores.par_chunks_mut(window + 1))
        .enumerate()
        .for_each(|(i, (out, scores))| {
            let at = ctx + i;
            let first = window.saturating_sub(at);
            for (h, o_h) in out.chunks_exact_mut(hd).enumerate() {
                let qv = &q[(i * heads + h) * hd..][..hd];
                let m = slopes[h];
                let mut max = f32::NEG_INFINITY;
                for o in first..=window {
                    let k = &keys[key(at + o - window, h)..][..hd];
                    let s = dot(qv, k) * scale - m * (window - o) as f32;
                    scores[o] = s;
                    max = max.max(s);
                }
                let mut sum = 0f32;
                for s in &mut scores[first..=window] {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                o_h.fill(0.0);
                for o in first..=window {
                    let p = scores[o] / sum;
                    let v = &values[key(at + o - window, h)..][..hd];
                    for (y, x) in o_h.iter_mut().zip(v) {
                        *y += p * x;
                    }
                }
            }
        });
}

/// `a · b` in eight lanes (so that it vectorizes), the lanes summed in a fixed order.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The rows in `s.x` (`c_in` values each) through a stride-1 causal conv into `s.x`; `tail`
/// carries its last `taps - 1` inputs. Returns the output width.
fn conv_rows(
    conv: &CausalConv,
    c_in: usize,
    tail: &mut Steps,
    s: &mut HostScratch,
) -> Result<usize> {
    let w = conv.panels()?;
    let p = conv.taps - 1;
    let x = &s.x;
    let len = x.len() / c_in;
    let input = &mut s.input;
    input.clear();
    if tail.started {
        input.extend_from_slice(&tail.rows);
    } else {
        match conv.pad {
            Pad::Replicate => (0..p).for_each(|_| input.extend_from_slice(&x[..c_in])),
            // x_p .. x_1, zeros for the steps past the input's end.
            Pad::Reflect => {
                for i in (1..=p).rev() {
                    if i < len {
                        input.extend_from_slice(&x[i * c_in..][..c_in]);
                    } else {
                        input.extend((0..c_in).map(|_| 0f32));
                    }
                }
            }
        }
    }
    input.extend_from_slice(x);
    windows_through(w, p, c_in, tail, s)
}

/// The rows in `s.x` (`c` values each) through a causal transposed conv into `s.x`, `stride`
/// times as many rows; `prev` carries the inputs whose outputs overlap the next chunk's.
fn conv_transpose_rows(
    conv: &CausalConvTranspose,
    c: usize,
    prev: &mut Steps,
    s: &mut HostScratch,
) -> Result<usize> {
    let w = conv.panels()?;
    let o = conv.overlap();
    let input = &mut s.input;
    input.clear();
    let have = prev.rows.len() / c;
    input.extend((0..o.saturating_sub(have) * c).map(|_| 0f32));
    input.extend_from_slice(&prev.rows);
    input.extend_from_slice(&s.x);
    let out = windows_through(w, o, c, prev, s)?; // stride · c
    Ok(out / conv.stride)
}

/// The rows of `s.input` (`c_in` values each; the first `before` are context) through panels
/// whose rows are windows of `before + 1` steps, into `s.x`; `carry` keeps the last `before`
/// input rows for the next chunk. Returns the output width.
fn windows_through(
    w: &PanelWeights,
    before: usize,
    c_in: usize,
    carry: &mut Steps,
    s: &mut HostScratch,
) -> Result<usize> {
    let input = &s.input;
    let len = input.len() / c_in - before;
    carry.rows.clear();
    carry
        .rows
        .extend_from_slice(&input[input.len() - before * c_in..]);
    carry.started = true;
    let out = w.dims().0;
    w.matmul_into(input, len, c_in, room(&mut s.y, len * out))?;
    s.y.truncate(len * out);
    std::mem::swap(&mut s.x, &mut s.y);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_close(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let peak = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(want)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff <= 1e-5 * peak, "{what}: {diff} apart (peak {peak})");
        assert!(want.iter().any(|v| *v != 0.0), "{what}: all zero");
    }

    /// The decode on host rows gives the tensor path's stages and samples on the same panels:
    /// in one go, streamed in uneven chunks (one frame, then chunks past the windows), and
    /// from a clone of a state.
    #[test]
    fn host_rows_decode_as_the_tensor_path() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/voxtral-tiny");
        let (codec, _) = crate::model::Voxtral::load_codec(&dir, &Device::Cpu).expect("fixture");
        let on_panels = crate::model::panels::suit(&Device::Cpu, candle_core::DType::F32);
        assert_eq!(codec.host.is_some(), on_panels, "on panels, on host rows");
        if !on_panels {
            return; // candle's kernels only (no AVX2, or `VOXTRALD_KERNEL=candle`)
        }
        let frames = crate::clone::search::random_codes(&codec, 23, 5);
        let (mut host, mut tensors) = (Vec::new(), Vec::new());
        let got = codec.decode_frames(&frames, Some(&mut host)).expect("host");
        let want = codec
            .decode_chunk(&mut codec.start_tensors(), &frames, Some(&mut tensors))
            .expect("tensors");
        assert_close("one go", &got, &want);
        assert_eq!(host.len(), tensors.len());
        for (i, (h, t)) in host.iter().zip(&tensors).enumerate() {
            assert_eq!(h.dims(), t.dims(), "stage {i}");
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_close(&format!("stage {i}"), &flat(h), &flat(t));
        }
        let (mut h, mut t) = (codec.start(), codec.start_tensors());
        let mut at = 0;
        for n in [1, 2, 9, 11] {
            let chunk = &frames[at..at + n];
            let fork = h.clone();
            let got = codec.decode_chunk(&mut h, chunk, None).expect("host chunk");
            let want = codec
                .decode_chunk(&mut t, chunk, None)
                .expect("tensor chunk");
            assert_close(&format!("chunk at {at}"), &got, &want);
            let again = codec
                .decode_chunk(&mut fork.clone(), chunk, None)
                .expect("fork");
            assert_eq!(again, got, "a clone decodes as its original");
            at += n;
        }
    }
}
