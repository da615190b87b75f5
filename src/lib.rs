//! voxtrald: local speech synthesis with Mistral's Voxtral TTS.
//!
//! One straight line: an interface (`frontends`) parses its protocol into a request, the speech
//! service (`service`) applies every default and rule, the engine (`engine`) turns text into
//! frames and audio with the model (`model`), and the interface encodes the audio (`audio`)
//! for its client. `settings` resolves the config once; `daemon` wires it all up; `client`
//! holds the programs that talk to a running daemon; `cli` is the command line, which nothing
//! else imports.
#![recursion_limit = "256"]

pub mod atomic;
pub mod audio;
pub mod cli;
pub mod client;
pub mod clone;
pub mod daemon;
pub mod download;
pub mod engine;
pub mod error;
pub mod frontends;
pub mod heap;
pub mod library;
pub mod model;
pub mod service;
pub mod settings;
pub mod text;

pub use error::{Error, Result};
pub use model::{GenerateOptions, LoadOptions, Voxtral};
