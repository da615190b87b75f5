//! The Ministral-style causal decoder: prompt embeddings in, final-normed hidden states out.
//! Weights are Mistral-native, so RoPE rotates interleaved pairs (`rope_i`).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::config::ModelConfig;
use super::host::{cached_attention, norm_into, room, Heads, LayerScratch};
use super::kv_cache::LayerCache;
use super::nn::{attention, causal_mask, with_host_f32, Quant, RmsNorm, TransformerLayer};

/// Per-utterance state: one KV cache per layer. Dropping it frees the memory.
pub struct BackboneCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl Clone for BackboneCache {
    fn clone(&self) -> Self {
        Self {
            layers: self.layers.clone(),
            len: self.len,
        }
    }

    /// Into the list of layers `self` already has (a mark retaken each step allocates
    /// nothing; see [`super::kv_cache`] for what a clone shares).
    fn clone_from(&mut self, source: &Self) {
        self.layers.clone_from(&source.layers);
        self.len = source.len;
    }
}

impl BackboneCache {
    /// Lets go of the keys and values (their memory is freed once nothing else holds them),
    /// keeping the room of its list of layers for the next [`Clone::clone_from`].
    pub fn release(&mut self) {
        self.layers.clear();
        self.len = 0;
    }

    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The caches one step advances, in row order: a slice of them, or the generation loop's
/// view of the streams that step (which keeps no vector of references from frame to frame).
pub trait StepCaches {
    fn count(&self) -> usize;
    fn cache(&mut self, row: usize) -> &mut BackboneCache;
}

impl StepCaches for [&mut BackboneCache] {
    fn count(&self) -> usize {
        self.len()
    }
    fn cache(&mut self, row: usize) -> &mut BackboneCache {
        self[row]
    }
}

pub struct Backbone {
    tok_embeddings: Embedding,
    audio_embeddings: Tensor,
    layers: Vec<TransformerLayer>,
    norm: RmsNorm,
    cos: Tensor,
    sin: Tensor,
    max_positions: usize,
    /// Row offset of each codebook in the shared audio-code table.
    code_offsets: Vec<u32>,
    dim: usize,
    /// The compute dtype.
    dtype: DType,
    /// On the CPU in f32: the step's layers on host buffers (see [`Backbone::step_batch`]).
    host: Option<std::sync::Mutex<StepScratch>>,
}

/// Buffers of a step on host buffers, grown on first use and then reused.
#[derive(Default)]
struct StepScratch {
    layer: LayerScratch,
    /// The rows `[B, dim]`.
    x: Vec<f32>,
    scores: Vec<f32>,
}

/// Rotates each head of `x` (heads of `hd` values) by RoPE's interleaved pairs, as candle's
/// `rope_i`: `(a, b)` becomes `(a·cos − b·sin, a·sin + b·cos)`.
fn rope_rows(x: &mut [f32], hd: usize, cos: &[f32], sin: &[f32]) {
    for head in x.chunks_exact_mut(hd) {
        for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
            let (a, b) = (pair[0], pair[1]);
            pair[0] = a * c - b * s;
            pair[1] = a * s + b * c;
        }
    }
}

/// The token embedding table's tensor name.
pub const TOKEN_TABLE: &str = "mm_audio_embeddings.tok_embeddings.weight";
/// The audio-code embedding table's tensor name.
pub const AUDIO_TABLE: &str = "mm_audio_embeddings.audio_codebook_embeddings.embeddings.weight";

impl Backbone {
    /// `max_positions` bounds prompt plus frames; RoPE tables are built for exactly that many.
    /// The token and audio-code embedding tables are kept in `table_dtypes` (their rows
    /// convert to the compute dtype as they are gathered).
    pub fn load(
        vb: VarBuilder,
        cfg: &ModelConfig,
        max_positions: usize,
        quant: Quant,
        table_dtypes: [DType; 2],
    ) -> Result<Self> {
        let d = cfg.dim;
        let mm = vb.pp("mm_audio_embeddings");
        let tok = mm.get_with_hints_dtype(
            (cfg.vocab_size, d),
            "tok_embeddings.weight",
            Default::default(),
            table_dtypes[0],
        )?;
        let audio_embeddings = mm.get_unchecked_dtype(
            "audio_codebook_embeddings.embeddings.weight",
            table_dtypes[1],
        )?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            layers.push(TransformerLayer::load(
                vb.pp("layers").pp(i),
                d,
                cfg.n_heads,
                cfg.n_kv_heads,
                cfg.head_dim,
                cfg.hidden_dim,
                cfg.norm_eps,
                quant,
            )?);
        }
        let norm = RmsNorm::load(vb.pp("norm"), d, cfg.norm_eps)?;
        let (cos, sin) = rope_tables(cfg.head_dim, cfg.rope_theta, max_positions, vb.device())?;
        let lay = cfg.layout();
        let a = cfg.audio();
        let mut code_offsets = vec![0u32];
        for k in 1..lay.codes_per_frame {
            code_offsets
                .push((lay.semantic_vocab + (k - 1) * (a.acoustic_codebook_size + 2)) as u32);
        }
        Ok(Self {
            tok_embeddings: Embedding::new(tok, d),
            audio_embeddings,
            layers,
            norm,
            dtype: vb.dtype(),
            cos: cos.to_dtype(vb.dtype())?,
            sin: sin.to_dtype(vb.dtype())?,
            max_positions,
            code_offsets,
            dim: d,
            host: (vb.device().is_cpu() && vb.dtype() == DType::F32).then(Default::default),
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    pub fn new_cache(&self) -> BackboneCache {
        BackboneCache {
            layers: self
                .layers
                .iter()
                .map(|l| match self.host {
                    Some(_) => {
                        let (_, kv, hd) = l.head_shape();
                        LayerCache::host(kv * hd)
                    }
                    None => LayerCache::tensors(),
                })
                .collect(),
            len: 0,
        }
    }

    /// Token embeddings `[n, dim]`.
    pub fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        self.tok_embeddings.forward(ids)?.to_dtype(self.dtype)
    }

    /// The next step's input for a generated frame: the sum of its codes' embeddings, each code
    /// (with its +2 offset) addressed at its codebook's row offset. Returns `[1, dim]`.
    pub fn embed_frame(&self, codes: &[u32]) -> Result<Tensor> {
        let rows: Vec<u32> = codes
            .iter()
            .zip(&self.code_offsets)
            .map(|(c, o)| c.saturating_add(*o))
            .collect();
        let idx = Tensor::new(rows.as_slice(), self.audio_embeddings.device())?;
        self.audio_embeddings
            .index_select(&idx, 0)?
            .to_dtype(DType::F32)?
            .sum_keepdim(0)?
            .to_dtype(self.dtype)
    }

    /// Runs `embeds` `[s, dim]` at the next positions of `cache`; returns normed `[s, dim]`.
    /// Fails without touching the cache if the context limit would be passed.
    pub fn forward(&self, cache: &mut BackboneCache, embeds: &Tensor) -> crate::Result<Tensor> {
        let mut out = self.prefill_batch(&mut [cache], std::slice::from_ref(embeds))?;
        Ok(out.remove(0))
    }

    /// Several prompts in one pass: `embeds[i]` `[s_i, dim]` goes at the next positions of
    /// `caches[i]`. The rows of all of them go through each projection and feed-forward
    /// together (one read of the weights for the lot); attention runs per sequence on its own
    /// cache with its own causal mask. Fails without touching any cache if one would pass the
    /// context limit. Returns each sequence's normed `[s_i, dim]`.
    pub fn prefill_batch(
        &self,
        caches: &mut [&mut BackboneCache],
        embeds: &[Tensor],
    ) -> crate::Result<Vec<Tensor>> {
        if embeds.len() != caches.len() {
            return Err(crate::Error::InvalidInput(format!(
                "{} prompts for {} sequences",
                embeds.len(),
                caches.len()
            )));
        }
        let lens = embeds
            .iter()
            .map(|e| e.dims2().map(|(s, _)| s))
            .collect::<Result<Vec<_>>>()?;
        for (c, &s) in caches.iter().zip(&lens) {
            if c.len + s > self.max_positions {
                return Err(crate::Error::ContextOverflow {
                    needed: c.len + s,
                    limit: self.max_positions,
                });
            }
        }
        let mut parts = Vec::with_capacity(caches.len());
        let mut start = 0;
        for (c, &s) in caches.iter().zip(&lens) {
            let mask = if s > 1 {
                Some(causal_mask(s, c.len, embeds[0].device())?)
            } else {
                None
            };
            let rope = (self.cos.narrow(0, c.len, s)?, self.sin.narrow(0, c.len, s)?);
            parts.push((start, s, rope, mask));
            start += s;
        }
        let mut x = Tensor::cat(embeds, 0)?
            .to_dtype(self.cos.dtype())?
            .unsqueeze(0)?; // [1, S, dim]
        for (l, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, |q, k, v| {
                let mut outs = Vec::with_capacity(parts.len());
                for (cache, (at, s, (cos, sin), mask)) in caches.iter_mut().zip(&parts) {
                    let part = |t: &Tensor| t.narrow(2, *at, *s)?.contiguous();
                    outs.push(attend_cached(
                        &mut cache.layers[l],
                        &part(&q)?,
                        &part(&k)?,
                        &part(&v)?,
                        (cos, sin),
                        mask.as_ref(),
                    )?);
                }
                Tensor::cat(&outs, 1)
            })?;
        }
        for (c, &s) in caches.iter_mut().zip(&lens) {
            c.len += s;
        }
        let x = self.norm.forward(&x)?.squeeze(0)?;
        Ok(parts
            .iter()
            .map(|(at, s, _, _)| x.narrow(0, *at, *s))
            .collect::<Result<Vec<_>>>()?)
    }

    /// One step for several sequences at once: row `b` of `embeds` `[B, dim]` goes at the next
    /// position of `caches[b]`. Projections and feed-forwards run on all rows together (one
    /// pass over the weights for the batch); attention runs per sequence on its own cache.
    /// Fails without touching any cache if one of them is full. Returns normed `[B, dim]`.
    pub fn step_batch(
        &self,
        caches: &mut [&mut BackboneCache],
        embeds: &Tensor,
    ) -> crate::Result<Tensor> {
        let (b, d) = embeds.dims2()?;
        self.check_step(caches, b)?;
        let Some(scratch) = &self.host else {
            return self.step_batch_ops(caches, embeds);
        };
        let mut rows = Vec::new();
        self.step_host(scratch, caches, &mut rows, |x| {
            with_host_f32(embeds, |e| {
                if e.len() != x.len() {
                    candle_core::bail!("step: {} values for {b} rows of {d}", e.len());
                }
                x.copy_from_slice(e);
                Ok(())
            })
        })?;
        Ok(Tensor::from_vec(rows, (b, d), &Device::Cpu)?)
    }

    /// [`Self::step_batch`] with the inputs given as frames: row `b` is the sum of the
    /// embeddings of the `b`-th frame of `codes` (frames of [`Self::codes_per_frame`] codes,
    /// one after the other; see [`Self::embed_frame`]).
    ///
    /// On host buffers the rows of the audio-code table are summed straight into the step's
    /// input, the normed states `[B, dim]` go into `rows`, and the result is `None`: the step
    /// allocates nothing once `rows` has grown. Elsewhere the states come back as a tensor.
    pub fn step_frames<C: StepCaches + ?Sized>(
        &self,
        caches: &mut C,
        codes: &[u32],
        rows: &mut Vec<f32>,
    ) -> crate::Result<Option<Tensor>> {
        let per = self.codes_per_frame();
        if codes.len() != caches.count() * per {
            return Err(crate::Error::InvalidInput(format!(
                "{} codes for {} frames of {per}",
                codes.len(),
                caches.count()
            )));
        }
        self.check_step(caches, codes.len() / per)?;
        let Some(scratch) = &self.host else {
            let embeds = codes
                .chunks_exact(per)
                .map(|f| self.embed_frame(f))
                .collect::<Result<Vec<_>>>()?;
            return self
                .step_batch_ops(caches, &Tensor::cat(&embeds, 0)?)
                .map(Some);
        };
        self.step_host(scratch, caches, rows, |x| {
            for (row, codes) in x.chunks_exact_mut(self.dim).zip(codes.chunks_exact(per)) {
                self.sum_code_rows(codes, row)?;
            }
            Ok(())
        })?;
        Ok(None)
    }

    /// Whether a step runs on host buffers, its states given as host rows
    /// ([`Self::step_frames`]).
    pub fn steps_on_host(&self) -> bool {
        self.host.is_some()
    }

    /// Codes in a frame: the semantic one and the acoustic ones.
    pub fn codes_per_frame(&self) -> usize {
        self.code_offsets.len()
    }

    /// The sum of the audio-code table's rows for `codes` into `row`, read in place from the
    /// table in its stored dtype, in the order `embed_frame` sums them.
    fn sum_code_rows(&self, codes: &[u32], row: &mut [f32]) -> Result<()> {
        use candle_core::{CpuStorage, Storage};
        let (storage, layout) = self.audio_embeddings.storage_and_layout();
        let (Storage::Cpu(table), Some((start, end))) = (&*storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("the audio-code table is not in host memory");
        };
        fn add<T: Copy>(table: &[T], r: usize, row: &mut [f32], f: impl Fn(T) -> f32) -> bool {
            let d = row.len();
            let Some(src) = table.get(r * d..(r + 1) * d) else {
                return false;
            };
            for (y, &x) in row.iter_mut().zip(src) {
                *y += f(x);
            }
            true
        }
        row.fill(0.0);
        for (c, o) in codes.iter().zip(&self.code_offsets) {
            let r = *c as usize + *o as usize;
            let found = match table {
                CpuStorage::F32(t) => add(&t[start..end], r, row, |x| x),
                CpuStorage::BF16(t) => add(&t[start..end], r, row, f32::from),
                CpuStorage::F16(t) => add(&t[start..end], r, row, f32::from),
                _ => {
                    candle_core::bail!("an audio-code table in {:?}", self.audio_embeddings.dtype())
                }
            };
            if !found {
                candle_core::bail!("code {c} (row {r}) is past the audio-code table");
            }
        }
        Ok(())
    }

    /// A step's preconditions: one input per sequence, and room in each cache.
    fn check_step<C: StepCaches + ?Sized>(
        &self,
        caches: &mut C,
        inputs: usize,
    ) -> crate::Result<()> {
        if inputs != caches.count() {
            return Err(crate::Error::InvalidInput(format!(
                "{inputs} inputs for {} sequences",
                caches.count()
            )));
        }
        for row in 0..caches.count() {
            let needed = caches.cache(row).len + 1;
            if needed > self.max_positions {
                return Err(crate::Error::ContextOverflow {
                    needed,
                    limit: self.max_positions,
                });
            }
        }
        Ok(())
    }

    /// [`Self::step_batch`] on host buffers: `input` fills the rows `[B, dim]`, then each layer
    /// runs by [`TransformerLayer::forward_host`], its keys and values appended in place to
    /// the host rows a prefill filled, attention read from them where they lie. The normed
    /// states go into `out`.
    fn step_host<C: StepCaches + ?Sized>(
        &self,
        scratch: &std::sync::Mutex<StepScratch>,
        caches: &mut C,
        out: &mut Vec<f32>,
        input: impl FnOnce(&mut [f32]) -> Result<()>,
    ) -> crate::Result<()> {
        let mut kept = scratch.try_lock();
        let mut fresh = StepScratch::default();
        let StepScratch {
            layer: layer_scratch,
            x,
            scores,
        } = kept.as_deref_mut().unwrap_or(&mut fresh);
        let (b, d) = (caches.count(), self.dim);
        let x = room(x, b * d);
        input(x)?;
        let half = self.cos.dim(1)?;
        with_host_f32(&self.cos, |cos| {
            with_host_f32(&self.sin, |sin| {
                for (l, layer) in self.layers.iter().enumerate() {
                    let attend = |h: Heads| {
                        let (heads, kv, hd) = layer.head_shape();
                        for i in 0..b {
                            let cache = caches.cache(i);
                            let at = cache.len * half;
                            let (cos, sin) = (&cos[at..][..half], &sin[at..][..half]);
                            let q = &mut h.q[i * heads * hd..][..heads * hd];
                            let k = &mut h.k[i * kv * hd..][..kv * hd];
                            rope_rows(q, hd, cos, sin);
                            rope_rows(k, hd, cos, sin);
                            let v = &h.v[i * kv * hd..][..kv * hd];
                            let Some(rows) = cache.layers[l].host_rows() else {
                                candle_core::bail!("a host step given a cache in tensors");
                            };
                            rows.push(k, v)?;
                            let out = &mut h.out[i * heads * hd..][..heads * hd];
                            rows.read(|keys, values, len| {
                                let positions = (len, kv * hd, hd);
                                let shape = (heads, kv, hd);
                                cached_attention(q, (keys, values), shape, positions, scores, out)
                            });
                        }
                        Ok(())
                    };
                    layer.forward_host(x, (b, 1), None, layer_scratch, attend)?;
                }
                Ok(())
            })
        })?;
        for i in 0..b {
            caches.cache(i).len += 1;
        }
        out.clear();
        out.resize(b * d, 0.0);
        norm_into(&self.norm, x, out)?;
        Ok(())
    }

    /// [`Self::step_batch`] by candle's ops (any device and dtype); on the CPU in f32, the
    /// reference the host path is tested against.
    #[doc(hidden)]
    pub fn step_batch_ops<C: StepCaches + ?Sized>(
        &self,
        caches: &mut C,
        embeds: &Tensor,
    ) -> crate::Result<Tensor> {
        let b = caches.count();
        let rope = (0..b)
            .map(|i| {
                let at = caches.cache(i).len;
                Ok((self.cos.narrow(0, at, 1)?, self.sin.narrow(0, at, 1)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut x = embeds.to_dtype(self.cos.dtype())?.unsqueeze(1)?; // [B, 1, dim]
        for (l, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, |q, k, v| {
                let mut outs = Vec::with_capacity(b);
                for (i, (cos, sin)) in rope.iter().enumerate() {
                    outs.push(attend_cached(
                        &mut caches.cache(i).layers[l],
                        &q.narrow(0, i, 1)?,
                        &k.narrow(0, i, 1)?,
                        &v.narrow(0, i, 1)?,
                        (cos, sin),
                        None,
                    )?);
                }
                Tensor::cat(&outs, 0)
            })?;
        }
        for i in 0..b {
            caches.cache(i).len += 1;
        }
        Ok(self.norm.forward(&x)?.squeeze(1)?)
    }

    pub fn dim(&self) -> usize {
        self.dim
    }
}

/// One sequence's attention at its next positions: RoPE on the new queries and keys, the new
/// keys and values appended to its cache, then attention over the whole cache.
fn attend_cached(
    kv: &mut LayerCache,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let q = candle_nn::rotary_emb::rope_i(q, cos, sin)?;
    let k = candle_nn::rotary_emb::rope_i(k, cos, sin)?;
    let (k, v) = kv.append(&k, v)?;
    attention(&q, &k, &v, mask)
}

/// cos/sin `[positions, head_dim/2]` for interleaved RoPE, angles computed in f64.
fn rope_tables(
    head_dim: usize,
    theta: f64,
    positions: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(positions * half);
    let mut sin = Vec::with_capacity(positions * half);
    for p in 0..positions {
        for i in 0..half {
            let freq = theta.powf(-2.0 * i as f64 / head_dim as f64);
            let a = p as f64 * freq;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    Ok((
        Tensor::from_vec(cos, (positions, half), device)?,
        Tensor::from_vec(sin, (positions, half), device)?,
    ))
}
