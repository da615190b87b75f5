//! The acoustic head: a greedy semantic code from the backbone state, then 36 acoustic values
//! from a flow-matching ODE (explicit Euler, classifier-free guidance), quantized by FSQ.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{linear_no_bias, Linear, VarBuilder};

use super::config::{ModelConfig, END_AUDIO, SPECIAL_CODES};
use super::few_rows;
use super::host::{group_attention, norm_into, room, Heads, LayerScratch};
use super::nn::{argmax_in, attention, with_host_f32, Proj, Quant, RmsNorm, TransformerLayer};

/// Intermediate values of one frame's ODE, for parity checks.
#[derive(Debug, Default, Clone)]
pub struct FlowTrace {
    pub t: Vec<f32>,
    pub x_in: Vec<Vec<f32>>,
    pub v_cond: Vec<Vec<f32>>,
    pub v_uncond: Vec<Vec<f32>>,
    pub x_final: Vec<f32>,
}

pub struct AcousticHead {
    input_projection: Linear,
    llm_projection: Proj,
    layers: Vec<TransformerLayer>,
    norm: RmsNorm,
    acoustic_codebook_output: Linear,
    /// Kept in f32 on every device: bf16 ties flip the argmax.
    semantic_codebook_output: Tensor,
    /// `time_projection(temb(i/K))` for each Euler step, `[K, dim]`.
    step_times: Tensor,
    steps: usize,
    semantic_vocab: usize,
    levels: usize,
    n_acoustic: usize,
    /// The width of the backbone states it reads.
    input_dim: usize,
    noise_scale: f32,
    dtype: DType,
    /// On the CPU in f32: the layers on host buffers instead of candle's ops.
    host: Option<HostFlow>,
}

/// What the flow head keeps to run on host buffers (see [`super::host`]).
struct HostFlow {
    /// `input_projection` `[dim, A]`.
    input: Vec<f32>,
    /// `acoustic_codebook_output` `[A, dim]`.
    output: Vec<f32>,
    /// `step_times` `[K, dim]`.
    times: Vec<f32>,
    /// Buffers kept from frame to frame (a second caller at the same time gets fresh ones).
    scratch: std::sync::Mutex<FlowScratch>,
}

#[derive(Default)]
struct FlowScratch {
    layer: LayerScratch,
    /// Projected backbone states `[B, dim]`.
    states: Vec<f32>,
    /// Token rows `[2B, 3, dim]`.
    z: Vec<f32>,
    /// Normed token-0 rows `[2B, dim]`.
    normed: Vec<f32>,
    /// Velocities `[2B, A]`.
    velocity: Vec<f32>,
    /// Semantic logits `[B, rows]`.
    logits: Vec<f32>,
}

/// `y[r][o] = Σ_i x[r][i] · w[o][i]` for `w` `[out, in]` (small projections).
fn dense(w: &[f32], out: usize, x: &[f32], y: &mut [f32]) {
    let inp = w.len() / out.max(1);
    for (x, y) in x.chunks_exact(inp).zip(y.chunks_exact_mut(out)) {
        for (y, w) in y.iter_mut().zip(w.chunks_exact(inp)) {
            *y = x.iter().zip(w).map(|(a, b)| a * b).sum();
        }
    }
}

/// Sinusoidal time embedding, cos half first, `t` in [0, 1].
pub fn time_embedding(t: f32, dim: usize) -> Vec<f32> {
    let half = dim / 2;
    let mut out = vec![0f32; dim];
    for j in 0..half {
        let inv_freq = (-(10000f32.ln()) * j as f32 / half as f32).exp();
        let a = t * inv_freq;
        out[j] = a.cos();
        out[half + j] = a.sin();
    }
    out
}

/// FSQ: clamp to [-1, 1], map to `levels` steps, round half to even, add the special offset.
pub fn fsq_code(x: f32, levels: usize) -> u32 {
    let y = if x.is_nan() { 0.0 } else { x.clamp(-1.0, 1.0) };
    let k = ((y + 1.0) / 2.0 * (levels - 1) as f32).round_ties_even();
    k as u32 + SPECIAL_CODES as u32
}

/// Inverse of [`fsq_code`] without the offset: level `k` to its value in [-1, 1].
pub fn fsq_value(k: u32, levels: usize) -> f32 {
    k as f32 * 2.0 / (levels - 1) as f32 - 1.0
}

impl AcousticHead {
    pub fn load(vb: VarBuilder, cfg: &ModelConfig, quant: Quant) -> Result<Self> {
        let f = cfg.flow();
        let a = cfg.audio();
        let d = f.dim;
        let mut layers = Vec::with_capacity(f.n_layers);
        for i in 0..f.n_layers {
            layers.push(TransformerLayer::load(
                vb.pp("layers").pp(i),
                d,
                f.n_heads,
                f.n_kv_heads,
                f.head_dim,
                f.hidden_dim,
                f.norm_eps,
                quant,
            )?);
        }
        let time_projection = linear_no_bias(d, d, vb.pp("time_projection"))?;
        let steps = f.n_decoding_steps;
        let mut temb = Vec::with_capacity(steps * d);
        for i in 0..steps {
            temb.extend(time_embedding(i as f32 / steps as f32, d));
        }
        let temb = Tensor::from_vec(temb, (steps, d), vb.device())?.to_dtype(vb.dtype())?;
        let step_times = time_projection.forward(&temb)?;
        let input_projection = linear_no_bias(a.n_acoustic_codebook, d, vb.pp("input_projection"))?;
        let acoustic_codebook_output =
            linear_no_bias(d, a.n_acoustic_codebook, vb.pp("acoustic_codebook_output"))?;
        let host = if vb.device().is_cpu() && vb.dtype() == DType::F32 {
            let values = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            Some(HostFlow {
                input: values(input_projection.weight())?,
                output: values(acoustic_codebook_output.weight())?,
                times: values(&step_times)?,
                scratch: Default::default(),
            })
        } else {
            None
        };
        Ok(Self {
            input_projection,
            llm_projection: Proj::load(vb.pp("llm_projection"), f.input_dim, d, quant)?,
            layers,
            norm: RmsNorm::load(vb.pp("norm"), d, f.norm_eps)?,
            acoustic_codebook_output,
            semantic_codebook_output: vb
                .get_unchecked_dtype("semantic_codebook_output.weight", DType::F32)?,
            step_times,
            steps,
            semantic_vocab: a.semantic_codebook_size + SPECIAL_CODES,
            levels: a.acoustic_codebook_size,
            n_acoustic: a.n_acoustic_codebook,
            input_dim: f.input_dim,
            noise_scale: f.sigma_max as f32,
            dtype: vb.dtype(),
            host,
        })
    }

    pub fn n_acoustic(&self) -> usize {
        self.n_acoustic
    }

    pub fn noise_scale(&self) -> f32 {
        self.noise_scale
    }

    pub fn device(&self) -> &Device {
        self.step_times.device()
    }

    /// Unmasked semantic logits (all padded rows) for `h` `[dim]`, in f32.
    pub fn semantic_logits(&self, h: &Tensor) -> Result<Vec<f32>> {
        let mut rows = self.semantic_logits_batch(&h.unsqueeze(0)?)?;
        Ok(rows.pop().unwrap_or_default())
    }

    /// [`Self::semantic_logits`] for each row of `h` `[B, dim]`.
    pub fn semantic_logits_batch(&self, h: &Tensor) -> Result<Vec<Vec<f32>>> {
        let rows = |logits: &[f32], out| logits.chunks_exact(out).map(<[f32]>::to_vec).collect();
        if let Some(rows) = self.with_host_logits(h, rows)? {
            return Ok(rows);
        }
        h.to_dtype(DType::F32)?
            .matmul(&self.semantic_codebook_output.t()?)?
            .to_vec2()
    }

    /// [`Self::semantic_code`] for each row of `h` `[B, dim]`.
    pub fn semantic_codes(&self, h: &Tensor) -> Result<Vec<u32>> {
        let codes = |logits: &[f32], out| {
            let codes = logits.chunks_exact(out).map(|l| self.semantic_code(l));
            codes.collect()
        };
        if let Some(codes) = self.with_host_logits(h, codes)? {
            return Ok(codes);
        }
        let logits = self.semantic_logits_batch(h)?;
        Ok(logits.iter().map(|l| self.semantic_code(l)).collect())
    }

    /// [`Self::semantic_codes`] of host rows `states` `[B, dim]`, appended to `codes`: on
    /// host buffers nothing is allocated once the buffers have grown.
    pub fn semantic_codes_of_rows(&self, states: &[f32], codes: &mut Vec<u32>) -> Result<()> {
        let d = self.input_dim;
        let b = states.len() / d.max(1);
        if states.len() != b * d {
            candle_core::bail!("semantic head: {} values for rows of {d}", states.len());
        }
        let append = |logits: &[f32], out| {
            codes.extend(logits.chunks_exact(out).map(|l| self.semantic_code(l)));
        };
        if self.host_logits(states, b, append)?.is_some() {
            return Ok(());
        }
        let h = Tensor::from_slice(states, (b, d), self.device())?;
        codes.extend(self.semantic_codes(&h)?);
        Ok(())
    }

    /// On host buffers with few rows, `f` on the logits of `h` `[B, dim]` (see
    /// [`Self::host_logits`]); `None` elsewhere.
    fn with_host_logits<T>(
        &self,
        h: &Tensor,
        f: impl FnOnce(&[f32], usize) -> T,
    ) -> Result<Option<T>> {
        let b = h.dim(0)?;
        if !self.takes_host_logits(b) {
            return Ok(None);
        }
        with_host_f32(h, |h| self.host_logits(h, b, f))
    }

    /// Whether [`Self::host_logits`] runs for `b` rows.
    fn takes_host_logits(&self, b: usize) -> bool {
        self.host.is_some() && b <= 16 && few_rows::available()
    }

    /// On host buffers with few rows, `f` on the logits of the rows `h` `[B, dim]` (`[B, out]`,
    /// by the few-row kernel without candle's packing, into a buffer kept from frame to frame)
    /// and their width `out`; `None` elsewhere.
    fn host_logits<T>(
        &self,
        h: &[f32],
        b: usize,
        f: impl FnOnce(&[f32], usize) -> T,
    ) -> Result<Option<T>> {
        let w = &self.semantic_codebook_output;
        let Some(host) = self.host.as_ref().filter(|_| self.takes_host_logits(b)) else {
            return Ok(None);
        };
        let mut kept = host.scratch.try_lock();
        let mut fresh = FlowScratch::default();
        let logits = &mut kept.as_deref_mut().unwrap_or(&mut fresh).logits;
        let out = w.dim(0)?;
        let logits = room(logits, b * out);
        with_host_f32(w, |w| few_rows::matmul_into(w, out, h, b, logits))?;
        Ok(Some(f(logits, out)))
    }

    /// The width of the states the head reads (the backbone's).
    pub fn input_dim(&self) -> usize {
        self.input_dim
    }

    /// Greedy semantic code (with the +2 offset): `[EMPTY_AUDIO]` and padding rows are masked,
    /// `[END_AUDIO]` (1) is allowed.
    pub fn semantic_code(&self, logits: &[f32]) -> u32 {
        argmax_in(logits, 1..self.semantic_vocab.min(logits.len())).unwrap_or(END_AUDIO as usize)
            as u32
    }

    /// Velocities for a batch of ODE states `x` `[n, A]` at step `i`, conditioned on the
    /// projected backbone states `c` `[n, dim]`; returns `[n, A]` in f32.
    fn velocity(&self, x: &Tensor, step: usize, c: &Tensor) -> Result<Tensor> {
        let n = x.dim(0)?;
        let d = c.dim(1)?;
        let x_tok = self.input_projection.forward(&x.to_dtype(self.dtype)?)?;
        let t_tok = self.step_times.narrow(0, step, 1)?.broadcast_as((n, d))?;
        // Three tokens per row: noisy acoustic vector, time, backbone state.
        let mut z = Tensor::stack(&[&x_tok, &t_tok.contiguous()?, c], 1)?;
        // Bidirectional over the three tokens, no positions. Only token 0 is read at the end,
        // so the last layer computes that row alone.
        let attend = |q: Tensor, k: Tensor, v: Tensor| attention(&q, &k, &v, None);
        let Some((last, layers)) = self.layers.split_last() else {
            return Err(candle_core::Error::Msg(
                "the flow head has no layers".into(),
            ));
        };
        for layer in layers {
            z = layer.forward(&z, attend)?;
        }
        let tok0 = self
            .norm
            .forward(&last.forward_token(&z, 0, attend)?.squeeze(1)?)?;
        self.acoustic_codebook_output
            .forward(&tok0)?
            .to_dtype(DType::F32)
    }

    /// Integrates the ODE from `noise` for one frame and returns the acoustic values before
    /// quantization. Conditional and unconditional (zero state) rows run as one batch of two.
    pub fn integrate(
        &self,
        h: &Tensor,
        noise: &[f32],
        cfg_alpha: f32,
        trace: Option<&mut FlowTrace>,
    ) -> Result<Vec<f32>> {
        let mut x = self.integrate_batch(&h.unsqueeze(0)?, &[noise.to_vec()], cfg_alpha, trace)?;
        Ok(x.pop().unwrap_or_default())
    }

    /// [`Self::integrate`] for several frames at once (one per row of `h` `[B, dim]`): every
    /// Euler step is one pass of `2B` rows (the conditional rows, then the unconditional
    /// ones), so the weights are read once for the whole batch. `trace` records row 0.
    pub fn integrate_batch(
        &self,
        h: &Tensor,
        noise: &[Vec<f32>],
        cfg_alpha: f32,
        trace: Option<&mut FlowTrace>,
    ) -> Result<Vec<Vec<f32>>> {
        let b = h.dim(0)?;
        self.check_noise(b, noise.iter().map(Vec::len))?;
        let Some(host) = &self.host else {
            return self.integrate_batch_ops(h, noise, cfg_alpha, trace);
        };
        let mut x = Vec::with_capacity(b * self.n_acoustic);
        with_host_f32(h, |h| {
            self.integrate_host(host, h, &noise.concat(), cfg_alpha, trace, &mut x)
        })?;
        Ok(x.chunks_exact(self.n_acoustic)
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// [`Self::integrate_batch`] of host rows `states` `[B, dim]` and `noise` `[B, A]` (one
    /// row of each per frame), the values `[B, A]` into `x`: on host buffers nothing is
    /// allocated once the buffers have grown.
    pub fn integrate_rows(
        &self,
        states: &[f32],
        noise: &[f32],
        cfg_alpha: f32,
        trace: Option<&mut FlowTrace>,
        x: &mut Vec<f32>,
    ) -> Result<()> {
        let (d, a) = (self.input_dim, self.n_acoustic);
        let b = states.len() / d.max(1);
        if states.len() != b * d {
            candle_core::bail!("flow batch: {} values for rows of {d}", states.len());
        }
        self.check_noise(b, noise.chunks(a.max(1)).map(<[f32]>::len))?;
        if let Some(host) = &self.host {
            return self.integrate_host(host, states, noise, cfg_alpha, trace, x);
        }
        let h = Tensor::from_slice(states, (b, d), self.device())?;
        let rows: Vec<Vec<f32>> = noise.chunks(a.max(1)).map(<[f32]>::to_vec).collect();
        x.clear();
        for row in self.integrate_batch_ops(&h, &rows, cfg_alpha, trace)? {
            x.extend(row);
        }
        Ok(())
    }

    /// One noise vector of `n_acoustic` values for each of `b` states.
    fn check_noise(&self, b: usize, lens: impl ExactSizeIterator<Item = usize>) -> Result<()> {
        let n = lens.len();
        let mut lens = lens;
        if n != b || lens.any(|l| l != self.n_acoustic) {
            candle_core::bail!(
                "flow batch: {b} states but {n} noise vectors of {} values",
                self.n_acoustic
            );
        }
        Ok(())
    }

    /// [`Self::integrate_batch`] on host buffers: the same steps, each layer by
    /// [`TransformerLayer::forward_host`], over host rows `h` `[B, dim]` and `noise` `[B, A]`;
    /// the final values `[B, A]` go into `out`.
    fn integrate_host(
        &self,
        host: &HostFlow,
        h: &[f32],
        noise: &[f32],
        cfg_alpha: f32,
        mut trace: Option<&mut FlowTrace>,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let mut kept = host.scratch.try_lock();
        let mut fresh = FlowScratch::default();
        let s = kept.as_deref_mut().unwrap_or(&mut fresh);
        let a = self.n_acoustic;
        let b = noise.len() / a;
        let d = self.llm_projection.out_features()?;
        let n = 2 * b;
        let Some((last, layers)) = self.layers.split_last() else {
            candle_core::bail!("the flow head has no layers");
        };
        let states = room(&mut s.states, b * d);
        self.llm_projection.forward_host(h, b, states)?;
        out.clear();
        out.extend_from_slice(noise);
        let x = &mut out[..];
        // The coefficients in f32, as the reference computes them.
        let dt = 1.0 / self.steps as f32;
        let (alpha, beta) = (cfg_alpha, 1.0 - cfg_alpha);
        for i in 0..self.steps {
            // Three tokens per row: noisy acoustic vector, time, backbone state (zero for the
            // unconditional rows b..2b).
            let z = room(&mut s.z, n * 3 * d);
            let (cond, uncond) = z.split_at_mut(b * 3 * d);
            for (r, (tokens, twin)) in cond
                .chunks_exact_mut(3 * d)
                .zip(uncond.chunks_exact_mut(3 * d))
                .enumerate()
            {
                let (x_tok, rest) = tokens.split_at_mut(d);
                let (t_tok, c_tok) = rest.split_at_mut(d);
                dense(&host.input, d, &x[r * a..][..a], x_tok);
                t_tok.copy_from_slice(&host.times[i * d..][..d]);
                c_tok.copy_from_slice(&states[r * d..][..d]);
                // The unconditional twin: the same two tokens, projected once, and no state.
                twin[..2 * d].copy_from_slice(&tokens[..2 * d]);
                twin[2 * d..].fill(0.0);
            }
            let within = |token: Option<usize>| {
                move |h: Heads| {
                    let shape = last.head_shape();
                    group_attention((h.q, h.k, h.v), shape, (n, 3, token), h.out)
                }
            };
            for layer in layers {
                layer.forward_host(z, (n, 3), None, &mut s.layer, within(None))?;
            }
            last.forward_host(z, (n, 3), Some(0), &mut s.layer, within(Some(0)))?;
            let normed = room(&mut s.normed, n * d);
            norm_into(&self.norm, &z[..n * d], normed)?;
            let v = room(&mut s.velocity, n * a);
            dense(&host.output, a, normed, v);
            if let Some(t) = trace.as_deref_mut() {
                t.t.push(i as f32 / self.steps as f32);
                t.x_in.push(x[..a].to_vec());
                t.v_cond.push(v[..a].to_vec());
                t.v_uncond.push(v[b * a..][..a].to_vec());
            }
            // x += dt * (alpha * v_c + (1 - alpha) * v_u), in that order, in f32.
            let (v_c, v_u) = v.split_at(b * a);
            for ((x, &c), &u) in x.iter_mut().zip(v_c).zip(v_u) {
                *x += (c * alpha + u * beta) * dt;
            }
        }
        if let Some(t) = trace {
            t.x_final = x[..a.min(x.len())].to_vec();
        }
        Ok(())
    }

    /// [`Self::integrate_batch`] by candle's ops (any device and dtype); on the CPU in f32,
    /// the reference the host path is tested against.
    #[doc(hidden)]
    pub fn integrate_batch_ops(
        &self,
        h: &Tensor,
        noise: &[Vec<f32>],
        cfg_alpha: f32,
        mut trace: Option<&mut FlowTrace>,
    ) -> Result<Vec<Vec<f32>>> {
        let dev = self.device();
        let b = h.dim(0)?;
        let c = self.llm_projection.forward(&h.to_dtype(self.dtype)?)?;
        let c = Tensor::cat(&[&c, &c.zeros_like()?], 0)?;
        let a = self.n_acoustic;
        // The ODE state stays on the device in f32: one copy back per frame, not per step.
        let mut x = Tensor::from_vec(noise.concat(), (b, a), dev)?;
        // The coefficients in f32, as the reference computes them (candle takes f64).
        let dt = (1.0 / self.steps as f32) as f64;
        let (alpha, beta) = (cfg_alpha as f64, (1.0 - cfg_alpha) as f64);
        for i in 0..self.steps {
            let v = self.velocity(&x.repeat((2, 1))?, i, &c)?;
            let (v_c, v_u) = (v.narrow(0, 0, b)?, v.narrow(0, b, b)?);
            if let Some(t) = trace.as_deref_mut() {
                t.t.push(i as f32 / self.steps as f32);
                t.x_in.push(x.get(0)?.to_vec1()?);
                t.v_cond.push(v_c.get(0)?.to_vec1()?);
                t.v_uncond.push(v_u.get(0)?.to_vec1()?);
            }
            // x += dt * (alpha * v_c + (1 - alpha) * v_u), in that order, in f32.
            let guided = (v_c.affine(alpha, 0.0)? + v_u.affine(beta, 0.0)?)?;
            x = (x + guided.affine(dt, 0.0)?)?;
        }
        let x = x.to_vec2::<f32>()?;
        if let Some(t) = trace {
            t.x_final = x[0].clone();
        }
        Ok(x)
    }

    /// Acoustic codes (with the +2 offset) for integrated values.
    pub fn quantize(&self, x: &[f32]) -> Vec<u32> {
        let mut codes = Vec::with_capacity(x.len());
        self.quantize_onto(x, &mut codes);
        codes
    }

    /// [`Self::quantize`] appended to `codes`.
    pub fn quantize_onto(&self, x: &[f32], codes: &mut impl Extend<u32>) {
        codes.extend(x.iter().map(|&v| fsq_code(v, self.levels)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fsq_levels_round_trip() {
        for k in 0..21u32 {
            assert_eq!(fsq_code(fsq_value(k, 21), 21), k + 2);
        }
        assert_eq!(fsq_code(5.0, 21), 22);
        assert_eq!(fsq_code(-5.0, 21), 2);
        // Exact halves (5 levels: -0.75 -> 0.5, -0.25 -> 1.5, 0.25 -> 2.5) round to even.
        assert_eq!(fsq_code(-0.75, 5), 2);
        assert_eq!(fsq_code(-0.25, 5), 4);
        assert_eq!(fsq_code(0.25, 5), 4);
    }

    #[test]
    fn time_embedding_at_zero_is_cos_ones_then_zeros() {
        let e = time_embedding(0.0, 8);
        assert_eq!(e, vec![1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
    }
}
