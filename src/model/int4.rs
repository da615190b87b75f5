//! 4-bit weights for `--quant q4`: ggml's Q4_1 blocks (32 values, an f16 scale and an f16
//! minimum each), found by a least-squares search instead of Q4_1's min/max, and packed in
//! units of 32 outputs for an AVX2 kernel and an AVX-512 VNNI one.
//!
//! Why Q4_1 and this kernel: the 4-bit values are unsigned, so `maddubs` multiplies them
//! against the signed int8 activations directly, and eight such products add up in 16 bits
//! without overflow (8 × 2 × 15 × 127 < 2^15). That is one multiply instruction per 32
//! products where the int8 kernel needs two, so on a CPU bound by its multiply port (AVX2
//! without VNNI) the 4-bit weights are faster as well as half the bytes. With VNNI,
//! `vpdpbusd` takes the unsigned nibbles against the signed bytes as they are. Where neither
//! kernel can run, the same blocks go to candle's Q4_1 kernel ([`Q4Weights::to_ggml`]): the block
//! sums are the same integers, so the results differ only in the order of f32 additions.

use candle_core::Result;
use half::f16;
use rayon::prelude::*;

use super::int8::{
    in_passes, prefetch, round_away, Activations, CpuKernel, Extra, StripKernels, StripOut, BLOCK,
    PREFETCH, STRIP, UNIT,
};

/// Activation rows per pass over a strip's weights (AVX2: 16 registers).
const ROWS_PER_PASS: usize = 4;
/// The same with VNNI (AVX-512: 32 registers, and no 16-bit sums to widen).
const ROWS_PER_PASS_VNNI: usize = 6;
/// Bytes per unit and block: 32 outputs × 32 values, two values a byte.
const TILE: usize = UNIT * BLOCK / 2;
/// Bytes per group of a tile: 32 outputs × 8 values.
const GROUP: usize = UNIT * 4;
/// ggml's `block_q4_1`: f16 scale, f16 minimum, 16 bytes of values.
pub const GGML_BLOCK_BYTES: usize = 4 + BLOCK / 2;

/// 2^23: adding and subtracting it rounds a non-negative f32 below 2^22 to an integer.
const ROUNDER: f32 = 8_388_608.0;

/// One block in Q4_1 form: `x ≈ d · q + m`, `q` in `0..=15`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Q4Block {
    pub d: f16,
    pub m: f16,
    pub q: [u8; BLOCK],
}

impl Q4Block {
    /// The values `q` stands for with the stored (f16) scale and minimum.
    pub fn dequantize(&self) -> [f32; BLOCK] {
        let (d, m) = (self.d.to_f32(), self.m.to_f32());
        std::array::from_fn(|i| d * self.q[i] as f32 + m)
    }

    /// Quantizes with the stored (f16) `d` and `m`: nearest level, clamped.
    fn with(xs: &[f32], d: f16, m: f16) -> Self {
        let (df, mf) = (d.to_f32(), m.to_f32());
        let id = if df != 0.0 { 1.0 / df } else { 0.0 };
        let q = std::array::from_fn(|i| round_away(((xs[i] - mf) * id).clamp(0.0, 15.0)) as u8);
        Self { d, m, q }
    }

    fn squared_error(&self, xs: &[f32]) -> f32 {
        self.dequantize()
            .iter()
            .zip(xs)
            .map(|(y, x)| (y - x) * (y - x))
            .sum()
    }

    /// The better of Q4_1's own block (range / 15 from the minimum) and the best least-squares
    /// fit: for scales from 14 to 16 steps over the range (in fifths of a step), the scale and
    /// minimum that fit the levels that scale picks (ggml's k-quants search, unweighted; ten
    /// more candidates in between lowered the error by 0.5 % in the tests, at twice the time).
    pub fn quantize(xs: &[f32]) -> Self {
        debug_assert_eq!(xs.len(), BLOCK);
        let (lo, hi) = xs
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
        let mut best = Self::with(xs, f16::from_f32((hi - lo) / 15.0), f16::from_f32(lo));
        if hi <= lo || !(hi - lo).is_finite() {
            return best;
        }
        // Each candidate's error comes from the sums in closed form; only the winner is
        // rounded to f16 and requantized.
        let n = BLOCK as f32;
        let sum_x: f32 = xs.iter().sum();
        let sum_x2: f32 = xs.iter().map(|x| x * x).sum();
        let mut fit: Option<(f32, f32, f32)> = None;
        for step in 0..=10 {
            let iscale = (14.0 + 0.2 * step as f32) / (hi - lo);
            // Eight lanes of partial sums, so that the loop vectorizes.
            let (mut sl, mut sl2, mut sxl) = ([0f32; 8], [0f32; 8], [0f32; 8]);
            for xs in xs.chunks_exact(8) {
                for j in 0..8 {
                    // Rounds (half to even) by the 2^23 trick: which way a tie goes does not
                    // matter to a candidate, and it keeps the loop in vector registers.
                    let l = (((xs[j] - lo) * iscale).min(15.0) + ROUNDER) - ROUNDER;
                    sl[j] += l;
                    sl2[j] += l * l;
                    sxl[j] += xs[j] * l;
                }
            }
            let total = |v: [f32; 8]| v.iter().sum::<f32>();
            let (sl, sl2, sxl) = (total(sl), total(sl2), total(sxl));
            let det = n * sl2 - sl * sl;
            if det <= 0.0 {
                continue;
            }
            let d = (n * sxl - sl * sum_x) / det;
            let m = (sl2 * sum_x - sl * sxl) / det;
            let err = sum_x2 - 2.0 * d * sxl - 2.0 * m * sum_x
                + d * d * sl2
                + 2.0 * d * m * sl
                + n * m * m;
            if d > 0.0 && err.is_finite() && fit.is_none_or(|(e, _, _)| err < e) {
                fit = Some((err, d, m));
            }
        }
        if let Some((_, d, m)) = fit {
            let candidate = Self::with(xs, f16::from_f32(d), f16::from_f32(m));
            if candidate.squared_error(xs) < best.squared_error(xs) {
                best = candidate;
            }
        }
        best
    }
}

/// ggml `block_q4_1`s, kept in 16-bit words so that the bytes candle reads them from are
/// aligned for its block type (which starts with two f16s).
pub struct GgmlQ4_1 {
    words: Vec<u16>,
}

impl GgmlQ4_1 {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: u16 has no padding and u8 no alignment; the length covers the same memory.
        unsafe {
            std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.words.len() * 2)
        }
    }
}

/// A weight matrix `[out, inp]` of Q4_1 blocks in units of 32 outputs (four strips of eight).
pub struct Q4Weights {
    out: usize,
    inp: usize,
    blocks: usize,
    /// Per unit and block, four 128-byte groups; byte `lane * 4 + k` of group `p` holds input
    /// `8p + k` of output `lane` in its low nibble and input `8p + 4 + k` in its high one. A
    /// group is two 512-bit registers for VNNI, or four strips' 256-bit ones for AVX2.
    quants: Vec<u8>,
    /// Per unit and block: the 32 outputs' scales, then their minimums (f16 bits).
    scales: Vec<u16>,
}

impl std::fmt::Debug for Q4Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q4Weights[{}, {}]", self.out, self.inp)
    }
}

impl Q4Weights {
    /// `w` is `[out, inp]`, row-major; `inp` is a multiple of [`BLOCK`]. Units are
    /// quantized in parallel.
    pub fn quantize(w: &[f32], out: usize, inp: usize) -> Result<Self> {
        if inp == 0 || !inp.is_multiple_of(BLOCK) || w.len() != out * inp {
            candle_core::bail!(
                "4-bit weights: {} values for [{out}, {inp}] (inputs must be a multiple of {BLOCK})",
                w.len()
            );
        }
        let blocks = inp / BLOCK;
        let units = out.div_ceil(UNIT);
        let mut quants = vec![0u8; units * blocks * TILE];
        let mut scales = vec![0u16; units * blocks * 2 * UNIT];
        quants
            .par_chunks_mut(blocks * TILE)
            .zip(scales.par_chunks_mut(blocks * 2 * UNIT))
            .enumerate()
            .for_each(|(u, (quants, scales))| {
                for lane in 0..UNIT.min(out.saturating_sub(u * UNIT)) {
                    let row = &w[(u * UNIT + lane) * inp..][..inp];
                    for (b, xs) in row.chunks_exact(BLOCK).enumerate() {
                        let block = Q4Block::quantize(xs);
                        let tile = &mut quants[b * TILE..][..TILE];
                        for (k, &v) in block.q.iter().enumerate() {
                            let (p, half, k) = (k / 8, (k / 4) % 2, k % 4);
                            tile[p * GROUP + lane * 4 + k] |= v << (4 * half);
                        }
                        scales[b * 2 * UNIT + lane] = block.d.to_bits();
                        scales[b * 2 * UNIT + UNIT + lane] = block.m.to_bits();
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

    /// Block `b` of output `o`, as it is stored.
    pub fn block(&self, o: usize, b: usize) -> Q4Block {
        let (u, lane) = (o / UNIT, o % UNIT);
        let tile = &self.quants[(u * self.blocks + b) * TILE..][..TILE];
        let scales = &self.scales[(u * self.blocks + b) * 2 * UNIT..][..2 * UNIT];
        Q4Block {
            d: f16::from_bits(scales[lane]),
            m: f16::from_bits(scales[UNIT + lane]),
            q: std::array::from_fn(|k| {
                let (p, half, k) = (k / 8, (k / 4) % 2, k % 4);
                (tile[p * GROUP + lane * 4 + k] >> (4 * half)) & 0x0F
            }),
        }
    }

    /// The same blocks in ggml's Q4_1 layout (row-major `block_q4_1`s: `d`, `m`, then byte `j`
    /// holding value `j` low and value `j + 16` high), for candle's kernel.
    pub fn to_ggml(&self) -> GgmlQ4_1 {
        let mut words = Vec::with_capacity(self.out * self.blocks * GGML_BLOCK_BYTES / 2);
        for o in 0..self.out {
            for b in 0..self.blocks {
                let block = self.block(o, b);
                words.extend([block.d.to_bits(), block.m.to_bits()]);
                words.extend((0..BLOCK / 4).map(|j| {
                    let byte = |j: usize| block.q[j] | (block.q[j + BLOCK / 2] << 4);
                    u16::from_le_bytes([byte(2 * j), byte(2 * j + 1)])
                }));
            }
        }
        GgmlQ4_1 { words }
    }

    /// The unit whose first strip is `s`: its tiles and scales.
    fn unit(&self, s: usize) -> (&[u8], &[u16]) {
        let u = s / 4;
        (
            &self.quants[u * self.blocks * TILE..][..self.blocks * TILE],
            &self.scales[u * self.blocks * 2 * UNIT..][..self.blocks * 2 * UNIT],
        )
    }

    /// The same sums in plain code (see [`StripKernels::plain`]).
    fn unit_plain(&self, s: usize, a: &Activations, y: &StripOut) {
        let first = s * STRIP;
        for r in 0..a.rows {
            let mut acc = [0f32; UNIT];
            for b in 0..self.blocks {
                let xq = &a.quants[r * self.inp + b * BLOCK..][..BLOCK];
                let at = r * self.blocks + b;
                for (lane, acc) in acc.iter_mut().enumerate() {
                    if first + lane >= self.out {
                        break;
                    }
                    let block = self.block(first + lane, b);
                    let dot: i32 = (block.q.iter().zip(xq))
                        .map(|(&q, &x)| q as i32 * x as i32)
                        .sum();
                    *acc += dot as f32 * (block.d.to_f32() * a.scales[at])
                        + block.m.to_f32() * a.sums[at];
                }
            }
            y.put(r, &acc);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unit_avx2(&self, s: usize, a: &Activations, dst: &StripOut) {
        in_passes!(self.rows_avx2, ROWS_PER_PASS, s, a, dst)
    }

    /// Rows `r0..r0 + R` of the unit at strip `s`, block by block and, in a block, strip by
    /// strip (the block's 512 bytes stay in L1). Per register of 64 values, the low and high
    /// nibbles are split once and multiplied against each row's broadcast activation bytes; a
    /// block's eight products per lane add up in i16, then become i32 and f32 once per block.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn rows_avx2<const R: usize>(
        &self,
        s: usize,
        a: &Activations,
        r0: usize,
        dst: &StripOut,
    ) {
        use std::arch::x86_64::*;
        debug_assert!(r0 + R <= a.rows);
        let ones = _mm256_set1_epi16(1);
        let nibble = _mm256_set1_epi8(0x0F);
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let (tiles, scales) = self.unit(s);
        // SAFETY (pointer arithmetic below): a unit holds `blocks` tiles of TILE bytes and
        // `blocks * 2 * UNIT` scales; each activation row holds `inp` bytes and `blocks`
        // scales and sums.
        let (tiles, scales) = (tiles.as_ptr(), scales.as_ptr());
        let xs: [*const i32; R] =
            std::array::from_fn(|i| a.quants.as_ptr().add((r0 + i) * self.inp) as *const i32);
        for b in 0..self.blocks {
            // `k` picks the strip's weights and scales as well as its accumulators.
            #[allow(clippy::needless_range_loop)]
            for k in 0..4 {
                let mut sums = [_mm256_setzero_si256(); R];
                for p in 0..4 {
                    let at = b * TILE + p * GROUP + k * 32;
                    let v = _mm256_loadu_si256(tiles.add(at) as *const __m256i);
                    if k % 2 == 0 {
                        prefetch(tiles.wrapping_add(at + PREFETCH));
                    }
                    let low = _mm256_and_si256(v, nibble);
                    let high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
                    let word = b * BLOCK / 4 + 2 * p;
                    for i in 0..R {
                        let x0 = _mm256_set1_epi32(xs[i].add(word).read_unaligned());
                        let x1 = _mm256_set1_epi32(xs[i].add(word + 1).read_unaligned());
                        let both = _mm256_add_epi16(
                            _mm256_maddubs_epi16(low, x0),
                            _mm256_maddubs_epi16(high, x1),
                        );
                        sums[i] = _mm256_add_epi16(sums[i], both);
                    }
                }
                let sc = scales.add(b * 2 * UNIT + k * STRIP);
                let d = _mm256_cvtph_ps(_mm_loadu_si128(sc as *const __m128i));
                let m = _mm256_cvtph_ps(_mm_loadu_si128(sc.add(UNIT) as *const __m128i));
                for i in 0..R {
                    let at = (r0 + i) * self.blocks + b;
                    let dxd = _mm256_mul_ps(d, _mm256_set1_ps(*a.scales.get_unchecked(at)));
                    let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums[i], ones));
                    acc[i][k] = _mm256_fmadd_ps(
                        m,
                        _mm256_set1_ps(*a.sums.get_unchecked(at)),
                        _mm256_fmadd_ps(dot, dxd, acc[i][k]),
                    );
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let mut lanes = [0f32; UNIT];
            for (k, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(lanes.as_mut_ptr().add(k * STRIP), *acc);
            }
            dst.put(r0 + i, &lanes);
        }
    }

    /// [`Self::unit_avx2`] with AVX-512 VNNI: a group's 32 outputs in two registers.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    unsafe fn unit_vnni(&self, s: usize, a: &Activations, dst: &StripOut) {
        in_passes!(self.rows_vnni, ROWS_PER_PASS_VNNI, s, a, dst)
    }

    /// Rows `r0..r0 + R` of the unit at strip `s` with `vpdpbusd`: the unsigned nibbles times
    /// the signed activation bytes, four products into each i32 lane; the two registers of a
    /// group and the rows make independent chains, so its latency overlaps.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn rows_vnni<const R: usize>(
        &self,
        s: usize,
        a: &Activations,
        r0: usize,
        dst: &StripOut,
    ) {
        use std::arch::x86_64::*;
        debug_assert!(r0 + R <= a.rows);
        let nibble = _mm512_set1_epi8(0x0F);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (tiles, scales) = self.unit(s);
        // SAFETY (pointer arithmetic below): as in `rows_avx2`.
        let (tiles, scales) = (tiles.as_ptr(), scales.as_ptr());
        let xs: [*const i32; R] =
            std::array::from_fn(|i| a.quants.as_ptr().add((r0 + i) * self.inp) as *const i32);
        for b in 0..self.blocks {
            let mut sums = [[_mm512_setzero_si512(); 2]; R];
            for p in 0..4 {
                let group = tiles.add(b * TILE + p * GROUP);
                let v0 = _mm512_loadu_si512(group as *const __m512i);
                let v1 = _mm512_loadu_si512(group.add(64) as *const __m512i);
                prefetch(group.wrapping_add(PREFETCH));
                prefetch(group.wrapping_add(PREFETCH + 64));
                let lo0 = _mm512_and_si512(v0, nibble);
                let hi0 = _mm512_and_si512(_mm512_srli_epi16::<4>(v0), nibble);
                let lo1 = _mm512_and_si512(v1, nibble);
                let hi1 = _mm512_and_si512(_mm512_srli_epi16::<4>(v1), nibble);
                let word = b * BLOCK / 4 + 2 * p;
                for i in 0..R {
                    let x0 = _mm512_set1_epi32(xs[i].add(word).read_unaligned());
                    let x1 = _mm512_set1_epi32(xs[i].add(word + 1).read_unaligned());
                    sums[i][0] = _mm512_dpbusd_epi32(sums[i][0], lo0, x0);
                    sums[i][1] = _mm512_dpbusd_epi32(sums[i][1], lo1, x0);
                    sums[i][0] = _mm512_dpbusd_epi32(sums[i][0], hi0, x1);
                    sums[i][1] = _mm512_dpbusd_epi32(sums[i][1], hi1, x1);
                }
            }
            let sc = scales.add(b * 2 * UNIT);
            let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(sc as *const __m256i));
            let d1 = _mm512_cvtph_ps(_mm256_loadu_si256(sc.add(2 * STRIP) as *const __m256i));
            let m0 = _mm512_cvtph_ps(_mm256_loadu_si256(sc.add(UNIT) as *const __m256i));
            let m1 = _mm512_cvtph_ps(_mm256_loadu_si256(
                sc.add(UNIT + 2 * STRIP) as *const __m256i
            ));
            for i in 0..R {
                let at = (r0 + i) * self.blocks + b;
                let dx = _mm512_set1_ps(*a.scales.get_unchecked(at));
                let sx = _mm512_set1_ps(*a.sums.get_unchecked(at));
                let dot0 = _mm512_cvtepi32_ps(sums[i][0]);
                let dot1 = _mm512_cvtepi32_ps(sums[i][1]);
                let inner0 = _mm512_fmadd_ps(dot0, _mm512_mul_ps(d0, dx), acc[i][0]);
                let inner1 = _mm512_fmadd_ps(dot1, _mm512_mul_ps(d1, dx), acc[i][1]);
                acc[i][0] = _mm512_fmadd_ps(m0, sx, inner0);
                acc[i][1] = _mm512_fmadd_ps(m1, sx, inner1);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let mut lanes = [0f32; UNIT];
            _mm512_storeu_ps(lanes.as_mut_ptr(), acc[0]);
            _mm512_storeu_ps(lanes.as_mut_ptr().add(2 * STRIP), acc[1]);
            dst.put(r0 + i, &lanes);
        }
    }
}

impl StripKernels for Q4Weights {
    fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    fn extra(_: Option<CpuKernel>) -> Extra {
        Extra::Sums
    }

    fn plain(&self, s: usize, a: &Activations, dst: &StripOut) {
        self.unit_plain(s, a, dst)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn avx2(&self, s: usize, a: &Activations, dst: &StripOut) {
        self.unit_avx2(s, a, dst)
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn vnni(&self, s: usize, a: &Activations, dst: &StripOut) {
        self.unit_vnni(s, a, dst)
    }
}
#[cfg(test)]
mod tests {
    use super::super::int8::tests::random;
    use super::*;
    use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    fn sq_err(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
    }

    /// The search never does worse than Q4_1's own min/max rounding (candle's), and on
    /// uniform and bell-shaped values it does better overall.
    #[test]
    fn search_beats_q4_1_rounding() {
        for shaped in [false, true] {
            let mut w = random(64 * 256, 7);
            if shaped {
                let extra = random(w.len(), 8);
                for (w, e) in w.iter_mut().zip(extra) {
                    *w = (*w + e) * (0.5 + w.abs());
                }
            }
            let t = Tensor::from_vec(w.clone(), (64, 256), &Device::Cpu).unwrap();
            let theirs: Vec<f32> = QTensor::quantize(&t, GgmlDType::Q4_1)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut ours = Vec::with_capacity(w.len());
            for (xs, theirs) in w.chunks_exact(BLOCK).zip(theirs.chunks_exact(BLOCK)) {
                let block = Q4Block::quantize(xs);
                let deq = block.dequantize();
                assert!(
                    sq_err(&deq, xs) <= sq_err(theirs, xs) * (1.0 + 1e-4) + 1e-12,
                    "a block worse than min/max rounding"
                );
                ours.extend_from_slice(&deq);
            }
            let (e_ours, e_theirs) = (sq_err(&ours, &w), sq_err(&theirs, &w));
            eprintln!(
                "shaped {shaped}: squared error {:.4} of Q4_1's",
                e_ours / e_theirs
            );
            assert!(
                e_ours < 0.85 * e_theirs,
                "shaped {shaped}: squared error {e_ours} against Q4_1's {e_theirs}"
            );
        }
    }

    #[test]
    fn constant_and_odd_blocks_quantize() {
        for xs in [[0.0f32; BLOCK], [3.5; BLOCK], [-1e-30; BLOCK]] {
            let deq = Q4Block::quantize(&xs).dequantize();
            for (y, x) in deq.iter().zip(xs) {
                assert!((y - x).abs() <= 1e-3 * (1.0 + x.abs()), "{y} for {x}");
            }
        }
    }

    /// The kernel against candle's Q4_1 kernel on the very same blocks (`to_ggml`): the same
    /// integer sums, so only the order of f32 additions may differ. Shapes cover partial
    /// strips, every row count of a pass and more than one pass.
    #[test]
    fn strips_compute_candles_q4_1_sums() {
        for (out, inp) in [(8, 64), (13, 64), (40, 128), (67, 256)] {
            let w = random(out * inp, out as u64 + 100);
            let mine = Q4Weights::quantize(&w, out, inp).unwrap();
            // The packing keeps every block as quantized.
            for o in [0, out / 2, out - 1] {
                let xs = &w[o * inp..][..BLOCK];
                assert_eq!(mine.block(o, 0), Q4Block::quantize(xs));
            }
            let q = qtensor_from_ggml(
                GgmlDType::Q4_1,
                mine.to_ggml().bytes(),
                vec![out, inp],
                &Device::Cpu,
            )
            .unwrap();
            let reference = QMatMul::from_qtensor(q).unwrap();
            for rows in [1, 2, 3, 4, 5, 9, 17] {
                let x = random(rows * inp, (rows * 31 + inp) as u64);
                let xt = Tensor::from_vec(x.clone(), (rows, inp), &Device::Cpu).unwrap();
                let want: Vec<f32> = reference
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                // The plain code everywhere, each vector kernel where the CPU has it.
                for kernel in CpuKernel::all_here() {
                    let got = mine.matmul_with(&x, rows, kernel).unwrap();
                    assert_eq!(got.len(), want.len());
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "{kernel:?}: [{out}, {inp}] x {rows} rows, output {i}: {g} against {w}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(Q4Weights::quantize(&[0.0; 40], 1, 40).is_err());
        assert!(Q4Weights::quantize(&[], 1, 0).is_err());
        let w = Q4Weights::quantize(&[0.5; 64], 2, 32).unwrap();
        assert!(w.matmul(&[0.0; 31], 1).is_err());
        assert_eq!(w.matmul(&[1.0; 32], 1).unwrap().len(), 2);
    }
}
