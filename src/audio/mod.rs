//! Audio outputs.

pub mod wav;
