//! A voice's frame codes `[T, 37]` and their exchange format, NumPy `.npy`: what any encoder
//! (a community-trained one, say) writes, and what `voice export` writes back.
//!
//! Inside voxtrald codes are model-side: every code carries the +2 offset of the two special
//! codes (semantic 2..=8193, acoustic 2..=22), as the backbone and `CodecDecoder` take them and
//! as vLLM-Omni's `audio_tokens` are. Files may hold either convention; see [`CodeOffset`].

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::config::{END_AUDIO, SPECIAL_CODES};

/// Codes per frame: one semantic, 36 acoustic.
pub const CODES_PER_FRAME: usize = 37;
/// Codebook sizes of the release (the tiny fixture shares them).
pub const SEMANTIC_CODES: u32 = 8192;
pub const ACOUSTIC_LEVELS: u32 = 21;
/// A voice is 1 to this many frames (the official prompt caps a reference at about 30 s).
pub const MAX_FRAMES: usize = 1024;

/// Whether the codes in a file carry the +2 offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CodeOffset {
    /// Decide from the values: any code 0 or 1 means raw codec codes, any semantic code
    /// above 8191 or acoustic code above 20 means offset codes.
    #[default]
    Auto,
    /// Raw codec codes (semantic 0..=8191, acoustic 0..=20), as an encoder emits them.
    #[value(name = "0")]
    Raw,
    /// Model-side codes with the +2 offset (semantic 2..=8193, acoustic 2..=22).
    #[value(name = "2")]
    Model,
}

/// Model-side frame codes, checked: 1..=MAX_FRAMES frames of 37 codes in range, no end frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Codes(Vec<Vec<u32>>);

impl Codes {
    /// Checks model-side frames. A trailing end-of-audio frame (`[1, 0, ..., 0]`) is dropped:
    /// the model appends its own.
    pub fn new(mut frames: Vec<Vec<u32>>) -> Result<Self> {
        let bad = |m: String| Error::InvalidCodes(m);
        if frames.last().is_some_and(|f| is_end_frame(f)) {
            frames.pop();
        }
        if frames.is_empty() {
            return Err(bad("no frames".into()));
        }
        if frames.len() > MAX_FRAMES {
            return Err(bad(format!(
                "{} frames; a voice holds at most {MAX_FRAMES} ({} s)",
                frames.len(),
                MAX_FRAMES as f32 * 0.08
            )));
        }
        let off = SPECIAL_CODES as u32;
        for (t, f) in frames.iter().enumerate() {
            if f.len() != CODES_PER_FRAME {
                return Err(bad(format!(
                    "frame {t} has {} codes, expected {CODES_PER_FRAME}",
                    f.len()
                )));
            }
            if !(off..off + SEMANTIC_CODES).contains(&f[0]) {
                return Err(bad(format!(
                    "frame {t}: semantic code {} is outside {off}..={}",
                    f[0],
                    off + SEMANTIC_CODES - 1
                )));
            }
            if let Some((j, c)) = f[1..]
                .iter()
                .enumerate()
                .find(|(_, c)| !(off..off + ACOUSTIC_LEVELS).contains(c))
            {
                return Err(bad(format!(
                    "frame {t}: acoustic code {} is {c}, outside {off}..={}",
                    j + 1,
                    off + ACOUSTIC_LEVELS - 1
                )));
            }
        }
        Ok(Self(frames))
    }

    /// Frames of a file in either convention, converted to model-side codes.
    pub fn from_file_values(frames: Vec<Vec<i64>>, offset: CodeOffset) -> Result<Self> {
        let bad = |m: String| Error::InvalidCodes(m);
        let mut frames = frames;
        // An end frame is only meaningful with offset codes; drop it before deciding.
        if frames.last().is_some_and(|f| {
            f.first() == Some(&(END_AUDIO as i64)) && f[1..].iter().all(|&c| c == 0)
        }) && offset != CodeOffset::Raw
        {
            frames.pop();
        }
        if let Some((t, v)) = frames
            .iter()
            .enumerate()
            .find_map(|(t, f)| f.iter().find(|&&c| c < 0).map(|&c| (t, c)))
        {
            return Err(bad(format!("frame {t} holds a negative code ({v})")));
        }
        let add = match offset {
            CodeOffset::Raw => SPECIAL_CODES as i64,
            CodeOffset::Model => 0,
            CodeOffset::Auto => {
                let low = frames.iter().flatten().any(|&c| c < SPECIAL_CODES as i64);
                let high = frames.iter().any(|f| {
                    f.first().is_some_and(|&c| c >= SEMANTIC_CODES as i64)
                        || f.iter().skip(1).any(|&c| c >= ACOUSTIC_LEVELS as i64)
                });
                match (low, high) {
                    (true, false) => SPECIAL_CODES as i64,
                    (false, true) => 0,
                    (true, true) => {
                        return Err(bad(
                            "the codes hold both values below 2 and values above the raw \
                             codebook sizes; they are neither raw nor offset codes"
                                .into(),
                        ))
                    }
                    (false, false) => {
                        return Err(bad(
                            "cannot tell whether the codes carry the +2 offset; pass \
                             --offset 0 (raw codec codes) or --offset 2 (offset codes)"
                                .into(),
                        ))
                    }
                }
            }
        };
        let frames = frames
            .into_iter()
            .map(|f| {
                f.into_iter()
                    .map(|c| u32::try_from(c.saturating_add(add)).unwrap_or(u32::MAX))
                    .collect()
            })
            .collect();
        Self::new(frames)
    }

    pub fn frames(&self) -> &[Vec<u32>] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Seconds of audio the codes stand for (80 ms a frame).
    pub fn seconds(&self) -> f32 {
        self.0.len() as f32 * 0.08
    }

    /// Reads `[T, 37]` (or `[37, T]`) integer codes from a `.npy` file.
    pub fn read_npy(path: &Path, offset: CodeOffset) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let frames = parse_npy(&bytes)
            .map_err(|reason| Error::InvalidCodes(format!("{}: {reason}", path.display())))?;
        Self::from_file_values(frames, offset)
            .map_err(|e| Error::InvalidCodes(format!("{}: {}", path.display(), strip(&e))))
    }

    /// The codes as `.npy` bytes: `<i8`, `[T, 37]`, model-side (+2 offset), no end frame.
    pub fn to_npy(&self) -> Vec<u8> {
        let header = format!(
            "{{'descr': '<i8', 'fortran_order': False, 'shape': ({}, {CODES_PER_FRAME}), }}",
            self.0.len()
        );
        // Magic (6) + version (2) + length (2) + header + newline, padded to 64 bytes.
        let unpadded = 10 + header.len() + 1;
        let pad = unpadded.div_ceil(64) * 64 - unpadded;
        let mut out = Vec::with_capacity(unpadded + pad + self.0.len() * CODES_PER_FRAME * 8);
        out.extend_from_slice(b"\x93NUMPY\x01\x00");
        out.extend_from_slice(&((header.len() + pad + 1) as u16).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        out.extend(std::iter::repeat_n(b' ', pad));
        out.push(b'\n');
        for c in self.0.iter().flatten() {
            out.extend_from_slice(&(*c as i64).to_le_bytes());
        }
        out
    }
}

fn strip(e: &Error) -> String {
    match e {
        Error::InvalidCodes(m) => m.clone(),
        other => other.to_string(),
    }
}

fn is_end_frame(f: &[u32]) -> bool {
    f.first() == Some(&END_AUDIO) && f[1..].iter().all(|&c| c == 0)
}

/// A `.npy` file of a 2-D integer array, as rows of `CODES_PER_FRAME` values. Accepts every
/// integer dtype NumPy writes, either byte order, C or Fortran order, `[T, 37]` or `[37, T]`.
fn parse_npy(b: &[u8]) -> std::result::Result<Vec<Vec<i64>>, String> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return Err("not a .npy file (no \\x93NUMPY magic)".into());
    }
    let (hlen, start): (usize, usize) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 if b.len() >= 12 => (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = b
        .get(start..start.saturating_add(hlen))
        .ok_or("the .npy header is cut short")?;
    let header = std::str::from_utf8(header).map_err(|_| "the .npy header is not text")?;
    let field = |key: &str| -> Option<&str> {
        let i = header.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = header[i..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = field("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or("the .npy header has no descr")?;
    let fortran = field("fortran_order")
        .map(|r| r.starts_with("True"))
        .ok_or("the .npy header has no fortran_order")?;
    let shape = field("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .ok_or("the .npy header has no shape")?;
    let dims: Vec<usize> = shape
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape ({shape})"))
        })
        .collect::<std::result::Result<_, _>>()?;
    let [rows, cols] = dims[..] else {
        return Err(format!(
            "the array has shape ({shape}); voice codes are [frames, {CODES_PER_FRAME}]"
        ));
    };
    let (little, kind, size) = {
        let mut c = descr.chars();
        let order = c.next().ok_or("empty descr")?;
        let kind = c.next().ok_or("bad descr")?;
        let size: usize = c
            .as_str()
            .parse()
            .map_err(|_| format!("bad descr {descr}"))?;
        (order != '>', kind, size)
    };
    if !matches!(kind, 'i' | 'u') || !matches!(size, 1 | 2 | 4 | 8) {
        return Err(format!(
            "dtype {descr} is not an integer type; codes are integers"
        ));
    }
    let n = rows
        .checked_mul(cols)
        .filter(|n| *n <= MAX_FRAMES * CODES_PER_FRAME * 4)
        .ok_or(format!(
            "the array ({rows}, {cols}) is too large for voice codes"
        ))?;
    let data = &b[start + hlen..];
    if data.len() < n * size {
        return Err(format!(
            "the data is {} bytes, shape ({rows}, {cols}) of {descr} needs {}",
            data.len(),
            n * size
        ));
    }
    let value = |i: usize| -> i64 {
        let mut raw = [0u8; 8];
        raw[..size].copy_from_slice(&data[i * size..(i + 1) * size]);
        if !little {
            raw[..size].reverse();
        }
        let u = u64::from_le_bytes(raw);
        if kind == 'u' {
            return i64::try_from(u).unwrap_or(i64::MAX);
        }
        let shift = 64 - 8 * size as u32;
        ((u << shift) as i64) >> shift
    };
    let at = |r: usize, c: usize| {
        if fortran {
            value(r + c * rows)
        } else {
            value(r * cols + c)
        }
    };
    let transposed = cols != CODES_PER_FRAME && rows == CODES_PER_FRAME;
    if cols != CODES_PER_FRAME && !transposed {
        return Err(format!(
            "the array has shape ({rows}, {cols}); voice codes are [frames, {CODES_PER_FRAME}]"
        ));
    }
    Ok(if transposed {
        (0..cols)
            .map(|t| (0..rows).map(|k| at(k, t)).collect())
            .collect()
    } else {
        (0..rows)
            .map(|t| (0..cols).map(|k| at(t, k)).collect())
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(t: usize, seed: u32) -> Vec<Vec<u32>> {
        (0..t)
            .map(|i| {
                let mut f = vec![2 + (seed * 31 + i as u32 * 977) % SEMANTIC_CODES];
                f.extend((0..36).map(|k| 2 + (seed + i as u32 * 7 + k) % ACOUSTIC_LEVELS));
                f
            })
            .collect()
    }

    #[test]
    fn npy_round_trips_and_numpy_layouts_read() {
        let c = Codes::new(frames(12, 3)).unwrap();
        let back = parse_npy(&c.to_npy()).unwrap();
        let back = Codes::from_file_values(back, CodeOffset::Auto).unwrap();
        assert_eq!(back, c);
        // The header is padded to a multiple of 64 bytes, as NumPy requires.
        let b = c.to_npy();
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert_eq!(b[10 + hlen - 1], b'\n');
    }

    fn npy(
        descr: &str,
        fortran: bool,
        shape: (usize, usize),
        values: &[i64],
        size: usize,
    ) -> Vec<u8> {
        let h = format!(
            "{{'descr': '{descr}', 'fortran_order': {}, 'shape': ({}, {}), }}\n",
            if fortran { "True" } else { "False" },
            shape.0,
            shape.1
        );
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(h.len() as u16).to_le_bytes());
        b.extend_from_slice(h.as_bytes());
        for v in values {
            let le = v.to_le_bytes();
            if descr.starts_with('>') {
                b.extend(le[..size].iter().rev());
            } else {
                b.extend_from_slice(&le[..size]);
            }
        }
        b
    }

    #[test]
    fn raw_codes_of_any_int_type_and_order_get_the_offset() {
        // Raw codes [3, 37]: semantic 0, 8191, 5; acoustic 0..=20.
        let raw: Vec<Vec<i64>> = (0..3)
            .map(|t| {
                let mut f = vec![[0, 8191, 5][t]];
                f.extend((0..36).map(|k| ((k + t) % 21) as i64));
                f
            })
            .collect();
        let flat: Vec<i64> = raw.iter().flatten().copied().collect();
        let want = Codes::from_file_values(raw.clone(), CodeOffset::Raw).unwrap();
        assert_eq!(want.frames()[1][0], 8193);
        for (descr, size) in [("<i2", 2), (">i4", 4), ("<u2", 2), ("<i8", 8)] {
            let got = parse_npy(&npy(descr, false, (3, 37), &flat, size)).unwrap();
            assert_eq!(
                Codes::from_file_values(got, CodeOffset::Auto).unwrap(),
                want,
                "{descr}"
            );
        }
        // [37, T] in Fortran order is the same values.
        let t: Vec<i64> = (0..37)
            .flat_map(|k| raw.iter().map(move |f| f[k]))
            .collect();
        let f_order: Vec<i64> = raw.iter().flatten().copied().collect();
        let a = parse_npy(&npy("<i4", false, (37, 3), &t, 4)).unwrap();
        let b = parse_npy(&npy("<i4", true, (37, 3), &f_order, 4)).unwrap();
        assert_eq!(a, raw);
        assert_eq!(b, raw);
    }

    #[test]
    fn bad_files_and_codes_get_clear_errors() {
        let e = |b: &[u8]| parse_npy(b).unwrap_err();
        assert!(e(b"hello").contains("not a .npy"));
        assert!(e(&npy("<f4", false, (2, 37), &[0; 74], 4)).contains("not an integer"));
        assert!(e(&npy("<i4", false, (2, 36), &[0; 72], 4)).contains("[frames, 37]"));
        assert!(e(&npy("<i4", false, (2, 37), &[0; 10], 4)).contains("needs"));
        let mut f = frames(2, 1);
        f[1][5] = 40;
        assert!(Codes::new(f)
            .unwrap_err()
            .to_string()
            .contains("acoustic code 5"));
        let amb = vec![vec![5i64; 37]];
        let msg = Codes::from_file_values(amb, CodeOffset::Auto)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("--offset"), "{msg}");
        assert!(Codes::new(vec![]).is_err());
        assert!(Codes::new(vec![vec![1, 0, 0]]).is_err());
    }

    #[test]
    fn a_trailing_end_frame_is_dropped() {
        let mut f = frames(3, 2);
        let mut end = vec![0u32; 37];
        end[0] = END_AUDIO;
        f.push(end);
        assert_eq!(Codes::new(f).unwrap().len(), 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn npy_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400),
                                   flips in proptest::collection::vec((0usize..2000, any::<u8>()), 0..8)) {
            let _ = parse_npy(&bytes);
            let mut good = Codes::new(frames(4, 9)).unwrap().to_npy();
            for (i, v) in flips {
                let n = good.len();
                good[i % n] = v;
            }
            let cut = good.len() / 2;
            let _ = parse_npy(&good);
            let _ = parse_npy(&good[..cut]);
        }
    }
}
