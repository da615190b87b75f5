//! Int8 weights for `--quant q8` (and q4's int8 projections) on x86 CPUs: the blocks and
//! rounding of ggml's Q8_0 (32 values, one f16 scale each), packed in units of 32 outputs so
//! that one pass over a unit's contiguous weights serves up to six activation rows from
//! registers, by AVX2's `maddubs` or, where the CPU has it, AVX-512 VNNI's `vpdpbusd`.
//!
//! candle's own Q8_0 kernel has a packed VNNI path, but on a CPU without VNNI it multiplies one
//! activation row at a time: the flow head's six rows cost six times one row (14 ms against
//! 2.7 ms here for a [9216, 3072] matrix on a 2-core Zen 2). With VNNI it is still slower than
//! these strips (bench checkpoint on a 2-core Zen 4: flow head 113 ms a frame against 81 ms,
//! prefill 0.67 s against 0.39 s). The sums are Q8_0's sums: each block's integer dot product
//! is exact, only the order of the f32 additions differs.

use candle_core::Result;
use half::f16;
use rayon::prelude::*;

/// Outputs per strip: one 256-bit register of i32 lanes.
pub const STRIP: usize = 8;
/// Values per block, each block with its own scale (as Q8_0).
pub const BLOCK: usize = 32;
/// Activation rows per pass over a strip's weights: each row holds one register of sums.
const ROWS_PER_PASS: usize = 6;
/// The same with AVX-512 VNNI (8 was slower: 161 rows at 320 against 340 G products a
/// second, bench-sized matrix, 2-core Zen 4).
const ROWS_PER_PASS_VNNI: usize = 6;
/// How far ahead of the weights being read the kernels ask for the next ones (bytes): one
/// prefetch per 64-byte line. Without it, with six rows per pass, the flow head's weight
/// stream stalls on memory (bench checkpoint, Zen 4, q8 flow head: 135 ms a frame without,
/// 83 ms with 8 KiB; 4 to 32 KiB were level, 2 KiB was 13 % slower).
pub(super) const PREFETCH: usize = 8192;

/// Which kernel the CPU's quantized projections use, decided once per process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuKernel {
    /// This module's and [`int4`](super::int4)'s units with AVX-512 VNNI's `vpdpbusd`, two
    /// strips (16 outputs) per 512-bit register.
    Vnni,
    /// The same units with AVX2's `maddubs`, a strip at a time (x86-64 without VNNI).
    Avx2,
    /// candle's Q8_0 and Q4_1 kernels (other architectures, or on request).
    Candle,
}

impl CpuKernel {
    /// The fastest this CPU has; `VOXTRALD_KERNEL=vnni|avx2|candle` overrides it (for measuring
    /// one against another; a choice the CPU cannot run falls back to the next one down).
    pub fn for_this_cpu() -> Self {
        static KERNEL: std::sync::OnceLock<CpuKernel> = std::sync::OnceLock::new();
        *KERNEL.get_or_init(|| {
            let best = Self::best();
            let choice = match std::env::var("VOXTRALD_KERNEL").as_deref() {
                Ok("candle") => Self::Candle,
                Ok("avx2") if avx2() => Self::Avx2,
                _ => best,
            };
            tracing::debug!(kernel = ?choice, "quantized CPU kernel");
            choice
        })
    }

    /// The fastest this CPU can run, without the override.
    fn best() -> Self {
        if avx2() && vnni() {
            Self::Vnni
        } else if avx2() {
            Self::Avx2
        } else {
            Self::Candle
        }
    }

    /// `kernel` if this CPU can run it, else `None` (plain code), for `rows` activation rows:
    /// one row (a backbone step) is bound by memory, and the AVX2 kernel's one stream of
    /// weights per thread reads faster than the VNNI kernel's two (bench checkpoint, Zen 4:
    /// q8 backbone step 11.4 against 15.1 ms, q4 11.2 against 12.7).
    pub(super) fn for_rows(kernel: Option<Self>, rows: usize) -> Option<Self> {
        match kernel? {
            Self::Vnni if avx2() && vnni() && rows > 1 => Some(Self::Vnni),
            Self::Vnni | Self::Avx2 if avx2() => Some(Self::Avx2),
            _ => None,
        }
    }

    /// The kernels this CPU can run, down to the plain code (`None`), for tests.
    #[cfg(test)]
    pub(super) fn all_here() -> Vec<Option<Self>> {
        let mut all = vec![None];
        if avx2() {
            all.push(Some(Self::Avx2));
        }
        if avx2() && vnni() {
            all.push(Some(Self::Vnni));
        }
        all
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) fn avx2() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn avx2() -> bool {
    false
}

/// AVX-512 VNNI, with the byte operations (BW). AVX-VNNI alone (client CPUs without AVX-512)
/// takes the AVX2 kernel.
#[cfg(target_arch = "x86_64")]
fn vnni() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn vnni() -> bool {
    false
}

/// Calls `$kernel::<R>(s, a, r0, dst)` for every row of `a` in passes of up to `$max` rows (a
/// const from 4 to 6): each kernel is instantiated for each row count a pass can have.
macro_rules! in_passes {
    ($this:ident.$kernel:ident, $max:expr, $s:expr, $a:expr, $dst:expr) => {{
        let mut r = 0;
        while r < $a.rows {
            let n = ($max).min($a.rows - r);
            match n {
                1 => $this.$kernel::<1>($s, $a, r, $dst),
                2 => $this.$kernel::<2>($s, $a, r, $dst),
                3 => $this.$kernel::<3>($s, $a, r, $dst),
                4 if $max > 4 => $this.$kernel::<4>($s, $a, r, $dst),
                5 if $max > 5 => $this.$kernel::<5>($s, $a, r, $dst),
                _ => $this.$kernel::<{ $max }>($s, $a, r, $dst),
            }
            r += n;
        }
    }};
}
pub(super) use in_passes;

/// Outputs per unit of [`Q8Weights`]: four strips, two 512-bit registers of i32 lanes.
pub const UNIT: usize = 4 * STRIP;

/// A weight matrix `[out, inp]` in units of 32 outputs (four strips of eight).
///
/// Per unit, block and group of 4 inputs the 32 outputs' 4 bytes are contiguous (128 bytes,
/// output-major): VNNI reads a group as two whole 512-bit registers, AVX2 a strip's quarter
/// as one 256-bit register, and a pass over a unit reads one contiguous stream.
pub struct Q8Weights {
    out: usize,
    inp: usize,
    blocks: usize,
    /// Per unit, block and group of 4 inputs: 32 outputs x 4 bytes (128 bytes).
    quants: Vec<i8>,
    /// Per unit and block: the 32 outputs' scales (f16 bits).
    scales: Vec<u16>,
}

impl std::fmt::Debug for Q8Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Weights[{}, {}]", self.out, self.inp)
    }
}

/// Q8_0's rounding: scale `max|x| / 127`, values `round(x / scale)` (ties away from zero).
pub(super) fn quantize_block(xs: &[f32], q: &mut [i8]) -> f32 {
    let amax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (y, &x) in q.iter_mut().zip(xs) {
        // The clamp matters only for a subnormal scale, whose inverse overflows.
        *y = round_away(x * id).clamp(-127, 127) as i8;
    }
    d
}

/// `f32::round` (half away from zero) for `|x| < 2^31`, without the call to `roundf` that
/// `round` costs on CPUs without SSE4.1 as the build targets: adding the largest f32 below
/// one half, with `x`'s sign, and truncating gives the same integer for every f32 (it is
/// how LLVM lowers `round` where it has a truncating instruction).
#[inline]
pub(super) fn round_away(x: f32) -> i32 {
    (x + 0.499_999_97_f32.copysign(x)) as i32
}

impl Q8Weights {
    /// `w` is `[out, inp]`, row-major; `inp` is a multiple of [`BLOCK`]. Units are packed in
    /// parallel.
    pub fn quantize(w: &[f32], out: usize, inp: usize) -> Result<Self> {
        if inp == 0 || !inp.is_multiple_of(BLOCK) || w.len() != out * inp {
            candle_core::bail!(
                "int8 weights: {} values for [{out}, {inp}] (inputs must be a multiple of {BLOCK})",
                w.len()
            );
        }
        let blocks = inp / BLOCK;
        let units = out.div_ceil(UNIT);
        let mut quants = vec![0i8; units * blocks * UNIT * BLOCK];
        let mut scales = vec![0u16; units * blocks * UNIT];
        quants
            .par_chunks_mut(blocks * UNIT * BLOCK)
            .zip(scales.par_chunks_mut(blocks * UNIT))
            .enumerate()
            .for_each(|(u, (quants, scales))| {
                let mut q = [0i8; BLOCK];
                for lane in 0..UNIT.min(out.saturating_sub(u * UNIT)) {
                    let row = &w[(u * UNIT + lane) * inp..][..inp];
                    for (b, xs) in row.chunks_exact(BLOCK).enumerate() {
                        let d = quantize_block(xs, &mut q);
                        let tile = &mut quants[b * UNIT * BLOCK..][..UNIT * BLOCK];
                        for (k, &v) in q.iter().enumerate() {
                            tile[(k / 4) * UNIT * 4 + lane * 4 + k % 4] = v;
                        }
                        scales[b * UNIT + lane] = f16::from_f32(d).to_bits();
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

    /// Bytes of one unit's weights (all blocks).
    fn unit_bytes(&self) -> usize {
        self.blocks * UNIT * BLOCK
    }

    /// The unit whose first strip is `s` (kernels are called a unit at a time): its weights
    /// and scales.
    fn unit(&self, s: usize) -> (&[i8], &[u16]) {
        let u = s / 4;
        (
            &self.quants[u * self.unit_bytes()..][..self.unit_bytes()],
            &self.scales[u * self.blocks * UNIT..][..self.blocks * UNIT],
        )
    }

    /// The same sums in plain code (see [`StripKernels::plain`]).
    fn unit_plain(&self, s: usize, a: &Activations, y: &StripOut) {
        let (tiles, scales) = self.unit(s);
        for r in 0..a.rows {
            let mut acc = [0f32; UNIT];
            for b in 0..self.blocks {
                let tile = &tiles[b * UNIT * BLOCK..][..UNIT * BLOCK];
                let xq = &a.quants[r * self.inp + b * BLOCK..][..BLOCK];
                let mut sums = [0i32; UNIT];
                for (k, &x) in xq.iter().enumerate() {
                    for (lane, sum) in sums.iter_mut().enumerate() {
                        *sum += x as i32 * tile[(k / 4) * UNIT * 4 + lane * 4 + k % 4] as i32;
                    }
                }
                let dx = a.scales[r * self.blocks + b];
                for (lane, acc) in acc.iter_mut().enumerate() {
                    let dw = f16::from_bits(scales[b * UNIT + lane]).to_f32();
                    *acc += sums[lane] as f32 * (dw * dx);
                }
            }
            y.put(r, &acc);
        }
    }

    /// One unit for every row, [`ROWS_PER_PASS`] rows per pass over its weights.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unit_avx2(&self, s: usize, a: &Activations, dst: &StripOut) {
        in_passes!(self.rows_avx2, ROWS_PER_PASS, s, a, dst)
    }

    /// Rows `r0..r0 + R` of the unit at strip `s`, block by block, each block a strip at a
    /// time (its 1 KiB stays in L1). Per group of 4 inputs, each row's 4 activation bytes are
    /// broadcast; `maddubs` takes their magnitudes (unsigned) against the weights with the
    /// activations' signs applied, so no pair sum can exceed 2 * 127 * 127 in i16.
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
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        let (tiles, scales) = self.unit(s);
        // SAFETY (pointer arithmetic below): a unit holds `blocks` tiles of UNIT * BLOCK bytes
        // and `blocks * UNIT` scales; each activation row holds `inp` bytes.
        let (tiles, scales) = (tiles.as_ptr(), scales.as_ptr());
        let signed: [*const i32; R] =
            std::array::from_fn(|i| a.quants.as_ptr().add((r0 + i) * self.inp) as *const i32);
        let magnitude: [*const i32; R] =
            std::array::from_fn(|i| a.magnitudes.as_ptr().add((r0 + i) * self.inp) as *const i32);
        let dx: [*const f32; R] =
            std::array::from_fn(|i| a.scales.as_ptr().add((r0 + i) * self.blocks));
        for b in 0..self.blocks {
            // `k` picks the strip's weights and scales as well as its accumulators.
            #[allow(clippy::needless_range_loop)]
            for k in 0..4 {
                let mut sums = [_mm256_setzero_si256(); R];
                for g in 0..BLOCK / 4 {
                    let at = b * BLOCK / 4 + g;
                    let group = tiles.add(at * UNIT * 4);
                    let w = _mm256_loadu_si256(group.add(k * STRIP * 4) as *const __m256i);
                    if k % 2 == 0 {
                        prefetch(group.wrapping_add(k * STRIP * 4 + PREFETCH));
                    }
                    for i in 0..R {
                        let xs = _mm256_set1_epi32(signed[i].add(at).read_unaligned());
                        let xm = _mm256_set1_epi32(magnitude[i].add(at).read_unaligned());
                        let p = _mm256_maddubs_epi16(xm, _mm256_sign_epi8(w, xs));
                        sums[i] = _mm256_add_epi32(sums[i], _mm256_madd_epi16(p, ones));
                    }
                }
                let dw = _mm256_cvtph_ps(_mm_loadu_si128(
                    scales.add(b * UNIT + k * STRIP) as *const __m128i
                ));
                for i in 0..R {
                    let d = _mm256_mul_ps(dw, _mm256_set1_ps(*dx[i].add(b)));
                    acc[i][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[i]), d, acc[i][k]);
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
        if a.rows <= ROWS_PER_PASS_VNNI {
            return in_passes!(self.rows_vnni, ROWS_PER_PASS_VNNI, (s, &[]), a, dst);
        }
        // Several passes (a prefill, or several streams' flow heads): the 128 × weight sums
        // once per block, not per pass, into this thread's buffer.
        EXCESS.with(|kept| {
            let mut fresh = Vec::new();
            let mut kept = kept.try_borrow_mut();
            let excess = kept.as_deref_mut().unwrap_or(&mut fresh);
            self.excess_vnni(s, excess);
            in_passes!(self.rows_vnni, ROWS_PER_PASS_VNNI, (s, excess), a, dst)
        })
    }

    /// Per block of the unit at strip `s`: 128 × the sum of each output's weights, as
    /// [`Self::rows_vnni`] takes off (two registers a block).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    unsafe fn excess_vnni(&self, s: usize, all: &mut Vec<std::arch::x86_64::__m512i>) {
        use std::arch::x86_64::*;
        let offset = _mm512_set1_epi8(-128);
        let (tiles, _) = self.unit(s);
        all.clear();
        for b in 0..self.blocks {
            let mut excess = [_mm512_setzero_si512(); 2];
            for g in 0..BLOCK / 4 {
                // SAFETY: as in `rows_vnni`.
                let group = tiles.as_ptr().add((b * BLOCK / 4 + g) * UNIT * 4);
                for (h, e) in excess.iter_mut().enumerate() {
                    let w = _mm512_loadu_si512(group.add(h * 64) as *const __m512i);
                    *e = _mm512_dpbusd_epi32(*e, offset, w);
                }
            }
            all.extend(excess);
        }
    }

    /// Rows `r0..r0 + R` of the unit at strip `s`. `vpdpbusd` multiplies unsigned by signed
    /// bytes: the activations come offset by 128 (unsigned, one byte per input, so six rows
    /// of a 3072-wide input stay in L1), and one more `vpdpbusd` per group and register,
    /// shared by all rows, sums 128 × the weights to take off at the end of each block
    /// (`known` holds them precomputed for a prefill's many passes). A broadcast activation
    /// word serves 32 outputs.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn rows_vnni<const R: usize>(
        &self,
        (s, known): (usize, &[std::arch::x86_64::__m512i]),
        a: &Activations,
        r0: usize,
        dst: &StripOut,
    ) {
        if known.is_empty() {
            self.rows_vnni_with::<R, false>(s, known, a, r0, dst)
        } else {
            self.rows_vnni_with::<R, true>(s, known, a, r0, dst)
        }
    }

    /// [`Self::rows_vnni`]; with `KNOWN`, the blocks' excess comes from `known`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn rows_vnni_with<const R: usize, const KNOWN: bool>(
        &self,
        s: usize,
        known: &[std::arch::x86_64::__m512i],
        a: &Activations,
        r0: usize,
        dst: &StripOut,
    ) {
        use std::arch::x86_64::*;
        debug_assert!(r0 + R <= a.rows && (!KNOWN || known.len() == 2 * self.blocks));
        let offset = _mm512_set1_epi8(-128);
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        let (tiles, scales) = self.unit(s);
        // SAFETY (pointer arithmetic below): a unit holds `blocks` tiles of UNIT * BLOCK bytes
        // and `blocks * UNIT` scales; each row of `biased` holds `inp` bytes, of `scales`
        // `blocks` values.
        let (tiles, scales) = (tiles.as_ptr(), scales.as_ptr());
        let biased: [*const i32; R] =
            std::array::from_fn(|i| a.biased.as_ptr().add((r0 + i) * self.inp) as *const i32);
        let dx: [*const f32; R] =
            std::array::from_fn(|i| a.scales.as_ptr().add((r0 + i) * self.blocks));
        for b in 0..self.blocks {
            let mut sums = [[_mm512_setzero_si512(); 2]; R];
            let (mut e0, mut e1) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for g in 0..BLOCK / 4 {
                let group = tiles.add((b * BLOCK / 4 + g) * UNIT * 4);
                let w0 = _mm512_loadu_si512(group as *const __m512i);
                let w1 = _mm512_loadu_si512(group.add(64) as *const __m512i);
                if !KNOWN {
                    prefetch(group.wrapping_add(PREFETCH));
                    prefetch(group.wrapping_add(PREFETCH + 64));
                    e0 = _mm512_dpbusd_epi32(e0, offset, w0);
                    e1 = _mm512_dpbusd_epi32(e1, offset, w1);
                }
                for i in 0..R {
                    let x = _mm512_set1_epi32(biased[i].add(b * BLOCK / 4 + g).read_unaligned());
                    sums[i][0] = _mm512_dpbusd_epi32(sums[i][0], x, w0);
                    sums[i][1] = _mm512_dpbusd_epi32(sums[i][1], x, w1);
                }
            }
            if KNOWN {
                e0 = *known.get_unchecked(2 * b);
                e1 = *known.get_unchecked(2 * b + 1);
            }
            let d0 = _mm512_cvtph_ps(_mm256_loadu_si256(scales.add(b * UNIT) as *const __m256i));
            let d1 = _mm512_cvtph_ps(_mm256_loadu_si256(
                scales.add(b * UNIT + 2 * STRIP) as *const __m256i
            ));
            for i in 0..R {
                let x = _mm512_set1_ps(*dx[i].add(b));
                let t0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums[i][0], e0));
                let t1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums[i][1], e1));
                acc[i][0] = _mm512_fmadd_ps(t0, _mm512_mul_ps(d0, x), acc[i][0]);
                acc[i][1] = _mm512_fmadd_ps(t1, _mm512_mul_ps(d1, x), acc[i][1]);
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

/// A strip-packed weight matrix with its kernels, run by [`StripKernels::matmul`].
pub trait StripKernels: Sync {
    /// `(out, inp)`.
    fn dims(&self) -> (usize, usize);

    /// What `kernel` reads of the activations beyond their quantized values.
    #[doc(hidden)]
    fn extra(kernel: Option<CpuKernel>) -> Extra;

    /// The unit of [`UNIT`] outputs whose first strip is `s`, in plain code: the fallback,
    /// and what the vector kernels are tested against. Weights are padded to whole units.
    #[doc(hidden)]
    fn plain(&self, s: usize, a: &Activations, dst: &StripOut);

    /// The same unit with AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn avx2(&self, s: usize, a: &Activations, dst: &StripOut);

    /// The same unit with AVX-512 VNNI.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA, F16C and AVX-512 F/BW/VNNI.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn vnni(&self, s: usize, a: &Activations, dst: &StripOut);

    /// `x` `[rows, inp]` (row-major) times the weights' transpose: `[rows, out]`, by this
    /// CPU's kernel ([`CpuKernel::for_this_cpu`]; plain code where that is candle's).
    fn matmul(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        self.matmul_with(x, rows, Some(CpuKernel::for_this_cpu()))
    }

    /// [`Self::matmul`] into `y` (`rows * out` values), which it overwrites: no allocation
    /// once this thread's activation buffers are large enough.
    fn matmul_into(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        self.matmul_into_with(x, rows, Some(CpuKernel::for_this_cpu()), y)
    }

    /// By `kernel` if the CPU has it (see [`CpuKernel::for_rows`]), else by plain code.
    #[doc(hidden)]
    fn matmul_with(&self, x: &[f32], rows: usize, kernel: Option<CpuKernel>) -> Result<Vec<f32>> {
        let mut y = vec![0f32; rows * self.dims().0];
        self.matmul_into_with(x, rows, kernel, &mut y)?;
        Ok(y)
    }

    #[doc(hidden)]
    fn matmul_into_with(
        &self,
        x: &[f32],
        rows: usize,
        kernel: Option<CpuKernel>,
        y: &mut [f32],
    ) -> Result<()> {
        let kernel = CpuKernel::for_rows(kernel, rows);
        let (out, inp) = self.dims();
        by_strips(
            (x, rows, inp, out),
            (Self::extra(kernel), UNIT / STRIP),
            y,
            |s, acts, y| {
                #[cfg(target_arch = "x86_64")]
                match kernel {
                    // SAFETY: the CPU has these features (`for_rows` checked).
                    Some(CpuKernel::Vnni) => return unsafe { self.vnni(s, acts, y) },
                    // SAFETY: as above.
                    Some(CpuKernel::Avx2) => return unsafe { self.avx2(s, acts, y) },
                    _ => {}
                }
                self.plain(s, acts, y)
            },
        )
    }
}

impl StripKernels for Q8Weights {
    fn dims(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    fn extra(kernel: Option<CpuKernel>) -> Extra {
        match kernel {
            Some(CpuKernel::Vnni) => Extra::Biased,
            _ => Extra::Magnitudes,
        }
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

/// Asks for the cache line at `at` (a hint: any address is allowed, none is dereferenced).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn prefetch<T>(at: *const T) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    // SAFETY: prefetching never faults, whatever the address.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(at as *const i8) }
}

/// What a kernel reads beyond the quantized activations and their scales.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extra {
    /// The values' magnitudes, for the unsigned side of AVX2's int8 × int8 products.
    Magnitudes,
    /// The values plus 128 (unsigned), for VNNI's int8 × int8 products.
    Biased,
    /// Q8_1's per-block sums, which 4-bit minimums multiply.
    Sums,
}

/// Activation rows quantized per block as Q8_0 (and Q8_1) quantize them, with the [`Extra`]
/// their kernel reads (the other one is left empty).
#[derive(Default)]
pub struct Activations {
    pub(super) rows: usize,
    pub(super) quants: Vec<i8>,
    pub(super) magnitudes: Vec<u8>,
    pub(super) biased: Vec<u8>,
    /// Per row and block, the scale as Q8_0 stores it (through f16).
    pub(super) scales: Vec<f32>,
    /// Per row and block, Q8_1's `s`: the scale times the sum of the block's values, in f16
    /// arithmetic as ggml computes it (the 4-bit kernels' minimums multiply it).
    pub(super) sums: Vec<f32>,
}

impl Activations {
    /// Quantizes `x` `[rows, inp]` into buffers kept from the last call (no allocation once
    /// they are large enough), with `extra` only.
    fn fill(&mut self, x: &[f32], rows: usize, inp: usize, extra: Extra) {
        self.rows = rows;
        let per_row = inp / BLOCK;
        let blocks = rows * per_row;
        self.quants.resize(rows * inp, 0);
        self.scales.resize(blocks, 0.0);
        let (magnitudes, biased, sums) = match extra {
            Extra::Magnitudes => (rows * inp, 0, 0),
            Extra::Biased => (0, rows * inp, 0),
            Extra::Sums => (0, 0, blocks),
        };
        self.magnitudes.resize(magnitudes, 0);
        self.biased.resize(biased, 0);
        self.sums.resize(sums, 0.0);
        let bytes = match extra {
            Extra::Magnitudes => &mut self.magnitudes[..],
            Extra::Biased => &mut self.biased[..],
            Extra::Sums => &mut [][..],
        };
        if rows < PARALLEL_FILL_ROWS {
            return fill_rows(
                x,
                &mut self.quants,
                &mut self.scales,
                bytes,
                &mut self.sums,
                extra,
            );
        }
        // A prefill's rows (many thousands of blocks): both cores, a row at a time.
        x.par_chunks(inp)
            .zip(self.quants.par_chunks_mut(inp))
            .zip(self.scales.par_chunks_mut(per_row))
            .zip(split_rows(bytes, rows, inp))
            .zip(split_rows(&mut self.sums, rows, per_row))
            .for_each(|((((x, q), scales), bytes), sums)| {
                fill_rows(x, q, scales, bytes, sums, extra)
            });
    }
}

/// `b` in `rows` slices of `len`, or `rows` empty slices if `b` is empty.
fn split_rows<T>(b: &mut [T], rows: usize, len: usize) -> Vec<&mut [T]> {
    if b.is_empty() {
        (0..rows).map(|_| &mut [][..]).collect()
    } else {
        b.chunks_mut(len).collect()
    }
}

/// From this many rows on, [`Activations::fill`] quantizes rows in parallel.
const PARALLEL_FILL_ROWS: usize = 16;

/// Quantizes the blocks of `x` into `quants` and `scales`, with `extra` into `bytes`
/// (magnitudes or biased values) or `sums` (the other one empty).
fn fill_rows(
    x: &[f32],
    quants: &mut [i8],
    scales: &mut [f32],
    bytes: &mut [u8],
    sums: &mut [f32],
    extra: Extra,
) {
    for (b, (xs, q)) in x
        .chunks_exact(BLOCK)
        .zip(quants.chunks_exact_mut(BLOCK))
        .enumerate()
    {
        let d16 = f16::from_f32(quantize_block(xs, q));
        scales[b] = d16.to_f32();
        match extra {
            Extra::Magnitudes => {
                let m = &mut bytes[b * BLOCK..][..BLOCK];
                for (m, &q) in m.iter_mut().zip(q.iter()) {
                    *m = q.unsigned_abs();
                }
            }
            Extra::Biased => {
                let u = &mut bytes[b * BLOCK..][..BLOCK];
                for (u, &q) in u.iter_mut().zip(q.iter()) {
                    *u = (q as u8) ^ 0x80;
                }
            }
            Extra::Sums => {
                let total: i32 = q.iter().map(|&v| v as i32).sum();
                sums[b] = (f16::from_f32(total as f32) * d16).to_f32();
            }
        }
    }
}

thread_local! {
    /// Each calling thread's activation buffers, reused from call to call.
    static SCRATCH: std::cell::RefCell<Activations> = Default::default();
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    /// Each worker's per-block weight sums for multi-pass VNNI calls, reused.
    static EXCESS: std::cell::RefCell<Vec<std::arch::x86_64::__m512i>> = Default::default();
}

/// The output `[rows, out]` (row-major) as the parallel strips share it.
struct SharedOut {
    ptr: *mut f32,
    rows: usize,
    out: usize,
}

// SAFETY: only `by_strips` makes one, over a buffer that outlives its parallel loop, and it
// hands each strip index (visited once) a `StripOut` that writes that strip's columns alone,
// so no two threads write the same element.
unsafe impl Sync for SharedOut {}

/// Where one call writes its outputs: the eight columns of each of its strips (one, or two
/// adjacent ones for the 512-bit kernels), in every row.
pub struct StripOut<'a> {
    shared: &'a SharedOut,
    strip: usize,
    strips: usize,
}

impl StripOut<'_> {
    /// Row `r`'s outputs of these strips, eight lanes a strip: lanes past this handle's
    /// strips (a kernel's padding strip) or past `out` (a last, partial strip) are dropped.
    #[inline]
    pub(super) fn put(&self, r: usize, lanes: &[f32]) {
        let SharedOut { ptr, rows, out } = *self.shared;
        let first = self.strip * STRIP;
        assert!(r < rows && first < out, "strip output out of range");
        let n = lanes.len().min(self.strips * STRIP).min(out - first);
        // SAFETY: in bounds (checked above); these strips' columns are written by this handle
        // only (see `SharedOut`).
        unsafe { std::ptr::copy_nonoverlapping(lanes.as_ptr(), ptr.add(r * out + first), n) }
    }
}

/// `x` `[rows, inp]` quantized once (into this thread's scratch), then `strip(s, acts, y)`
/// in parallel for every `width` strips of eight outputs (a unit: `y` covers strips
/// `s..s + width`, or fewer at the end), into `y` `[rows, out]`, which it overwrites. Nothing
/// is allocated once the scratch is large enough.
pub(super) fn by_strips(
    (x, rows, inp, out): (&[f32], usize, usize, usize),
    (extra, width): (Extra, usize),
    y: &mut [f32],
    strip: impl Fn(usize, &Activations, &StripOut) + Sync,
) -> Result<()> {
    if x.len() != rows * inp || inp == 0 || !inp.is_multiple_of(BLOCK) {
        candle_core::bail!(
            "quantized matmul: {} values for {rows} rows of {inp}",
            x.len()
        );
    }
    if y.len() != rows * out {
        candle_core::bail!(
            "quantized matmul: room for {} values, not {rows} x {out}",
            y.len()
        );
    }
    let shared = SharedOut {
        ptr: y.as_mut_ptr(),
        rows,
        out,
    };
    let strips = out.div_ceil(STRIP);
    let width = width.max(1);
    let run = |acts: &Activations| {
        (0..strips.div_ceil(width))
            .into_par_iter()
            .with_min_len(16 / width)
            .for_each(|unit| {
                let s = unit * width;
                let dst = StripOut {
                    shared: &shared,
                    strip: s,
                    strips: width.min(strips - s),
                };
                strip(s, acts, &dst)
            });
    };
    SCRATCH.with(|scratch| {
        let mut fresh = Activations::default();
        let mut kept = scratch.try_borrow_mut();
        // Re-entered on this thread (from inside another parallel loop): fresh buffers.
        let acts = kept.as_deref_mut().unwrap_or(&mut fresh);
        acts.fill(x, rows, inp, extra);
        run(acts)
    });
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// Deterministic values in [-1, 1) (also the 4-bit kernel's tests').
    pub(in crate::model) fn random(n: usize, seed: u64) -> Vec<f32> {
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
            for rows in [1, 2, 5, 6, 7, 13, 17] {
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
                            (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                            "{kernel:?}: [{out}, {inp}] x {rows} rows, output {i}: {g} against {w}"
                        );
                    }
                }
            }
        }
    }

    /// A block of subnormal values has a scale whose inverse overflows: the values saturate
    /// (with their signs) instead of wrapping.
    #[test]
    fn subnormal_blocks_keep_their_signs() {
        let mut xs = [1e-39f32; BLOCK];
        xs[3] = -1e-39;
        let mut q = [0i8; BLOCK];
        quantize_block(&xs, &mut q);
        assert!(q.iter().all(|&v| (-127..=127).contains(&v)));
        assert!(q[0] > 0 && q[3] < 0, "{q:?}");
    }

    #[test]
    fn round_away_is_f32_round() {
        let mut cases = vec![
            0.0f32, -0.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 126.5, -126.5, 127.0,
        ];
        for x in [0.5f32, 1.5, 2.5, 63.5, 126.5] {
            cases.extend([x.next_down(), x.next_up(), -x.next_down(), -x.next_up()]);
        }
        cases.extend(random(20_000, 3).iter().map(|x| x * 130.0));
        for x in cases {
            assert_eq!(round_away(x), x.round() as i32, "{x}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(Q8Weights::quantize(&[0.0; 40], 1, 40).is_err());
        assert!(Q8Weights::quantize(&[], 1, 0).is_err());
        let w = Q8Weights::quantize(&[0.5; 64], 2, 32).unwrap();
        assert!(w.matmul(&[0.0; 31], 1).is_err());
        assert_eq!(w.matmul(&[1.0; 32], 1).unwrap().len(), 2);
    }
}
