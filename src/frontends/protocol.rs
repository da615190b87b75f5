//! The socket protocol's messages (see `docs/socket-protocol.md`): one JSON object per line
//! each way; with `"output": "raw"` the connection carries bare PCM after the first reply.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::audio::pcm::s16le;
use crate::engine::{Event, JobId, Priority};
use crate::library::{CodeOffset, UserVoice};
use crate::service::{Amount, Status, Voice};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Output {
    /// The daemon plays the audio itself.
    #[default]
    Play,
    /// Audio comes back as base64 s16le inside `audio` events.
    Stream,
    /// After one `accepted` line the connection carries bare s16le PCM until it closes.
    Raw,
}

/// A `speak` request; what it leaves out is the configured default.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Speak {
    pub text: String,
    /// `text` is SSML: its marks come back as `mark` events, its breaks and prosody apply.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ssml: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub voice: Option<String>,
    #[serde(default)]
    pub priority: Priority,
    #[serde(default)]
    pub output: Output,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Speaking rate, 0.25 to 4.0 (default: the configured rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<f32>,
    /// A multiple of the configured rate, for clients with a "normal" of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative_rate: Option<f32>,
    /// Pitch as a frequency ratio, 0.5 to 2.0 (default: the configured pitch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pitch: Option<f32>,
    /// A multiple of the configured pitch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relative_pitch: Option<f32>,
    /// Gain, 0.0 to 1.0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<f32>,
    /// Characters to say by name, e.g. ",.?!" (Speech Dispatcher's punctuation modes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub punctuation: Option<String>,
    /// Frames (80 ms each) per sentence at most; never more than the configured limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frames: Option<usize>,
    /// Classifier-free guidance strength, 0 to 10 (default 1.2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cfg_alpha: Option<f32>,
    /// Echoed back in `accepted`, to match replies to requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    Speak(Speak),
    Cancel {
        job: JobId,
    },
    Stop,
    Pause,
    Resume,
    Voices,
    Status,
    /// The user's voices with their details, and damaged voice files.
    UserVoices,
    /// Stores `[T, 37]` codes from a `.npy` file as a new voice.
    VoiceImport {
        name: String,
        language: String,
        path: std::path::PathBuf,
        /// "auto" (default), "0" (raw codec codes) or "2" (codes with the +2 offset).
        #[serde(default)]
        offset: Option<String>,
    },
    /// Writes a user voice's codes to a `.npy` file.
    VoiceExport {
        name: String,
        path: std::path::PathBuf,
    },
    VoiceRemove {
        name: String,
    },
    VoiceRename {
        from: String,
        to: String,
    },
}

impl Message {
    /// A `speak` with only the text and output; the other fields at their defaults.
    pub fn speak(text: impl Into<String>, output: Output) -> Self {
        Message::Speak(Speak {
            text: text.into(),
            output,
            ..Speak::default()
        })
    }
}

/// An absolute value wins over a relative one; neither is the default.
pub fn amount(absolute: Option<f32>, relative: Option<f32>) -> Amount {
    match (absolute, relative) {
        (Some(v), _) => Amount::Exactly(v),
        (None, Some(m)) => Amount::Times(m),
        (None, None) => Amount::Default,
    }
}

/// The JSON line for an engine event.
pub fn event_json(job: JobId, ev: &Event, with_audio: bool) -> Option<Value> {
    Some(match ev {
        Event::Started => json!({"event": "started", "job": job}),
        Event::Sentence { range } => {
            json!({"event": "sentence", "job": job, "start": range.start, "end": range.end})
        }
        Event::Word { range, offset } => {
            json!({"event": "word", "job": job, "start": range.start, "end": range.end, "offset": offset})
        }
        Event::Mark { name, offset } => {
            json!({"event": "mark", "job": job, "name": name, "offset": offset})
        }
        Event::Audio { offset, samples } => {
            if !with_audio {
                return None;
            }
            let pcm = base64::engine::general_purpose::STANDARD.encode(s16le(samples));
            json!({"event": "audio", "job": job, "offset": offset, "samples": samples.len(), "pcm": pcm})
        }
        Event::Finished {
            frames,
            seconds,
            rtf,
        } => {
            json!({"event": "finished", "job": job, "frames": frames, "seconds": seconds, "rtf": rtf})
        }
        Event::Failed { reason } => json!({"event": "failed", "job": job, "reason": reason}),
        Event::Cancelled { reason } => json!({"event": "cancelled", "job": job, "reason": reason}),
    })
}

pub fn status_json(status: &Status) -> Value {
    let mut v = json!({"event": "status"});
    if let (Some(o), Ok(Value::Object(s))) = (v.as_object_mut(), serde_json::to_value(status)) {
        o.extend(s);
    }
    v
}

pub fn voices_json(voices: &[Voice]) -> Value {
    json!({"event": "voices", "voices": voices})
}

/// A code-offset word of the protocol (`auto`, `0`, `2`).
pub fn code_offset(word: Option<&str>) -> Result<CodeOffset, String> {
    match word.unwrap_or("auto") {
        "auto" => Ok(CodeOffset::Auto),
        "0" => Ok(CodeOffset::Raw),
        "2" => Ok(CodeOffset::Model),
        other => Err(format!("offset `{other}` is not auto, 0 or 2")),
    }
}

/// One user voice's stored details.
pub fn user_voice_json(v: &UserVoice) -> Value {
    json!({
        "name": v.name,
        "language": v.language,
        "gender": v.gender,
        "made": v.made,
        "created": v.created,
        "frames": v.codes.len(),
        "seconds": v.codes.seconds(),
        "quality": v.quality,
        "path": v.path,
    })
}

/// The library listing: readable voices, and damaged files with their errors.
pub fn user_voices_json(entries: &[crate::Result<UserVoice>]) -> Value {
    let voices: Vec<Value> = entries.iter().flatten().map(user_voice_json).collect();
    let damaged: Vec<Value> = entries
        .iter()
        .filter_map(|e| e.as_ref().err())
        .map(|e| json!({"error": e.to_string()}))
        .collect();
    json!({"event": "user_voices", "voices": voices, "damaged": damaged})
}

pub fn error_json(msg: impl std::fmt::Display) -> Value {
    json!({"event": "error", "error": msg.to_string()})
}
