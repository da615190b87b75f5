//! Audio outputs: WAV files, raw PCM, and the sound card.

pub mod playback;
pub mod prosody;
pub mod resample;
pub mod stretch;
pub mod wav;
