//! What the engine is asked (a [`SpeechRequest`], already resolved: every default applied by
//! the speech service) and what it answers, one [`Event`] at a time.

use std::ops::Range;

use crate::model::{DEFAULT_CFG_ALPHA, DEFAULT_MAX_FRAMES};
use crate::text::punctuation::SpokenPunctuation;
use crate::text::ssml::Markup;

pub type JobId = u64;

/// Speech Dispatcher's message priorities, most urgent first.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Never cancelled by other requests; goes before everything else.
    Important,
    /// Cancels queued and playing text and notifications.
    Message,
    /// Queued in order.
    #[default]
    Text,
    /// Dropped when anything else is queued or speaking.
    Notification,
    /// Only the latest queued one is kept.
    Progress,
}

impl std::str::FromStr for Priority {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
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
}

/// Where a job's audio goes, which decides whether it may overlap with other jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Destination {
    /// The daemon's own sound output: one utterance at a time, ordered and displaced by
    /// priority as Speech Dispatcher does.
    #[default]
    Speaker,
    /// The requester takes the audio (a Spiel pipe, a socket stream): such jobs are spoken
    /// together, sharing each decoding step, and their priority only orders them.
    Client,
}

/// Which interface a request came through, for the per-job log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Interface {
    Socket,
    Spiel,
    Control,
    Http,
    Wyoming,
    /// `voxtrald say` and `bench` in their own process.
    #[default]
    Local,
}

impl std::fmt::Display for Interface {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Interface::Socket => "socket",
            Interface::Spiel => "spiel",
            Interface::Control => "control",
            Interface::Http => "http",
            Interface::Wyoming => "wyoming",
            Interface::Local => "local",
        })
    }
}

#[derive(Debug, Clone)]
pub struct SpeechRequest {
    pub text: String,
    pub voice: String,
    pub priority: Priority,
    pub seed: u64,
    pub cfg_alpha: f32,
    /// Frame cap per sentence.
    pub max_frames: usize,
    /// Speaking rate, 1.0 = as generated (pitch is kept; see `audio::stretch`).
    pub rate: f32,
    /// Pitch as a frequency ratio, 1.0 = as generated (duration is kept; see
    /// `audio::prosody`).
    pub pitch: f32,
    /// Gain on the audio, 0.0 to 1.0.
    pub volume: f32,
    /// Punctuation the model reads by name.
    pub punctuation: Option<SpokenPunctuation>,
    /// Marks, breaks and prosody spans of an SSML request, in character offsets of `text`.
    pub markup: Markup,
    pub destination: Destination,
    pub interface: Interface,
}

impl SpeechRequest {
    pub fn new(text: impl Into<String>, voice: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            voice: voice.into(),
            priority: Priority::Text,
            seed: 0,
            cfg_alpha: DEFAULT_CFG_ALPHA,
            max_frames: DEFAULT_MAX_FRAMES,
            rate: 1.0,
            pitch: 1.0,
            volume: 1.0,
            punctuation: None,
            markup: Markup::default(),
            destination: Destination::Speaker,
            interface: Interface::Local,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Started,
    /// The sentence at this character range of the text is next; its audio follows.
    Sentence {
        range: Range<usize>,
    },
    /// The word at this character range of the text is spoken from sample `offset` of the
    /// job's audio; the audio holding that sample follows.
    Word {
        range: Range<usize>,
        offset: u64,
    },
    /// An SSML `<mark/>` is reached at sample `offset`: the audio before it has been sent, the
    /// audio after it follows.
    Mark {
        name: String,
        offset: u64,
    },
    /// Mono PCM at the model's sample rate; `offset` is the first sample's index in the job's
    /// audio.
    Audio {
        offset: u64,
        samples: Vec<f32>,
    },
    Finished {
        frames: usize,
        seconds: f64,
        rtf: f64,
    },
    Failed {
        reason: String,
    },
    Cancelled {
        reason: String,
    },
}

impl Event {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Event::Finished { .. } | Event::Failed { .. } | Event::Cancelled { .. }
        )
    }
}
