//! Int8 weight-only projections for the CPU with AVX-512 VNNI, where candle's Q8_0 kernel
//! (AVX2 `maddubs`, twelve instructions per 64 weights and row) leaves the flow head
//! compute-bound at about half the memory bandwidth. The numbers are those of ggml's Q8_0:
//! weights and activations both in blocks of 32 with one scale each, round to nearest.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes, so the weights are stored offset by 128
//! (`w + 128`, fixed at load) and the activations stay signed; the offset's contribution,
//! `128 · Σ a` per block, is known once the activations are quantized and is taken off with
//! the block scales at the end.

use candle_core::{DType, Device, Result, Tensor};

/// Values per scale, as in ggml's Q8_0.
pub const BLOCK: usize = 32;
/// A tile of the kernel: activation rows by weight columns, their sums kept in registers.
const ROWS: usize = 4;
const COLS: usize = 4;

/// Whether this CPU runs the kernel; elsewhere candle's Q8_0 path is used.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A `[out, in]` weight matrix in int8 blocks.
#[derive(Debug)]
pub struct Q8Matrix {
    out: usize,
    inp: usize,
    /// `round(w / d) + 128`, row-major `[out, in]`.
    q: Vec<u8>,
    /// One scale per block of 32, `[out, in / 32]`.
    d: Vec<f32>,
    /// Run the VNNI kernel (else the scalar sums).
    simd: bool,
}

/// Activations quantized for one matmul.
struct Q8Rows {
    rows: usize,
    q: Vec<i8>,
    /// Each block's scale, repeated over the eight lanes its products land in: `[rows, in/4]`.
    d_lanes: Vec<f32>,
    /// `128 · d · Σ q` per block: what the weights' offset adds, `[rows, in / 32]`.
    offset: Vec<f32>,
}

/// Rounds a block to int8 with scale `max|x| / 127`.
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    d
}

impl Q8Matrix {
    /// `in` must be a multiple of 64 (two blocks per 512-bit load).
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let (out, inp) = w.dims2()?;
        if !inp.is_multiple_of(2 * BLOCK) {
            candle_core::bail!("q8: input width {inp} is not a multiple of {}", 2 * BLOCK);
        }
        let w = w.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let w = w.flatten_all()?.to_vec1::<f32>()?;
        let mut q = vec![0u8; out * inp];
        let mut d = vec![0f32; out * inp / BLOCK];
        let mut tmp = [0i8; BLOCK];
        for (b, (x, qb)) in w
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            d[b] = quantize_block(x, &mut tmp);
            for (o, &v) in qb.iter_mut().zip(&tmp) {
                *o = (v as i16 + 128) as u8;
            }
        }
        Ok(Self {
            out,
            inp,
            q,
            d,
            simd: supported(),
        })
    }

    pub fn out_dim(&self) -> usize {
        self.out
    }

    fn quantize_rows(&self, x: &[f32], rows: usize) -> Q8Rows {
        let nb = self.inp / BLOCK;
        let mut q = vec![0i8; rows * self.inp];
        let mut d_lanes = vec![0f32; rows * self.inp / 4];
        let mut offset = vec![0f32; rows * nb];
        for (b, (xb, qb)) in x
            .chunks_exact(BLOCK)
            .zip(q.chunks_exact_mut(BLOCK))
            .enumerate()
        {
            let d = quantize_block(xb, qb);
            d_lanes[b * 8..b * 8 + 8].fill(d);
            let sum: i32 = qb.iter().map(|&v| v as i32).sum();
            offset[b] = 128.0 * d * sum as f32;
        }
        Q8Rows {
            rows,
            q,
            d_lanes,
            offset,
        }
    }

    /// `x · Wᵀ` for `x` `[..., in]` (f32, CPU).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows = x.elem_count() / self.inp;
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let a = self.quantize_rows(&xs, rows);
        let mut y = vec![0f32; rows * self.out];
        let dst = SharedOut(y.as_mut_ptr());
        let cols = self.out;
        candle_core::utils::barrier_pool().execute_chunked(cols, |range| {
            // SAFETY: each column range is handed to exactly one worker, and every write
            // below goes to one of its own columns.
            unsafe { self.columns(&a, range, &dst) }
        });
        let mut shape = dims;
        *shape.last_mut().expect("at least one dim") = self.out;
        Tensor::from_vec(y, shape, x.device())?.to_dtype(x.dtype())
    }

    /// Fills `dst[r, c]` for every row and the columns in `cols`: tiles of up to `ROWS`
    /// rows by `COLS` columns, so each weight load serves several rows and each activation
    /// load several columns.
    unsafe fn columns(&self, a: &Q8Rows, cols: std::ops::Range<usize>, dst: &SharedOut) {
        let mut c0 = cols.start;
        while c0 < cols.end {
            let nc = (cols.end - c0).min(COLS);
            let mut r0 = 0;
            while r0 < a.rows {
                let nr = (a.rows - r0).min(ROWS);
                let mut acc = [[0f32; COLS]; ROWS];
                #[cfg(target_arch = "x86_64")]
                if self.simd {
                    // SAFETY: `simd` is set only where the CPU has the kernel's features.
                    unsafe { vnni::tile(self, a, r0, nr, c0, nc, &mut acc) };
                } else {
                    self.tile_scalar(a, r0, nr, c0, nc, &mut acc);
                }
                #[cfg(not(target_arch = "x86_64"))]
                self.tile_scalar(a, r0, nr, c0, nc, &mut acc);
                for (i, row) in acc[..nr].iter().enumerate() {
                    for (j, v) in row[..nc].iter().enumerate() {
                        unsafe { *dst.0.add((r0 + i) * self.out + c0 + j) = *v };
                    }
                }
                r0 += nr;
            }
            c0 += nc;
        }
    }

    /// The same sums without SIMD, for tests and other CPUs.
    fn tile_scalar(
        &self,
        a: &Q8Rows,
        r0: usize,
        nr: usize,
        c0: usize,
        nc: usize,
        acc: &mut [[f32; COLS]; ROWS],
    ) {
        let nb = self.inp / BLOCK;
        for (i, acc) in acc[..nr].iter_mut().enumerate() {
            let r = r0 + i;
            for (j, acc) in acc[..nc].iter_mut().enumerate() {
                let c = c0 + j;
                let mut total = 0f32;
                for b in 0..nb {
                    let w = &self.q[c * self.inp + b * BLOCK..][..BLOCK];
                    let x = &a.q[r * self.inp + b * BLOCK..][..BLOCK];
                    let dot: i32 = w.iter().zip(x).map(|(&w, &x)| w as i32 * x as i32).sum();
                    let (da, off) = (a.d_lanes[(r * nb + b) * 8], a.offset[r * nb + b]);
                    total += self.d[c * nb + b] * (da * dot as f32 - off);
                }
                *acc = total;
            }
        }
    }
}

/// The output buffer, written by the pool's workers at disjoint indices.
struct SharedOut(*mut f32);
unsafe impl Sync for SharedOut {}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{Q8Matrix, Q8Rows, BLOCK, COLS, ROWS};
    use std::arch::x86_64::*;

    /// Rows `r0 .. r0 + nr` of the activations against columns `c0 .. c0 + nc` of `W`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VNNI (see [`super::supported`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) unsafe fn tile(
        m: &Q8Matrix,
        a: &Q8Rows,
        r0: usize,
        nr: usize,
        c0: usize,
        nc: usize,
        out: &mut [[f32; COLS]; ROWS],
    ) {
        macro_rules! go {
            ($r:literal, $c:literal) => {
                tile_fixed::<$r, $c>(m, a, r0, c0, out)
            };
        }
        match (nr, nc) {
            (4, 4) => go!(4, 4),
            (4, 3) => go!(4, 3),
            (4, 2) => go!(4, 2),
            (4, 1) => go!(4, 1),
            (3, 4) => go!(3, 4),
            (3, 3) => go!(3, 3),
            (3, 2) => go!(3, 2),
            (3, 1) => go!(3, 1),
            (2, 4) => go!(2, 4),
            (2, 3) => go!(2, 3),
            (2, 2) => go!(2, 2),
            (2, 1) => go!(2, 1),
            (1, 4) => go!(1, 4),
            (1, 3) => go!(1, 3),
            (1, 2) => go!(1, 2),
            _ => go!(1, 1),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // fixed-size register tiles, indexed on purpose
    unsafe fn tile_fixed<const R: usize, const C: usize>(
        m: &Q8Matrix,
        a: &Q8Rows,
        r0: usize,
        c0: usize,
        out: &mut [[f32; COLS]; ROWS],
    ) {
        let inp = m.inp;
        let nb = inp / BLOCK;
        // Lane i of a 512-bit product holds block i / 8 of the pair.
        let pair_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        let mut acc = [[_mm512_setzero_ps(); C]; R];
        for p in 0..nb / 2 {
            let mut wv = [_mm512_setzero_si512(); C];
            let mut dw = [_mm512_setzero_ps(); C];
            for j in 0..C {
                let c = c0 + j;
                wv[j] = _mm512_loadu_si512(m.q.as_ptr().add(c * inp + p * 64) as *const _);
                let d = _mm_load_sd(m.d.as_ptr().add(c * nb + 2 * p) as *const f64);
                dw[j] = _mm512_permutexvar_ps(pair_idx, _mm512_castps128_ps512(_mm_castpd_ps(d)));
            }
            for i in 0..R {
                let r = r0 + i;
                let xv = _mm512_loadu_si512(a.q.as_ptr().add(r * inp + p * 64) as *const _);
                let da = _mm512_loadu_ps(a.d_lanes.as_ptr().add(r * inp / 4 + p * 16));
                for j in 0..C {
                    let dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[j], xv);
                    acc[i][j] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(dot),
                        _mm512_mul_ps(dw[j], da),
                        acc[i][j],
                    );
                }
            }
        }
        for i in 0..R {
            // The weights' +128 offset: Σ_b d_w[b] · 128 · d_a[b] · Σ x[b].
            let off = a.offset.as_ptr().add((r0 + i) * nb);
            for j in 0..C {
                let dw = m.d.as_ptr().add((c0 + j) * nb);
                let mut corr = _mm512_setzero_ps();
                let mut b = 0;
                while b + 16 <= nb {
                    corr = _mm512_fmadd_ps(
                        _mm512_loadu_ps(dw.add(b)),
                        _mm512_loadu_ps(off.add(b)),
                        corr,
                    );
                    b += 16;
                }
                let mut tail = 0f32;
                while b < nb {
                    tail += *dw.add(b) * *off.add(b);
                    b += 1;
                }
                out[i][j] = _mm512_reduce_add_ps(acc[i][j]) - _mm512_reduce_add_ps(corr) - tail;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn matches_f32_matmul_and_the_scalar_sums() -> Result<()> {
        let (out, inp, rows) = (37, 192, 11);
        let w = Tensor::from_vec(data(out * inp, 1), (out, inp), &Device::Cpu)?;
        let x = Tensor::from_vec(data(rows * inp, 2), (rows, inp), &Device::Cpu)?;
        let m = Q8Matrix::quantize(&w)?;
        let y = m.forward(&x)?;
        assert_eq!(y.dims(), &[rows, out]);
        let exact = x.matmul(&w.t()?)?;
        let err = (&y - &exact)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = exact.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 0.02 * scale, "q8 error {err} against {scale}");

        let a = m.quantize_rows(&x.flatten_all()?.to_vec1()?, rows);
        let y = y.to_vec2::<f32>()?;
        for r in 0..rows {
            for c in 0..out {
                let mut acc = [[0f32; COLS]; ROWS];
                m.tile_scalar(&a, r, 1, c, 1, &mut acc);
                let (got, want) = (y[r][c], acc[0][0]);
                assert!(
                    (got - want).abs() <= 1e-4 * want.abs().max(1.0),
                    "{got} vs {want}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_widths_off_the_block_pairs() {
        let w = Tensor::zeros((4, 96), DType::F32, &Device::Cpu).unwrap();
        assert!(Q8Matrix::quantize(&w).is_err());
    }
}
