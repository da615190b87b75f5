//! Speaking rate, pitch and volume, defined once. Inside voxtrald:
//!
//! - **rate**: a speed factor, 0.25 to 4.0, 1.0 as the model speaks; pitch is kept.
//! - **pitch**: a frequency ratio, 0.5 to 2.0 (an octave each way); duration is kept.
//! - **volume**: a gain, 0.0 to 1.0.
//!
//! The configured `rate` and `pitch` are the defaults: a request that sends none gets them, and
//! a protocol whose value means "relative to normal" (Spiel's multipliers, SSIP's −100…100,
//! OpenAI's `speed`) is taken relative to them. Each protocol's own scale is mapped here.

use crate::audio::prosody::{MAX_PITCH, MAX_RATE, MIN_PITCH, MIN_RATE};

/// A rate or pitch as a request gives it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Amount {
    /// The configured default.
    #[default]
    Default,
    /// This value.
    Exactly(f32),
    /// This multiple of the configured default (clamped to the range).
    Times(f32),
}

impl Amount {
    /// The value for a default of `default`: `Exactly` is passed on as it is (the engine refuses
    /// it if out of range), `Times` is clamped into `min..=max`.
    pub fn resolve(self, default: f32, min: f32, max: f32) -> f32 {
        match self {
            Amount::Default => default,
            Amount::Exactly(v) => v,
            Amount::Times(m) => (m * default).clamp(min, max),
        }
    }

    pub fn rate(self, default: f32) -> f32 {
        self.resolve(default, MIN_RATE, MAX_RATE)
    }

    pub fn pitch(self, default: f32) -> f32 {
        self.resolve(default, MIN_PITCH, MAX_PITCH)
    }
}

/// A Spiel multiplier (1.0 = normal; screen readers send up to 10, nonsense means normal).
pub fn spiel(multiplier: f64) -> Amount {
    if multiplier.is_finite() && multiplier > 0.0 {
        Amount::Times(multiplier as f32)
    } else {
        Amount::Default
    }
}

/// SSIP's `rate` −100…100 (0 = normal) as a multiplier: 4^(r/100), so −100 is a quarter of
/// the speed and 100 four times it.
pub fn ssip_rate(value: f32) -> f32 {
    4f32.powf(value.clamp(-100.0, 100.0) / 100.0)
}

/// SSIP's `pitch` −100…100 as a multiplier, an octave each way: 2^(p/100).
pub fn ssip_pitch(value: f32) -> f32 {
    2f32.powf(value.clamp(-100.0, 100.0) / 100.0)
}

/// SSIP's `volume` −100…100 as a gain: 100 (speech-dispatcher's default) is full scale, −100
/// silence.
pub fn ssip_volume(value: f32) -> f32 {
    (value.clamp(-100.0, 100.0) + 100.0) / 200.0
}

/// OpenAI's `speed`, 0.25 to 4.0 (1.0 = normal), or the error that API gives outside it.
pub fn openai_speed(speed: f32) -> Result<Amount, String> {
    if (0.25..=4.0).contains(&speed) {
        Ok(Amount::Times(speed))
    } else {
        Err(format!(
            "{speed} is greater than the maximum of 4.0 or less than the minimum of 0.25 - \
             'speed'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_scales_meet_ours() {
        assert_eq!(
            (ssip_rate(-100.0), ssip_rate(0.0), ssip_rate(100.0)),
            (0.25, 1.0, 4.0)
        );
        assert_eq!((ssip_rate(-50.0), ssip_rate(50.0)), (0.5, 2.0));
        assert_eq!((ssip_pitch(-100.0), ssip_pitch(100.0)), (0.5, 2.0));
        assert_eq!((ssip_volume(-100.0), ssip_volume(0.0)), (0.0, 0.5));
        assert_eq!(spiel(f64::NAN), Amount::Default);
        assert_eq!(spiel(2.0).rate(1.5), 3.0);
        // A multiple of the default is clamped, so 4 x a configured 1.2 is accepted.
        assert_eq!(Amount::Times(4.0).rate(1.2), 4.0);
        assert_eq!(Amount::Times(10.0).pitch(1.0), 2.0);
        assert_eq!(
            Amount::Exactly(5.0).rate(1.0),
            5.0,
            "refused later, not clamped"
        );
        assert_eq!(openai_speed(0.25), Ok(Amount::Times(0.25)));
        assert!(openai_speed(4.01).unwrap_err().contains("maximum of 4.0"));
        assert!(openai_speed(0.2).is_err());
    }
}
