//! Cloning a voice from a clip without the withheld codec encoder: codes are searched by
//! gradient descent through the released decoder until their decoding sounds like the clip.
//!
//! - [`decoder`]: the codec decoder rewritten with differentiable ops over the loaded weights.
//! - [`loss`]: multi-resolution STFT, log-mel and waveform distances.
//! - [`search`]: the per-frame parameters, Adam, random crops and the best-codes bookkeeping.
//! - [`refine`]: the discrete pass after it: gradient-ranked single-code changes, judged exactly.
//!
//! The codes found are what the decoder needs to sound like the clip; whether the backbone
//! then speaks *new* text in that voice can only be judged with the real weights (the README
//! says how).

pub mod decoder;
pub mod loss;
pub mod refine;
pub mod search;

pub use loss::{stft_distance, LossWeights};
pub use refine::RefineOptions;
pub use search::{random_codes, search_codes, speaking_level_dbfs, Found, Progress, SearchOptions};
