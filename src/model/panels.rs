//! Dense f32 weights packed in panels of 32 outputs for an outer-product kernel: the codec's
//! projections and convolutions on the CPU. Each output is one chain of fused multiply-adds
//! over its inputs in order, whatever the number of rows, the tile the row falls in, or the
//! vector width. So a chunked decode equals a full one bit for bit without padding short
//! chunks, and the AVX-512, AVX2 and plain kernels give identical results.
//!
//! Weights that are bf16 values (the official checkpoint is all bf16, and the codec's
//! projections are used as stored) are kept in bf16, half the memory and half the bytes a
//! chunk reads, and widened to f32 exactly in registers: the same sums as f32 panels.
//!
//! candle's gemm ran the codec at about 90 GFLOP/s on a 2-core Zen 5 through its AVX2
//! microkernel, and it rounds differently for different row counts.

use candle_core::Result;
use rayon::prelude::*;

use super::int8::CpuKernel;

/// Outputs per panel: two 512-bit registers.
pub const PANEL: usize = 32;
/// Rows per pass of the AVX-512 kernel: 24 accumulators, two weight registers, a broadcast.
const ROWS_512: usize = 12;
/// Rows per pass of the AVX2 kernel, which does a panel in two halves of 16 outputs.
const ROWS_256: usize = 6;

/// One cache line of a panel: 16 f32 values, or 32 bf16 values as 16 pairs (the low half of
/// word `j` output `j`, the high half output `16 + j`), so that a shift and a mask widen them.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// Whether weights for `device` in `dtype` go in panels: f32 on a CPU with a vector kernel
/// for them (elsewhere the codec stays on candle's ops).
pub fn suit(device: &candle_core::Device, dtype: candle_core::DType) -> bool {
    device.is_cpu() && dtype == candle_core::DType::F32 && Kernel::for_this_cpu().is_some()
}

/// A kernel for panels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Avx512,
    Avx2,
    Plain,
}

impl Kernel {
    /// The vector kernel this CPU runs, following the quantized projections' choice
    /// ([`CpuKernel::for_this_cpu`], so `VOXTRALD_KERNEL` moves both): AVX-512 where that is
    /// VNNI, AVX2 where it is AVX2, none where it is candle's (no AVX2 and FMA, whose plain
    /// `mul_add` would be a library call, or on request).
    fn for_this_cpu() -> Option<Self> {
        match CpuKernel::for_this_cpu() {
            CpuKernel::Vnni if Kernel::Avx512.runs_here() => Some(Kernel::Avx512),
            CpuKernel::Vnni | CpuKernel::Avx2 if Kernel::Avx2.runs_here() => Some(Kernel::Avx2),
            _ => None,
        }
    }

    /// Whether this CPU runs `self`.
    fn runs_here(self) -> bool {
        match self {
            Kernel::Plain => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// A `[out, inp]` weight as `ceil(out / 32)` panels, each `[inp][32]`: the 32 outputs' weights
/// for one input next to each other (zero past `out`).
pub struct PanelWeights {
    out: usize,
    inp: usize,
    /// Whether the values are stored as bf16 (one line per input) or f32 (two).
    bf16: bool,
    lines: Vec<Line>,
}

impl std::fmt::Debug for PanelWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.bf16 { "bf16" } else { "f32" };
        write!(f, "PanelWeights [{}, {}] {kind}", self.out, self.inp)
    }
}

/// The output `[rows, out]` as the parallel panels share it.
struct SharedOut(*mut f32);

// SAFETY: only `matmul_into_with` makes one, over a buffer that outlives its parallel loop, and each
// panel (visited once) writes its own 32 columns alone, so no two threads write one element.
unsafe impl Sync for SharedOut {}

impl PanelWeights {
    /// Packs `w` `[out, inp]` (row-major), in bf16 when every value is one exactly.
    pub fn pack(w: &[f32], out: usize, inp: usize) -> Result<Self> {
        if out == 0 || inp == 0 || w.len() != out * inp {
            candle_core::bail!("panel weights: {} values for [{out}, {inp}]", w.len());
        }
        let bf16 = w.iter().all(|v| v.to_bits() & 0xFFFF == 0);
        let panel_len = inp * Self::lines_per_input(bf16);
        let mut lines = vec![Line::default(); out.div_ceil(PANEL) * panel_len];
        lines
            .par_chunks_mut(panel_len)
            .enumerate()
            .for_each(|(p, panel)| {
                let rows = w[p * PANEL * inp..].chunks_exact(inp).take(PANEL);
                for (c, row) in rows.enumerate() {
                    for (k, &v) in row.iter().enumerate() {
                        if bf16 {
                            panel[k].0[c % 16] |= (v.to_bits() >> 16) << (16 * (c / 16));
                        } else {
                            panel[k * 2 + c / 16].0[c % 16] = v.to_bits();
                        }
                    }
                }
            });
        Ok(Self {
            out,
            inp,
            bf16,
            lines,
        })
    }

    fn lines_per_input(bf16: bool) -> usize {
        if bf16 {
            1
        } else {
            2
        }
    }

    /// The lines of one panel.
    fn panel_len(&self) -> usize {
        self.inp * Self::lines_per_input(self.bf16)
    }

    /// Whether the values are kept in bf16.
    pub fn is_bf16(&self) -> bool {
        self.bf16
    }

    /// `(out, inp)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// The weight `[out, inp]` back (row-major).
    pub fn unpack(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.out * self.inp];
        for (o, row) in w.chunks_exact_mut(self.inp).enumerate() {
            let (p, c) = (o / PANEL, o % PANEL);
            let panel = &self.lines[p * self.panel_len()..][..self.panel_len()];
            for (k, v) in row.iter_mut().enumerate() {
                *v = weight(panel, self.bf16, k, c);
            }
        }
        w
    }

    /// `[rows, out]`: row `r` of `x` (the `inp` values from `r * stride`) times the weight
    /// transposed. A stride below `inp` makes rows overlap: a convolution over channels-last
    /// steps without copying its windows.
    pub fn matmul(&self, x: &[f32], rows: usize, stride: usize) -> Result<Vec<f32>> {
        let mut y = vec![0f32; rows * self.out];
        self.matmul_into(x, rows, stride, &mut y)?;
        Ok(y)
    }

    /// [`Self::matmul`] into `y` (`rows * out` values), which it overwrites: no allocation.
    pub fn matmul_into(&self, x: &[f32], rows: usize, stride: usize, y: &mut [f32]) -> Result<()> {
        let kernel = Kernel::for_this_cpu().unwrap_or(Kernel::Plain);
        self.matmul_into_with(x, rows, stride, kernel, y)
    }

    #[cfg(test)]
    fn matmul_with(
        &self,
        x: &[f32],
        rows: usize,
        stride: usize,
        kernel: Kernel,
    ) -> Result<Vec<f32>> {
        let mut y = vec![0f32; rows * self.out];
        self.matmul_into_with(x, rows, stride, kernel, &mut y)?;
        Ok(y)
    }

    fn matmul_into_with(
        &self,
        x: &[f32],
        rows: usize,
        stride: usize,
        kernel: Kernel,
        y: &mut [f32],
    ) -> Result<()> {
        let (out, inp) = (self.out, self.inp);
        if y.len() != rows * out {
            candle_core::bail!(
                "panel matmul: room for {} values, not {rows} x {out}",
                y.len()
            );
        }
        if rows > 0 && (rows - 1) * stride + inp > x.len() {
            candle_core::bail!(
                "panel matmul: {rows} rows of {inp} every {stride} need more than {} values",
                x.len()
            );
        }
        let kernel = if kernel.runs_here() {
            kernel
        } else {
            Kernel::Plain
        };
        if rows == 0 {
            return Ok(());
        }
        let shared = SharedOut(y.as_mut_ptr());
        let shared = &shared;
        self.lines
            .par_chunks_exact(self.panel_len())
            .enumerate()
            .for_each(|(p, panel)| {
                let cols = PANEL.min(out - p * PANEL);
                let tile = Tile {
                    panel,
                    bf16: self.bf16,
                    inp,
                    x,
                    stride,
                    // SAFETY: column `p * PANEL` of row 0 is inside `y`.
                    y: unsafe { shared.0.add(p * PANEL) },
                    out,
                    cols,
                };
                // SAFETY: `tile` writes rows `0..rows`, columns `p * PANEL ..+ cols` of `y`
                // alone; `x` holds every row (checked above); the kernel runs on this CPU.
                unsafe { tile.run(rows, kernel) };
            });
        Ok(())
    }
}

/// Output `c`'s weight for input `k` in `panel`.
#[inline(always)]
fn weight(panel: &[Line], bf16: bool, k: usize, c: usize) -> f32 {
    if bf16 {
        let word = panel[k].0[c % 16];
        f32::from_bits(if c < 16 {
            word << 16
        } else {
            word & 0xFFFF_0000
        })
    } else {
        f32::from_bits(panel[k * 2 + c / 16].0[c % 16])
    }
}

/// One panel's outputs for every row.
struct Tile<'a> {
    panel: &'a [Line],
    bf16: bool,
    inp: usize,
    x: &'a [f32],
    stride: usize,
    /// Row 0, first column of the panel.
    y: *mut f32,
    out: usize,
    cols: usize,
}

/// Calls `pass(first_row, n)` for each pass of up to `max` rows.
fn in_passes(rows: usize, max: usize, mut pass: impl FnMut(usize, usize)) {
    let mut r = 0;
    while r < rows {
        let n = (rows - r).min(max);
        pass(r, n);
        r += n;
    }
}

impl Tile<'_> {
    /// # Safety
    /// `self.y` must have room for `rows` rows of `out` values from it, and `kernel` must run
    /// on this CPU.
    unsafe fn run(&self, rows: usize, kernel: Kernel) {
        match kernel {
            #[cfg(target_arch = "x86_64")]
            // SAFETY (both): as for `run`; each pass stays within `rows`.
            Kernel::Avx512 => in_passes(rows, ROWS_512, |r, n| unsafe {
                match n {
                    1 => self.pass_512::<1>(r),
                    2 => self.pass_512::<2>(r),
                    3 => self.pass_512::<3>(r),
                    4 => self.pass_512::<4>(r),
                    5 => self.pass_512::<5>(r),
                    6 => self.pass_512::<6>(r),
                    7 => self.pass_512::<7>(r),
                    8 => self.pass_512::<8>(r),
                    9 => self.pass_512::<9>(r),
                    10 => self.pass_512::<10>(r),
                    11 => self.pass_512::<11>(r),
                    _ => self.pass_512::<12>(r),
                }
            }),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2 => in_passes(rows, ROWS_256, |r, n| unsafe {
                match n {
                    1 => self.pass_256::<1>(r),
                    2 => self.pass_256::<2>(r),
                    3 => self.pass_256::<3>(r),
                    4 => self.pass_256::<4>(r),
                    5 => self.pass_256::<5>(r),
                    _ => self.pass_256::<6>(r),
                }
            }),
            _ => self.plain(rows),
        }
    }

    /// Row `r`'s input `k`.
    #[inline(always)]
    fn input(&self, r: usize, k: usize) -> f32 {
        self.x[r * self.stride + k]
    }

    unsafe fn plain(&self, rows: usize) {
        for r in 0..rows {
            let mut acc = [0f32; PANEL];
            for k in 0..self.inp {
                let v = self.input(r, k);
                for (c, a) in acc.iter_mut().enumerate() {
                    *a = weight(self.panel, self.bf16, k, c).mul_add(v, *a);
                }
            }
            let y = self.y.add(r * self.out);
            std::ptr::copy_nonoverlapping(acc.as_ptr(), y, self.cols);
        }
    }

    /// Rows `r0..r0 + R`, all 32 outputs in registers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn pass_512<const R: usize>(&self, r0: usize) {
        if self.bf16 {
            self.pass_512_with::<R, true>(r0)
        } else {
            self.pass_512_with::<R, false>(r0)
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn pass_512_with<const R: usize, const BF16: bool>(&self, r0: usize) {
        use std::arch::x86_64::*;
        let w = self.panel.as_ptr() as *const u32;
        let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        let xs: [*const f32; R] =
            std::array::from_fn(|i| self.x.as_ptr().add((r0 + i) * self.stride));
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for k in 0..self.inp {
            let (w0, w1) = if BF16 {
                let v = _mm512_load_si512(w.add(k * 16) as *const __m512i);
                (
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
                    _mm512_castsi512_ps(_mm512_and_si512(v, high)),
                )
            } else {
                let w = w as *const f32;
                (
                    _mm512_load_ps(w.add(k * PANEL)),
                    _mm512_load_ps(w.add(k * PANEL + 16)),
                )
            };
            for (a, x) in acc.iter_mut().zip(&xs) {
                let v = _mm512_set1_ps(*x.add(k));
                a[0] = _mm512_fmadd_ps(w0, v, a[0]);
                a[1] = _mm512_fmadd_ps(w1, v, a[1]);
            }
        }
        let lo = (1u32 << self.cols.min(16)) - 1;
        let hi = (1u64 << self.cols.saturating_sub(16)) - 1;
        for (i, a) in acc.iter().enumerate() {
            let y = self.y.add((r0 + i) * self.out);
            _mm512_mask_storeu_ps(y, lo as __mmask16, a[0]);
            _mm512_mask_storeu_ps(y.add(16), hi as __mmask16, a[1]);
        }
    }

    /// Rows `r0..r0 + R`, one half of the panel (16 outputs) at a time.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn pass_256<const R: usize>(&self, r0: usize) {
        use std::arch::x86_64::*;
        let w = self.panel.as_ptr() as *const u32;
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let xs: [*const f32; R] =
            std::array::from_fn(|i| self.x.as_ptr().add((r0 + i) * self.stride));
        for half in 0..2 {
            let cols = self.cols.saturating_sub(half * 16).min(16);
            if cols == 0 {
                break;
            }
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            for k in 0..self.inp {
                let (w0, w1) = if self.bf16 {
                    let at = w.add(k * 16) as *const __m256i;
                    let [v0, v1] = [_mm256_load_si256(at), _mm256_load_si256(at.add(1))];
                    if half == 0 {
                        (
                            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v0)),
                            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v1)),
                        )
                    } else {
                        (
                            _mm256_castsi256_ps(_mm256_and_si256(v0, high)),
                            _mm256_castsi256_ps(_mm256_and_si256(v1, high)),
                        )
                    }
                } else {
                    let w = w.add(k * PANEL + half * 16) as *const f32;
                    (_mm256_load_ps(w), _mm256_load_ps(w.add(8)))
                };
                for (a, x) in acc.iter_mut().zip(&xs) {
                    let v = _mm256_set1_ps(*x.add(k));
                    a[0] = _mm256_fmadd_ps(w0, v, a[0]);
                    a[1] = _mm256_fmadd_ps(w1, v, a[1]);
                }
            }
            for (i, a) in acc.iter().enumerate() {
                let mut vals = [0f32; 16];
                _mm256_storeu_ps(vals.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(vals.as_mut_ptr().add(8), a[1]);
                let y = self.y.add((r0 + i) * self.out + half * 16);
                std::ptr::copy_nonoverlapping(vals.as_ptr(), y, cols);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::int8::tests::random;
    use super::*;

    /// Each output as one multiply-add chain in input order: what every kernel must give.
    fn chain(w: &[f32], inp: usize, x: &[f32], rows: usize, stride: usize) -> Vec<f32> {
        let out = w.len() / inp;
        let mut y = vec![0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                let mut a = 0f32;
                for k in 0..inp {
                    a = w[o * inp + k].mul_add(x[r * stride + k], a);
                }
                y[r * out + o] = a;
            }
        }
        y
    }

    /// Every kernel this CPU runs equals the plain chains bit for bit: partial panels, odd
    /// inputs, every row count up to past two passes, and overlapping rows.
    #[test]
    fn kernels_equal_the_chains_exactly() {
        for (out, inp, bf16) in [
            (1, 3, false),
            (16, 5, true),
            (33, 40, false),
            (33, 40, true),
            (70, 64, true),
            (240, 17, false),
        ] {
            let mut w = random(out * inp, (out * 31 + inp) as u64);
            if bf16 {
                w.iter_mut()
                    .for_each(|v| *v = f32::from_bits(v.to_bits() & 0xFFFF_0000));
            }
            let packed = PanelWeights::pack(&w, out, inp).unwrap();
            assert_eq!(packed.is_bf16(), bf16);
            assert_eq!(packed.unpack(), w);
            for rows in [1, 2, 5, 6, 7, 12, 13, 25] {
                for stride in [inp, inp.div_ceil(3)] {
                    let x = random((rows - 1) * stride + inp, (rows * 7 + stride) as u64);
                    let want = chain(&w, inp, &x, rows, stride);
                    for kernel in [Kernel::Plain, Kernel::Avx2, Kernel::Avx512] {
                        if !kernel.runs_here() {
                            continue;
                        }
                        let got = packed.matmul_with(&x, rows, stride, kernel).unwrap();
                        assert!(
                            got.iter()
                                .zip(&want)
                                .all(|(g, w)| g.to_bits() == w.to_bits()),
                            "{kernel:?}: [{out}, {inp}] x {rows} rows every {stride}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(PanelWeights::pack(&[0.0; 5], 2, 3).is_err());
        assert!(PanelWeights::pack(&[], 0, 3).is_err());
        let p = PanelWeights::pack(&[1.0; 6], 2, 3).unwrap();
        assert!(p.matmul(&[1.0; 5], 2, 3).is_err());
        assert_eq!(p.matmul(&[1.0; 4], 2, 1).unwrap(), vec![3.0; 4]);
        assert!(p.matmul(&[], 0, 3).unwrap().is_empty());
    }
}
