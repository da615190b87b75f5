//! Library errors. Every variant names the file or input at fault so a user can act on it.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: invalid config: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    #[error("{}: unsupported model configuration: {reason}", path.display())]
    Unsupported { path: PathBuf, reason: String },
    #[error("{}: corrupt or unreadable checkpoint: {reason}", path.display())]
    CorruptCheckpoint { path: PathBuf, reason: String },
    #[error("{}: missing tensor `{name}`", path.display())]
    MissingTensor { path: PathBuf, name: String },
    #[error("{}: tensor `{name}` has shape {found:?}, expected {expected}", path.display())]
    TensorShape {
        path: PathBuf,
        name: String,
        found: Vec<usize>,
        expected: String,
    },
    #[error("{}: tensor `{name}` has dtype {found}, expected BF16, F16 or F32", path.display())]
    TensorDtype {
        path: PathBuf,
        name: String,
        found: String,
    },
    #[error("{}: invalid tokenizer: {reason}", path.display())]
    Tokenizer { path: PathBuf, reason: String },
    #[error("unknown voice `{voice}` (available: {available})")]
    UnknownVoice { voice: String, available: String },
    #[error("{}: voice `{voice}`: {reason}", path.display())]
    Voice {
        path: PathBuf,
        voice: String,
        reason: String,
    },
    #[error("{}: voice `{voice}` has {rows} rows but tekken.json audio.voice_num_audio_tokens says {expected}", path.display())]
    VoiceRows {
        path: PathBuf,
        voice: String,
        rows: usize,
        expected: usize,
    },
    #[error("not enough memory on {device} for this model: it needs {need}, {have}; try --quant q8, a smaller --max-positions, or another device")]
    InsufficientMemory {
        device: String,
        need: String,
        have: String,
    },
    #[error("not enough memory on {device} for another stream: {streams} running, each with a KV cache of up to {cache}, and {have}; lower [limits] max_streams or --max-positions, or raise --max-memory")]
    StreamMemory {
        device: String,
        streams: usize,
        cache: String,
        have: String,
    },
    #[error("the text is empty")]
    EmptyText,
    #[error("the prompt needs {needed} positions but the context limit is {limit}")]
    ContextOverflow { needed: usize, limit: usize },
    #[error("the model produced no audio: it ended before the first frame")]
    NoAudio,
    #[error("invalid audio codes: {0}")]
    InvalidCodes(String),
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error("download failed: {0}")]
    Download(String),
    #[error("{0}")]
    Device(String),
    #[error("no model at {}: run `voxtrald pull --model {}` (downloads {repo}), or pass --model DIR", dir.display(), dir.display())]
    NoModel { dir: PathBuf, repo: &'static str },
    #[error("audio output: {0}")]
    Audio(String),
    #[error("cancelled")]
    Cancelled,
    /// A bug caught at the engine's boundary: the request fails, the engine keeps serving.
    #[error("internal error: {0}")]
    Internal(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// The text of a caught panic's payload (`panic!` gives a `&str` or a `String`).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
