//! Dense f32 projections of a few activation rows (the f32 flow head's six, a backbone step's
//! one) on x86 CPUs with AVX2 and FMA: each pass streams two or four weight rows once for up to
//! six activation rows, prefetching ahead, so the weights are read at close to memory speed.
//!
//! candle's gemm for `W · xᵀ` with six columns left the f32 flow head at 1.47 times its
//! bandwidth floor (bench checkpoint, 2-core Zen 4: 364 ms a frame against a 248 ms floor).
//! The sums are the same products in another order: results differ from candle's in the last
//! bits only.

use candle_core::Result;
use rayon::prelude::*;

use super::int8::{avx2, prefetch};

/// Outputs per parallel task.
const TASK: usize = 8;
/// Activation rows per pass over the weights.
const ROWS_PER_PASS: usize = 6;
/// How far ahead of the weight row being read its next lines are asked for (bytes).
const PREFETCH: usize = 4096;

/// Whether [`matmul`] has a vector kernel on this CPU.
pub fn available() -> bool {
    avx2()
}

/// `x` `[rows, inp]` times `w` `[out, inp]` transposed: `[rows, out]` (all row-major).
pub fn matmul(w: &[f32], out: usize, x: &[f32], rows: usize) -> Result<Vec<f32>> {
    matmul_with(w, out, x, rows, available())
}

/// [`matmul`] into `y` (`rows * out` values), which it overwrites: no allocation.
pub fn matmul_into(w: &[f32], out: usize, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
    matmul_into_with(w, out, x, rows, available(), y)
}

fn matmul_with(w: &[f32], out: usize, x: &[f32], rows: usize, vector: bool) -> Result<Vec<f32>> {
    let mut y = vec![0f32; rows * out];
    matmul_into_with(w, out, x, rows, vector, &mut y)?;
    Ok(y)
}

fn matmul_into_with(
    w: &[f32],
    out: usize,
    x: &[f32],
    rows: usize,
    vector: bool,
    y: &mut [f32],
) -> Result<()> {
    let inp = w.len().checked_div(out).unwrap_or(0);
    if out == 0 || inp == 0 || w.len() != out * inp || x.len() != rows * inp {
        candle_core::bail!(
            "few-rows projection: {} weights for {out} outputs, {} values for {rows} rows",
            w.len(),
            x.len()
        );
    }
    if y.len() != rows * out {
        candle_core::bail!(
            "few-rows projection: room for {} values, not {rows} x {out}",
            y.len()
        );
    }
    let vector = vector && avx2();
    let shared = Out {
        ptr: y.as_mut_ptr(),
        rows,
        out,
    };
    let shared = &shared;
    (0..out.div_ceil(TASK))
        .into_par_iter()
        .with_min_len(8)
        .for_each(|t| {
            let first = t * TASK;
            let n = TASK.min(out - first);
            let w = &w[first * inp..][..n * inp];
            let y = Columns { shared, first, n };
            #[cfg(target_arch = "x86_64")]
            if vector {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                return unsafe { task_avx2(w, n, inp, x, rows, &y) };
            }
            task_plain(w, n, inp, x, rows, &y)
        });
    Ok(())
}

/// The output `[rows, out]` as the parallel tasks share it.
struct Out {
    ptr: *mut f32,
    rows: usize,
    out: usize,
}

// SAFETY: only `matmul_into_with` makes one, over a buffer that outlives its parallel loop, and it
// hands each task (visited once) `Columns` of its own outputs, so no two threads write one
// element.
unsafe impl Sync for Out {}

/// One task's outputs `first..first + n`, in every row.
struct Columns<'a> {
    shared: &'a Out,
    first: usize,
    n: usize,
}

impl Columns<'_> {
    /// Output `first + o` of row `r`.
    fn put(&self, o: usize, r: usize, v: f32) {
        assert!(o < self.n && r < self.shared.rows);
        // SAFETY: in bounds (asserted), and this task's column alone (see `Out`).
        unsafe { *self.shared.ptr.add(r * self.shared.out + self.first + o) = v }
    }
}

/// Outputs `w` `[n, inp]` for every row of `x`: plain code.
fn task_plain(w: &[f32], n: usize, inp: usize, x: &[f32], rows: usize, y: &Columns) {
    for o in 0..n {
        let wo = &w[o * inp..][..inp];
        for r in 0..rows {
            let xr = &x[r * inp..][..inp];
            y.put(o, r, wo.iter().zip(xr).map(|(a, b)| a * b).sum());
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn task_avx2(w: &[f32], n: usize, inp: usize, x: &[f32], rows: usize, y: &Columns) {
    let mut o = 0;
    while o < n {
        // One or two rows: four weight rows at a time, so that enough sums are in flight.
        let outs = if rows <= 2 && n - o >= 4 {
            4
        } else if n - o >= 2 {
            2
        } else {
            1
        };
        let mut r = 0;
        while r < rows {
            let k = ROWS_PER_PASS.min(rows - r);
            let ys = match (outs, k) {
                (4, 1) => pass::<4, 1>(w, o, inp, x, r),
                (4, _) => pass::<4, 2>(w, o, inp, x, r),
                (2, 1) => pass::<2, 1>(w, o, inp, x, r),
                (2, 2) => pass::<2, 2>(w, o, inp, x, r),
                (2, 3) => pass::<2, 3>(w, o, inp, x, r),
                (2, 4) => pass::<2, 4>(w, o, inp, x, r),
                (2, 5) => pass::<2, 5>(w, o, inp, x, r),
                (2, _) => pass::<2, 6>(w, o, inp, x, r),
                (_, 1) => pass::<1, 1>(w, o, inp, x, r),
                (_, 2) => pass::<1, 2>(w, o, inp, x, r),
                (_, 3) => pass::<1, 3>(w, o, inp, x, r),
                (_, 4) => pass::<1, 4>(w, o, inp, x, r),
                (_, 5) => pass::<1, 5>(w, o, inp, x, r),
                (_, _) => pass::<1, 6>(w, o, inp, x, r),
            };
            for (j, ys) in ys.iter().enumerate().take(outs) {
                for (i, &v) in ys[..k].iter().enumerate() {
                    y.put(o + j, r + i, v);
                }
            }
            r += k;
        }
        o += outs;
    }
}

/// Weight rows `o..o + O` against activation rows `r..r + R`: `[O][R]` sums (padded to 6).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn pass<const O: usize, const R: usize>(
    w: &[f32],
    o: usize,
    inp: usize,
    x: &[f32],
    r: usize,
) -> [[f32; ROWS_PER_PASS]; 4] {
    use std::arch::x86_64::*;
    assert!((o + O) * inp <= w.len() && (r + R) * inp <= x.len() && O <= 4 && R <= 6);
    let ws: [*const f32; O] = std::array::from_fn(|j| w.as_ptr().add((o + j) * inp));
    let xs: [*const f32; R] = std::array::from_fn(|i| x.as_ptr().add((r + i) * inp));
    let mut acc = [[_mm256_setzero_ps(); R]; O];
    let mut k = 0;
    while k + 16 <= inp {
        for (j, wj) in ws.iter().enumerate() {
            prefetch(wj.wrapping_add(k + PREFETCH / 4));
            let w0 = _mm256_loadu_ps(wj.add(k));
            let w1 = _mm256_loadu_ps(wj.add(k + 8));
            for (i, xi) in xs.iter().enumerate() {
                let a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xi.add(k)), acc[j][i]);
                acc[j][i] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xi.add(k + 8)), a);
            }
        }
        k += 16;
    }
    let mut out = [[0f32; ROWS_PER_PASS]; 4];
    for j in 0..O {
        for i in 0..R {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[j][i]);
            let tail: f32 = (k..inp).map(|k| *ws[j].add(k) * *xs[i].add(k)).sum();
            out[j][i] = lanes.iter().sum::<f32>() + tail;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::int8::tests::random;
    use super::*;
    use candle_core::{Device, Tensor};

    /// Both code paths against candle's matmul, for shapes with partial tasks, odd output
    /// counts, inputs that are not a multiple of 16, and every row count up to two passes.
    #[test]
    fn matches_candles_matmul() {
        for (out, inp) in [(1, 16), (5, 40), (13, 64), (67, 200), (40, 3)] {
            let w = random(out * inp, out as u64 + 7);
            let wt = Tensor::from_vec(w.clone(), (out, inp), &Device::Cpu).unwrap();
            for rows in [1, 2, 3, 5, 6, 7, 12, 13] {
                let x = random(rows * inp, (rows * 17 + inp) as u64);
                let xt = Tensor::from_vec(x.clone(), (rows, inp), &Device::Cpu).unwrap();
                let want: Vec<f32> = xt
                    .matmul(&wt.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for vector in [false, available()] {
                    let got = matmul_with(&w, out, &x, rows, vector).unwrap();
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
        assert!(matmul(&[0.0; 40], 3, &[0.0; 13], 1).is_err());
        assert!(matmul(&[], 0, &[], 1).is_err());
        assert!(matmul(&[0.0; 32], 2, &[0.0; 15], 1).is_err());
        assert_eq!(
            matmul(&[1.0; 32], 2, &[1.0; 16], 1).unwrap(),
            vec![16.0, 16.0]
        );
    }
}
