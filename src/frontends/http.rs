//! The OpenAI-style speech API (`POST /v1/audio/speech`, `GET /v1/audio/voices`,
//! `GET /v1/models`), for tools that speak it (Open WebUI and the like). Off unless the config
//! names an address, and loopback only. HTTP/1.1, one request per connection; the audio is
//! streamed as it is generated (chunked), as WAV (the default here: there is no MP3 encoder) or
//! bare 16-bit PCM.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::audio::pcm::s16le;
use crate::audio::wav::streaming_header;
use crate::engine::{Destination, Event, Interface};
use crate::service::{scales, Request as SpeechRequest, Speaking, Speech};

/// Largest request head (request line and headers).
const MAX_HEAD: usize = 16 * 1024;

pub async fn serve(
    speech: Arc<Speech>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let d = speech.clone();
                    tokio::spawn(async move { connection(d, stream).await });
                }
                Err(e) => tracing::warn!(error = %e, "http accept failed"),
            },
            _ = shutdown.changed() => break,
        }
    }
}

struct Request {
    method: String,
    path: String,
    body: Vec<u8>,
}

/// An answer that is not audio: status and JSON.
struct Reply(u16, Value);

fn error(status: u16, message: impl Into<String>) -> Reply {
    let kind = if status < 500 {
        "invalid_request_error"
    } else {
        "server_error"
    };
    Reply(
        status,
        json!({"error": {"message": message.into(), "type": kind}}),
    )
}

async fn connection(speech: Arc<Speech>, mut stream: TcpStream) {
    let limit = speech.settings().limits.max_request_bytes;
    let req = match read_request(&mut stream, limit).await {
        Ok(r) => r,
        Err(reply) => {
            let _ = write_json(&mut stream, reply).await;
            return;
        }
    };
    let reply = match (req.method.as_str(), req.path.as_str()) {
        ("POST", "/v1/audio/speech") => match speech_request(&speech, &req.body) {
            Ok((r, format)) => return speak(speech, stream, r, format).await,
            Err(reply) => reply,
        },
        ("GET", "/v1/audio/voices") => {
            let voices: Vec<Value> = speech
                .voices()
                .into_iter()
                .map(|v| {
                    json!({"id": v.id, "name": v.id, "language": v.language,
                           "gender": v.gender, "description": v.display_name})
                })
                .collect();
            Reply(200, json!({"voices": voices}))
        }
        ("GET", "/v1/status") => Reply(200, json!(speech.status())),
        ("GET", "/v1/models" | "/v1/audio/models") => {
            let m = json!({"id": "voxtral-4b-tts", "object": "model", "owned_by": "mistralai"});
            Reply(
                200,
                json!({"object": "list", "data": [m.clone()], "models": [m]}),
            )
        }
        (
            _,
            "/v1/audio/speech" | "/v1/audio/voices" | "/v1/models" | "/v1/audio/models"
            | "/v1/status",
        ) => error(
            405,
            format!("{} is not allowed on {}", req.method, req.path),
        ),
        _ => error(404, format!("no such endpoint: {}", req.path)),
    };
    let _ = write_json(&mut stream, reply).await;
}

async fn read_request(stream: &mut TcpStream, max_body: usize) -> Result<Request, Reply> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(error(431, "the request head is too large"));
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(error(400, "the request ended early")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| error(400, "the request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (method, target) = match (first.next(), first.next(), first.next()) {
        (Some(m), Some(t), Some(v)) if v.starts_with("HTTP/1.") => (m.to_string(), t),
        _ => return Err(error(400, "not an HTTP/1.x request line")),
    };
    let path = target.split('?').next().unwrap_or("").to_string();
    let mut length = 0usize;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(error(400, format!("bad header line {line:?}")));
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        if name == "content-length" {
            length = value
                .parse()
                .map_err(|_| error(400, "bad Content-Length"))?;
        } else if name == "transfer-encoding" && !value.eq_ignore_ascii_case("identity") {
            return Err(error(411, "send the body with a Content-Length"));
        }
    }
    if length > max_body {
        return Err(error(
            413,
            format!("the body is {length} bytes; the limit is {max_body}"),
        ));
    }
    let mut body = buf.split_off(head_end + 4);
    while body.len() < length {
        let mut chunk = vec![0u8; (length - body.len()).min(64 * 1024)];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(error(400, "the body ended early")),
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    body.truncate(length);
    Ok(Request { method, path, body })
}

#[derive(Deserialize)]
#[serde(untagged)]
enum VoiceField {
    Name(String),
    Object { id: String },
}

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
    /// Accepted and ignored: there is one model, and no style prompt.
    #[serde(default, rename = "model")]
    _model: Option<Value>,
    #[serde(default, rename = "instructions")]
    _instructions: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Wav,
    Pcm,
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

fn speech_request(speech: &Speech, body: &[u8]) -> Result<(SpeechRequest, Format), Reply> {
    let b: SpeechBody =
        serde_json::from_slice(body).map_err(|e| error(400, format!("bad request body: {e}")))?;
    let format = match b.response_format.as_deref().unwrap_or("wav") {
        "wav" => Format::Wav,
        "pcm" => Format::Pcm,
        other => {
            return Err(error(
                400,
                format!("response_format {other:?} is not available here; use \"wav\" or \"pcm\""),
            ))
        }
    };
    if let Some(sf) = b.stream_format.as_deref().filter(|s| *s != "audio") {
        return Err(error(
            400,
            format!("stream_format {sf:?} is not available; use \"audio\""),
        ));
    }
    let mut r = SpeechRequest::new(b.input, Interface::Http, Destination::Client);
    r.voice = match &b.voice {
        None => None,
        Some(VoiceField::Name(n) | VoiceField::Object { id: n }) => {
            let known = speech.voices().iter().any(|v| &v.id == n);
            match (known, openai_voice(n)) {
                (true, _) => Some(n.clone()),
                (false, Some(v)) => Some(v.to_string()),
                (false, None) => return Err(error(400, format!("unknown voice {n:?}"))),
            }
        }
    };
    if let Some(speed) = b.speed {
        r.rate = scales::openai_speed(speed).map_err(|e| error(400, e))?;
    }
    Ok((r, format))
}

async fn write_json(stream: &mut TcpStream, Reply(status, body): Reply) -> std::io::Result<()> {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        _ => "Internal Server Error",
    }
}

async fn chunk(stream: &mut TcpStream, data: &[u8]) -> std::io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    stream
        .write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .await?;
    stream.write_all(data).await?;
    stream.write_all(b"\r\n").await
}

/// Submits the job and streams its audio. Bad input is a JSON error before any audio; a job
/// that fails later cuts the stream short (no final chunk), which clients see as an error; a
/// client that goes away drops, so cancels, the job.
async fn speak(speech: Arc<Speech>, mut stream: TcpStream, req: SpeechRequest, format: Format) {
    let job = match speech.speak_async(req).await {
        Ok(job) => job,
        Err(crate::Error::Internal(e)) => {
            let _ = write_json(&mut stream, error(500, e)).await;
            return;
        }
        Err(e) => {
            let _ = write_json(&mut stream, error(400, e.to_string())).await;
            return;
        }
    };
    let content_type = match format {
        Format::Wav => "audio/wav",
        Format::Pcm => "audio/pcm",
    };
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\
         X-Sample-Rate: {}\r\nConnection: close\r\n\r\n",
        speech.sample_rate()
    );
    let mut sent = stream.write_all(head.as_bytes()).await;
    if sent.is_ok() && format == Format::Wav {
        sent = chunk(&mut stream, &streaming_header(speech.sample_rate())).await;
    }
    if sent.is_ok() && stream_body(job, &mut stream).await.unwrap_or(false) {
        let _ = stream.write_all(b"0\r\n\r\n").await;
    }
    let _ = stream.shutdown().await;
}

/// The job's audio as chunks; true if it finished.
async fn stream_body(mut job: Speaking, stream: &mut TcpStream) -> std::io::Result<bool> {
    while let Some(ev) = job.next().await {
        match ev {
            Event::Audio { samples, .. } => chunk(stream, &s16le(&samples)).await?,
            Event::Finished { .. } => return Ok(true),
            Event::Failed { reason } | Event::Cancelled { reason } => {
                tracing::warn!(job = job.id, %reason, "http speech ended early");
                return Ok(false);
            }
            _ => {}
        }
    }
    Ok(false)
}
