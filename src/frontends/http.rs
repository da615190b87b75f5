//! The OpenAI-style speech API (`POST /v1/audio/speech`, `GET /v1/audio/voices`,
//! `GET /v1/audio/models`, `GET /v1/models`, `GET /v1/status`), for tools that speak it (Open
//! WebUI, LibreChat, Home Assistant's OpenAI TTS, the `openai` SDK). Off unless the config names
//! a loopback address. HTTP/1.1 with keep-alive (axum on hyper). The audio is streamed as it is
//! generated (chunked), in MP3 (the API's default), Ogg Opus, FLAC, WAV or bare PCM, or as server-sent
//! events; a client that goes away cancels its job. `POST /dev/captioned_speech` (as
//! Kokoro-FastAPI has it) adds word timestamps: one JSON object, or with `"stream": true` one
//! JSON line per piece of audio with the words finished by then.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::audio::encode::{self, Encoder, Encoding};
use crate::engine::{Destination, Event, Interface};
use crate::service::{scales, Request as SpeechRequest, Speaking, Speech};

pub async fn serve(
    speech: Arc<Speech>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    let limit = speech.settings().limits.max_request_bytes;
    let app = Router::new()
        .route("/v1/audio/speech", post(speech_route))
        .route("/dev/captioned_speech", post(captioned_route))
        .route("/v1/audio/voices", get(voices))
        .route("/v1/audio/models", get(models))
        .route("/v1/models", get(models))
        .route("/v1/status", get(status))
        .method_not_allowed_fallback(not_allowed)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(speech);
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
    {
        tracing::warn!(error = %e, "the speech API stopped");
    }
}

/// An error in the API's own shape.
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": null, "code": null}});
    (status, axum::Json(body)).into_response()
}

async fn not_found(uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!("no such endpoint: {}", uri.path()),
    )
}

async fn not_allowed(method: Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

async fn voices(State(speech): State<Arc<Speech>>) -> Response {
    let voices: Vec<Value> = speech
        .voices()
        .into_iter()
        .map(|v| {
            json!({"id": v.id, "name": v.id, "language": v.language,
                   "gender": v.gender, "description": v.display_name})
        })
        .collect();
    axum::Json(json!({"voices": voices})).into_response()
}

async fn models() -> Response {
    let m = json!({"id": "voxtral-4b-tts", "object": "model", "owned_by": "mistralai"});
    axum::Json(json!({"object": "list", "data": [m.clone()], "models": [m]})).into_response()
}

async fn status(State(speech): State<Arc<Speech>>) -> Response {
    axum::Json(json!(speech.status())).into_response()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum VoiceField {
    Name(String),
    Object { id: String },
}

/// The request body; fields the API has and we do not use (`model`, `instructions`, ...) are
/// accepted and ignored.
#[derive(Deserialize)]
struct SpeechBody {
    input: String,
    #[serde(default)]
    voice: Option<VoiceField>,
    #[serde(default)]
    response_format: Option<String>,
    #[serde(default)]
    speed: Option<f32>,
    #[serde(default)]
    stream_format: Option<String>,
    /// `/dev/captioned_speech` only: one JSON line per piece (default: one object at the end).
    #[serde(default)]
    stream: Option<bool>,
}

/// OpenAI's voice names (every built-in one its SDK lists), mapped onto this model's English
/// voices.
fn openai_voice(name: &str) -> Option<&'static str> {
    match name {
        "alloy" | "nova" | "shimmer" | "coral" | "sage" | "marin" => Some("casual_female"),
        "echo" | "fable" | "onyx" | "ash" | "ballad" | "verse" | "cedar" => Some("casual_male"),
        _ => None,
    }
}

/// How the body carries the audio.
#[derive(Clone, Copy)]
struct Delivery {
    encoding: Encoding,
    sse: bool,
    /// Captioned: word timestamps with the audio, as lines (`Some(true)`) or one object.
    captions: Option<bool>,
}

/// The request, or why it is a bad one (a 400).
fn parse(
    speech: &Speech,
    body: &[u8],
    captioned: bool,
) -> Result<(SpeechRequest, Delivery), String> {
    let b: SpeechBody =
        serde_json::from_slice(body).map_err(|e| format!("bad request body: {e}"))?;
    // Absent means MP3, as in OpenAI's API (and what most clients then expect).
    let encoding = match b.response_format.as_deref().unwrap_or("mp3") {
        "mp3" => Encoding::Mp3,
        "flac" => Encoding::Flac,
        "wav" => Encoding::Wav,
        "pcm" => Encoding::Pcm,
        "opus" if encode::available(Encoding::Opus) => Encoding::Opus,
        other @ ("opus" | "aac") => {
            return Err(format!(
                "response_format {other:?} is not available in this voxtrald; use \"mp3\", \
                 \"flac\", \"wav\" or \"pcm\""
            ))
        }
        other => {
            return Err(format!(
                "{other:?} is not one of 'mp3', 'opus', 'aac', 'flac', 'wav', 'pcm' - \
                 'response_format'"
            ))
        }
    };
    let sse = match b.stream_format.as_deref() {
        None | Some("audio") => false,
        Some("sse") => true,
        Some(other) => {
            return Err(format!(
                "{other:?} is not one of 'sse', 'audio' - 'stream_format'"
            ))
        }
    };
    let mut r = SpeechRequest::new(b.input, Interface::Http, Destination::Client);
    r.voice = match &b.voice {
        None => None,
        Some(VoiceField::Name(n) | VoiceField::Object { id: n }) => {
            let known = speech.voices().iter().any(|v| &v.id == n);
            match (known, openai_voice(n)) {
                (true, _) => Some(n.clone()),
                (false, Some(v)) => Some(v.to_string()),
                (false, None) => return Err(format!("unknown voice {n:?}")),
            }
        }
    };
    if let Some(speed) = b.speed {
        r.rate = scales::openai_speed(speed)?;
    }
    let delivery = Delivery {
        encoding,
        sse,
        captions: captioned.then(|| b.stream.unwrap_or(false)),
    };
    Ok((r, delivery))
}

async fn speech_route(
    State(speech): State<Arc<Speech>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    respond(speech, body, false).await
}

async fn captioned_route(
    State(speech): State<Arc<Speech>>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    respond(speech, body, true).await
}

async fn respond(
    speech: Arc<Speech>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
    captioned: bool,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(e) => return error(e.status(), e.body_text()),
    };
    let (req, delivery) = match parse(&speech, &body, captioned) {
        Ok(r) => r,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    let captions = delivery
        .captions
        .map(|lines| Captions::new(&req.text, speech.sample_rate(), lines));
    let job = match speech.speak_async(req).await {
        Ok(job) => job,
        Err(crate::Error::Internal(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let encoder = match delivery.encoding.encoder(speech.sample_rate()) {
        Ok(e) => e,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let content_type = match (delivery.captions, delivery.sse) {
        (Some(true), _) => "application/x-ndjson",
        (Some(false), _) => "application/json",
        (None, true) => "text/event-stream",
        (None, false) => delivery.encoding.content_type(),
    };
    let chars = body.len();
    let mut out = Outgoing {
        job,
        encoder,
        sse: delivery.sse,
        chars,
        captions,
        format: delivery.encoding.name(),
    };
    // The status waits for the first audio: a job that ends before it (stopped by another
    // client, refused for memory, failed) is an error response the client can read, not a
    // connection cut before any header.
    let first = match out.next_piece().await {
        Some(Ok(bytes)) => Some(bytes),
        Some(Err((status, why))) => return error(status, why),
        None => None,
    };
    let rest = futures_util::stream::unfold(Some(out), |state| async move {
        let mut s = state?;
        match s.next_piece().await {
            Some(Ok(bytes)) => Some((Ok(bytes), Some(s))),
            Some(Err((_, why))) => Some((Err(std::io::Error::other(why)), None)),
            None => None,
        }
    });
    let stream = futures_util::stream::iter(first.map(Ok)).chain(rest);
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, content_type)
        .header("X-Sample-Rate", speech.sample_rate())
        .body(Body::from_stream(stream))
        .unwrap_or_else(|e| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// A response body being made: the job's audio through the encoder. Dropping it (the client
/// went away) drops the job, which cancels it.
struct Outgoing {
    job: Speaking,
    encoder: Box<dyn Encoder>,
    sse: bool,
    chars: usize,
    captions: Option<Captions>,
    format: &'static str,
}

/// Word timestamps for a captioned response: a word ends where the next one starts, or where
/// its sentence's audio ends.
struct Captions {
    text: Vec<char>,
    sample_rate: f64,
    lines: bool,
    open: Option<(std::ops::Range<usize>, u64)>,
    finished: Vec<Value>,
    /// Samples of audio so far.
    heard: u64,
    /// The whole audio, for a single object.
    audio: Vec<u8>,
}

impl Captions {
    fn new(text: &str, sample_rate: u32, lines: bool) -> Self {
        Self {
            text: text.chars().collect(),
            sample_rate: sample_rate as f64,
            lines,
            open: None,
            finished: Vec::new(),
            heard: 0,
            audio: Vec::new(),
        }
    }

    fn close(&mut self, end: u64) {
        if let Some((r, start)) = self.open.take() {
            let word: String = self
                .text
                .get(r)
                .map(|c| c.iter().collect())
                .unwrap_or_default();
            self.finished.push(json!({
                "word": word,
                "start_time": start as f64 / self.sample_rate,
                "end_time": end.max(start) as f64 / self.sample_rate,
            }));
        }
    }

    /// Takes an event's part in the captions.
    fn event(&mut self, ev: &Event) {
        match ev {
            Event::Word { range, offset } => {
                self.close(*offset);
                self.open = Some((range.clone(), *offset));
            }
            Event::Sentence { .. } | Event::Finished { .. } => self.close(self.heard),
            Event::Audio { samples, .. } => self.heard += samples.len() as u64,
            _ => {}
        }
    }

    /// The body piece for `bytes` of audio: a line with the words finished so far, or nothing
    /// until the end for a single object.
    fn piece(&mut self, bytes: Vec<u8>, last: bool, format: &str) -> Vec<u8> {
        if !self.lines {
            self.audio.extend_from_slice(&bytes);
            if !last {
                return Vec::new();
            }
        }
        if !last && bytes.is_empty() && self.finished.is_empty() {
            return Vec::new();
        }
        let audio = if self.lines {
            bytes
        } else {
            std::mem::take(&mut self.audio)
        };
        let audio = base64::engine::general_purpose::STANDARD.encode(audio);
        let timestamps = std::mem::take(&mut self.finished);
        let mut out = json!({"audio": audio, "audio_format": format, "timestamps": timestamps})
            .to_string()
            .into_bytes();
        out.push(b'\n');
        out
    }
}

impl Outgoing {
    /// The next bytes to send; `None` at the end; an error cuts the response short (no final
    /// chunk), which clients see as a failed transfer.
    /// The next bytes of the body; an error carries the status it would have before any.
    async fn next_piece(&mut self) -> Option<Result<Bytes, (StatusCode, String)>> {
        loop {
            let ev = self.job.next().await?;
            if let Some(c) = self.captions.as_mut() {
                c.event(&ev);
            }
            let (bytes, last) = match ev {
                Event::Audio { samples, .. } => (self.encoder.push(&samples), false),
                Event::Finished { .. } => (self.encoder.finish(), true),
                Event::Failed { reason } => {
                    tracing::warn!(job = self.job.id, %reason, "http speech failed");
                    return Some(Err((StatusCode::INTERNAL_SERVER_ERROR, reason)));
                }
                Event::Cancelled { reason } => {
                    tracing::info!(job = self.job.id, %reason, "http speech cancelled");
                    return Some(Err((StatusCode::SERVICE_UNAVAILABLE, reason)));
                }
                _ => continue,
            };
            let bytes = match bytes {
                Ok(b) => b,
                Err(e) => return Some(Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))),
            };
            if let Some(c) = self.captions.as_mut() {
                let piece = c.piece(bytes, last, self.format);
                if piece.is_empty() {
                    continue;
                }
                return Some(Ok(Bytes::from(piece)));
            }
            if !self.sse {
                if bytes.is_empty() && !last {
                    continue;
                }
                return Some(Ok(Bytes::from(bytes)));
            }
            let mut out = String::new();
            if !bytes.is_empty() {
                let audio = base64::engine::general_purpose::STANDARD.encode(&bytes);
                let delta = json!({"type": "speech.audio.delta", "audio": audio});
                out.push_str(&format!("data: {delta}\n\n"));
            }
            if last {
                let usage = json!({"input_tokens": self.chars, "output_tokens": 0,
                                   "total_tokens": self.chars});
                let done = json!({"type": "speech.audio.done", "usage": usage});
                out.push_str(&format!("data: {done}\n\n"));
            }
            if out.is_empty() {
                continue;
            }
            return Some(Ok(Bytes::from(out)));
        }
    }
}
