//! Int8 weights for `--quant q8` on CPUs whose only byte dot product is AVX2's: the blocks and
//! rounding of ggml's Q8_0 (32 values, one f16 scale each), packed so that one pass over a
//! strip of eight outputs serves up to six activation rows from registers.
//!
//! candle's own Q8_0 kernel has a packed VNNI path, but on a CPU without VNNI it multiplies one
//! activation row at a time: the flow head's six rows cost six times one row (14 ms against
//! 2.7 ms here for a [9216, 3072] matrix on a 2-core Zen 2). The sums are Q8_0's sums: each
//! block's integer dot product is exact, only the order of the f32 additions differs.

use candle_core::Result;
use half::f16;
use rayon::prelude::*;

/// Outputs per strip: one 256-bit register of i32 lanes.
pub const STRIP: usize = 8;
/// Values per block, each block with its own scale (as Q8_0).
pub const BLOCK: usize = 32;
/// Activation rows per pass over a strip's weights: each row holds one register of sums.
const ROWS_PER_PASS: usize = 6;

/// Which int8 kernel `--quant q8` uses on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Int8Kernel {
    /// This module's, with AVX2 (x86-64 without VNNI).
    Strips,
    /// candle's Q8_0 (its packed VNNI kernels, or other architectures).
    Candle,
}

impl Int8Kernel {
    /// Decided once per process from the CPU's features; `VOXTRALD_INT8=strips|candle`
    /// overrides it (for measuring one against the other).
    pub fn for_this_cpu() -> Self {
        static KERNEL: std::sync::OnceLock<Int8Kernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            let choice = match std::env::var("VOXTRALD_INT8").as_deref() {
                Ok("strips") if avx2() => Self::Strips,
                Ok("candle") => Self::Candle,
                _ if avx2() && !vnni() => Self::Strips,
                _ => Self::Candle,
            };
            tracing::debug!(kernel = ?choice, "int8 kernel");
            choice
        })
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn vnni() -> bool {
    (is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"))
        || is_x86_feature_detected!("avxvnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn vnni() -> bool {
    false
}

/// A weight matrix `[out, inp]` in strips of eight outputs.
pub struct Q8Weights {
    out: usize,
    inp: usize,
    blocks: usize,
    /// Per strip, block and group of 4 inputs: 8 outputs x 4 bytes (32 bytes).
    quants: Vec<i8>,
    /// Per strip and block: the 8 outputs' scales (f16 bits).
    scales: Vec<u16>,
}

impl std::fmt::Debug for Q8Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Weights[{}, {}]", self.out, self.inp)
    }
}

/// Q8_0's rounding: scale `max|x| / 127`, values `round(x / scale)` (ties away from zero).
fn quantize_block(xs: &[f32], q: &mut [i8]) -> f32 {
    let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (y, &x) in q.iter_mut().zip(xs) {
        *y = (x * id).round() as i8;
    }
    d
}

impl Q8Weights {
    /// `w` is `[out, inp]`, row-major; `inp` is a multiple of [`BLOCK`]. Strips are packed in
    /// parallel.
    pub fn quantize(w: &[f32], out: usize, inp: usize) -> Result<Self> {
        if !inp.is_multiple_of(BLOCK) || w.len() != out * inp {
            candle_core::bail!(
                "int8 weights: {} values for [{out}, {inp}] (inputs must be a multiple of {BLOCK})",
                w.len()
            );
        }
        let blocks = inp / BLOCK;
        let strips = out.div_ceil(STRIP);
        let mut quants = vec![0i8; strips * blocks * STRIP * BLOCK];
        let mut scales = vec![0u16; strips * blocks * STRIP];
        quants
            .par_chunks_mut(blocks * STRIP * BLOCK)
            .zip(scales.par_chunks_mut(blocks * STRIP))
            .enumerate()
            .for_each(|(s, (quants, scales))| {
                let mut q = [0i8; BLOCK];
                for lane in 0..STRIP.min(out - s * STRIP) {
                    let row = &w[(s * STRIP + lane) * inp..][..inp];
                    for (b, xs) in row.chunks_exact(BLOCK).enumerate() {
                        let d = quantize_block(xs, &mut q);
                        let tile = &mut quants[b * STRIP * BLOCK..][..STRIP * BLOCK];
                        for (k, &v) in q.iter().enumerate() {
                            tile[(k / 4) * STRIP * 4 + lane * 4 + k % 4] = v;
                        }
                        scales[b * STRIP + lane] = f16::from_f32(d).to_bits();
                    }
                }
            });
        Ok(Self {
            out,
            inp,
            blocks,
            quants,
            scales,
        })
    }

    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    fn strips(&self) -> usize {
        self.out.div_ceil(STRIP)
    }

    /// `x` `[rows, inp]` (row-major) times the weights' transpose: `[rows, out]`.
    pub fn matmul(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.matmul_with(x, rows, avx2())
    }

    /// `vector`: the AVX2 kernel (the caller has checked the CPU has it), else plain code.
    fn matmul_with(&self, x: &[f32], rows: usize, vector: bool) -> Result<Vec<f32>> {
        if x.len() != rows * self.inp {
            candle_core::bail!(
                "int8 matmul: {} values for {rows} rows of {}",
                x.len(),
                self.inp
            );
        }
        let vector = vector && avx2();
        let acts = Activations::quantize(x, rows, self.inp);
        let width = rows * STRIP;
        let mut by_strip = vec![0f32; self.strips() * width];
        by_strip
            .par_chunks_mut(width)
            .enumerate()
            .with_min_len(16)
            .for_each(|(s, dst)| {
                #[cfg(target_arch = "x86_64")]
                if vector {
                    // SAFETY: the CPU has AVX2, FMA and F16C (checked before the loop).
                    return unsafe { self.strip_avx2(s, &acts, dst) };
                }
                let _ = vector;
                self.strip_plain(s, &acts, dst)
            });
        let mut out = vec![0f32; rows * self.out];
        for (s, strip) in by_strip.chunks_exact(width).enumerate() {
            let n = STRIP.min(self.out - s * STRIP);
            for (r, lanes) in strip.chunks_exact(STRIP).enumerate() {
                out[r * self.out + s * STRIP..][..n].copy_from_slice(&lanes[..n]);
            }
        }
        Ok(out)
    }

    /// The same sums in plain code: the fallback, and what the vector kernel is tested against.
    fn strip_plain(&self, s: usize, a: &Activations, dst: &mut [f32]) {
        let tiles = &self.quants[s * self.blocks * STRIP * BLOCK..][..self.blocks * STRIP * BLOCK];
        let scales = &self.scales[s * self.blocks * STRIP..][..self.blocks * STRIP];
        for (r, lanes) in dst.chunks_exact_mut(STRIP).enumerate() {
            let mut acc = [0f32; STRIP];
            for b in 0..self.blocks {
                let tile = &tiles[b * STRIP * BLOCK..][..STRIP * BLOCK];
                let xq = &a.quants[r * self.inp + b * BLOCK..][..BLOCK];
                let mut sums = [0i32; STRIP];
                for (k, &x) in xq.iter().enumerate() {
                    for (lane, sum) in sums.iter_mut().enumerate() {
                        *sum += x as i32 * tile[(k / 4) * STRIP * 4 + lane * 4 + k % 4] as i32;
                    }
                }
                let dx = a.scales[r * self.blocks + b];
                for (lane, acc) in acc.iter_mut().enumerate() {
                    let dw = f16::from_bits(scales[b * STRIP + lane]).to_f32();
                    *acc += sums[lane] as f32 * (dw * dx);
                }
            }
            lanes.copy_from_slice(&acc);
        }
    }

    /// One strip for every row, [`ROWS_PER_PASS`] rows per pass over its weights.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn strip_avx2(&self, s: usize, a: &Activations, dst: &mut [f32]) {
        let mut r = 0;
        while r < a.rows {
            let n = ROWS_PER_PASS.min(a.rows - r);
            match n {
                1 => self.rows_avx2::<1>(s, a, r, dst),
                2 => self.rows_avx2::<2>(s, a, r, dst),
                3 => self.rows_avx2::<3>(s, a, r, dst),
                4 => self.rows_avx2::<4>(s, a, r, dst),
                5 => self.rows_avx2::<5>(s, a, r, dst),
                _ => self.rows_avx2::<ROWS_PER_PASS>(s, a, r, dst),
            }
            r += n;
        }
    }

    /// Rows `r0..r0 + R` of strip `s`. Per group of 4 inputs, each row's 4 activation bytes
    /// are broadcast; `maddubs` takes their magnitudes (unsigned) against the weights with the
    /// activations' signs applied, so no pair sum can exceed 2 * 127 * 127 in i16.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn rows_avx2<const R: usize>(
        &self,
        s: usize,
        a: &Activations,
        r0: usize,
        dst: &mut [f32],
    ) {
        use std::arch::x86_64::*;
        debug_assert!(r0 + R <= a.rows && dst.len() >= (r0 + R) * STRIP);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        // SAFETY (pointer arithmetic below): a strip holds `blocks` tiles of STRIP * BLOCK
        // bytes and `blocks * STRIP` scales; each activation row holds `inp` bytes.
        let tiles = self.quants.as_ptr().add(s * self.blocks * STRIP * BLOCK);
        let scales = self.scales.as_ptr().add(s * self.blocks * STRIP);
        let signed: [*const i32; R] =
            std::array::from_fn(|i| a.quants.as_ptr().add((r0 + i) * self.inp) as *const i32);
        let magnitude: [*const i32; R] =
            std::array::from_fn(|i| a.magnitudes.as_ptr().add((r0 + i) * self.inp) as *const i32);
        for b in 0..self.blocks {
            let mut sums = [_mm256_setzero_si256(); R];
            for g in 0..BLOCK / 4 {
                let at = b * BLOCK / 4 + g;
                let w = _mm256_loadu_si256(tiles.add(at * STRIP * 4) as *const __m256i);
                for i in 0..R {
                    let xs = _mm256_set1_epi32(signed[i].add(at).read_unaligned());
                    let xm = _mm256_set1_epi32(magnitude[i].add(at).read_unaligned());
                    let p = _mm256_maddubs_epi16(xm, _mm256_sign_epi8(w, xs));
                    sums[i] = _mm256_add_epi32(sums[i], _mm256_madd_epi16(p, ones));
                }
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(scales.add(b * STRIP) as *const __m128i));
            for i in 0..R {
                let d = _mm256_mul_ps(dw, _mm256_set1_ps(a.scales[(r0 + i) * self.blocks + b]));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[i]), d, acc[i]);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(dst.as_mut_ptr().add((r0 + i) * STRIP), *acc);
        }
    }
}

/// Activation rows quantized per block as Q8_0 quantizes them, with their magnitudes for the
/// unsigned side of the byte products.
struct Activations {
    rows: usize,
    quants: Vec<i8>,
    magnitudes: Vec<u8>,
    /// Per row and block, the scale as Q8_0 stores it (through f16).
    scales: Vec<f32>,
}

impl Activations {
    fn quantize(x: &[f32], rows: usize, inp: usize) -> Self {
        let mut quants = vec![0i8; rows * inp];
        let mut scales = vec![0f32; rows * inp / BLOCK];
        for ((xs, q), d) in x
            .chunks_exact(BLOCK)
            .zip(quants.chunks_exact_mut(BLOCK))
            .zip(&mut scales)
        {
            *d = f16::from_f32(quantize_block(xs, q)).to_f32();
        }
        let magnitudes = quants.iter().map(|q| q.unsigned_abs()).collect();
        Self {
            rows,
            quants,
            magnitudes,
            scales,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Both code paths against candle's Q8_0 on the same weights and activations: the same
    /// integer sums, so only the order of f32 additions may differ. Shapes cover partial
    /// strips, every row count of a pass and more than one pass.
    #[test]
    fn strips_compute_candles_q8_0_sums() {
        for (out, inp) in [(8, 32), (13, 64), (40, 96), (67, 256)] {
            let w = random(out * inp, out as u64);
            let wt = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).unwrap();
            let reference =
                QMatMul::from_qtensor(QTensor::quantize(&wt, GgmlDType::Q8_0).unwrap()).unwrap();
            let mine = Q8Weights::quantize(&w, out, inp).unwrap();
            for rows in [1, 2, 5, 6, 7, 13] {
                let x = random(rows * inp, (rows * 31 + inp) as u64);
                let xt = Tensor::from_vec(x.clone(), (rows, inp), &Device::Cpu).unwrap();
                let want: Vec<f32> = reference
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                // The plain code everywhere, the AVX2 kernel where the CPU has it.
                for vector in [false, avx2()] {
                    let got = mine.matmul_with(&x, rows, vector).unwrap();
                    assert_eq!(got.len(), want.len());
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "vector {vector}: [{out}, {inp}] x {rows} rows, output {i}: {g} against {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(Q8Weights::quantize(&[0.0; 40], 1, 40).is_err());
        let w = Q8Weights::quantize(&[0.5; 64], 2, 32).unwrap();
        assert!(w.matmul(&[0.0; 31], 1).is_err());
        assert_eq!(w.matmul(&[1.0; 32], 1).unwrap().len(), 2);
    }
}
