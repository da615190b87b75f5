//! Audio around the model. Before it: reference clips for cloning (`clip`). After it: sample
//! formats and gain (`pcm`), WAV files and streamed WAV headers (`wav`), speaking rate and
//! pitch (`prosody`, `stretch`, `resample`), and the sound card (`playback`).

pub mod clip;
pub mod encode;
pub mod pcm;
pub mod playback;
pub mod prosody;
pub mod resample;
pub mod stretch;
pub mod wav;

/// Signals and measures shared by the audio tests.
#[cfg(test)]
pub(crate) mod test_signal {
    /// A sine at 24 kHz, amplitude 0.5.
    pub fn sine(n: usize, f: f32) -> Vec<f32> {
        (0..n)
            .map(|i| (2.0 * std::f32::consts::PI * f * i as f32 / 24000.0).sin() * 0.5)
            .collect()
    }

    /// Upward zero crossings.
    pub fn crossings(x: &[f32]) -> usize {
        x.windows(2).filter(|w| w[0] <= 0.0 && w[1] > 0.0).count()
    }
}
