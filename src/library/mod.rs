//! The voice library: the preset catalogue (data in `voices/presets.toml`) and the user's own
//! voices, kept as frame codes in `$XDG_DATA_HOME/voxtrald/voices/` (folder 0700, files 0600).
//!
//! A user voice is what the official cloning path would compute from a reference clip: per
//! 80 ms frame its 37 codes, embedded and summed by the model, plus one end-of-audio frame.
//! Only the codes are stored, never the clip: they come from `voxtrald voice create` (a search
//! through the released decoder, `crate::clone`) or from any encoder (`voice import`).

pub mod catalogue;
pub mod codes;
pub mod store;

pub use catalogue::{catalogue, language_name, PresetEntry};
pub use codes::{CodeOffset, Codes};
pub use store::{Library, Made, Quality, UserVoice};
