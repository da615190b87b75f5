//! voxtrald: local speech synthesis with Mistral's Voxtral TTS.
#![recursion_limit = "256"]

pub mod atomic;
pub mod audio;
pub mod cli;
pub mod daemon;
pub mod download;
pub mod engine;
pub mod error;
pub mod model;
pub mod tokenizer;

pub use error::{Error, Result};
pub use model::{GenerateOptions, LoadOptions, Voxtral};
