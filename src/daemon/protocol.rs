//! The socket protocol's messages (see `docs/socket-protocol.md`): one JSON object per line
//! each way; with `"output": "raw"` the connection carries bare PCM after the first reply.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::audio::wav::to_i16;
use crate::engine::{Event, JobId, Priority};

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

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Speak {
        text: String,
        #[serde(default)]
        voice: Option<String>,
        #[serde(default)]
        priority: Option<String>,
        #[serde(default)]
        output: Output,
        #[serde(default)]
        seed: Option<u64>,
        /// Speaking rate, 0.5 to 4.0 (default from the config, else 1.0).
        #[serde(default)]
        rate: Option<f32>,
        /// Pitch as a frequency ratio, 0.5 to 2.0 (default 1.0).
        #[serde(default)]
        pitch: Option<f32>,
        /// Echoed back in `accepted`, to match replies to requests.
        #[serde(default)]
        tag: Option<serde_json::Value>,
    },
    Cancel {
        job: JobId,
    },
    Stop,
    Pause,
    Resume,
    Voices,
    Status,
}

pub fn parse_priority(s: Option<&str>) -> Result<Priority, String> {
    Ok(match s.unwrap_or("text") {
        "important" => Priority::Important,
        "message" => Priority::Message,
        "text" => Priority::Text,
        "notification" => Priority::Notification,
        "progress" => Priority::Progress,
        other => {
            return Err(format!(
                "unknown priority {other:?} (important, message, text, notification, progress)"
            ))
        }
    })
}

/// s16le bytes of float samples.
pub fn pcm_s16le(samples: &[f32]) -> Vec<u8> {
    samples
        .iter()
        .flat_map(|&s| to_i16(s).to_le_bytes())
        .collect()
}

/// The JSON line for an engine event.
pub fn event_json(job: JobId, ev: &Event, with_audio: bool) -> Option<serde_json::Value> {
    use serde_json::json;
    Some(match ev {
        Event::Started => json!({"event": "started", "job": job}),
        Event::Sentence { range } => {
            json!({"event": "sentence", "job": job, "start": range.start, "end": range.end})
        }
        Event::Audio { offset, samples } => {
            if !with_audio {
                return None;
            }
            let pcm = base64::engine::general_purpose::STANDARD.encode(pcm_s16le(samples));
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

pub fn error_json(msg: impl std::fmt::Display) -> serde_json::Value {
    serde_json::json!({"event": "error", "error": msg.to_string()})
}
