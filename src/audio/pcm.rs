//! Sample formats: the model's f32 samples as 16-bit little-endian PCM and back, and gain.
//! Every interface that hands out bytes encodes them here.

/// Float sample to 16-bit PCM, clipped to [-1, 1].
pub fn to_i16(s: f32) -> i16 {
    let s = if s.is_nan() { 0.0 } else { s.clamp(-1.0, 1.0) };
    (s * i16::MAX as f32).round() as i16
}

/// 16-bit PCM to a float sample (the inverse of [`to_i16`] up to rounding).
pub fn from_i16(s: i16) -> f32 {
    s as f32 / i16::MAX as f32
}

/// s16le bytes of float samples.
pub fn s16le(samples: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(samples.len() * 2);
    for &s in samples {
        out.extend_from_slice(&to_i16(s).to_le_bytes());
    }
    out
}

/// Float samples of s16le bytes (a trailing odd byte is ignored).
pub fn from_s16le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| from_i16(i16::from_le_bytes([b[0], b[1]])))
        .collect()
}

/// Scales samples in place; a gain of 1 leaves them untouched, bit for bit.
pub fn apply_gain(samples: &mut [f32], gain: f32) {
    if gain != 1.0 {
        for s in samples {
            *s *= gain;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s16le_round_trips_and_clips() {
        let x = [0.0, 0.5, -0.5, 1.0, -1.0, 2.0, f32::NAN];
        let b = s16le(&x);
        assert_eq!(b.len(), 14);
        assert_eq!(i16::from_le_bytes([b[2], b[3]]), 16384);
        let y = from_s16le(&b);
        assert_eq!(&y[..5], &[0.0, 0.50001526, -0.50001526, 1.0, -1.0]);
        assert_eq!((y[5], y[6]), (1.0, 0.0));
        let mut g = vec![0.5, -0.25];
        apply_gain(&mut g, 0.5);
        assert_eq!(g, [0.25, -0.125]);
    }
}
