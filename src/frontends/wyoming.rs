//! The Wyoming protocol (Home Assistant's local voice services, as wyoming-piper serves them):
//! `describe` -> `info`, `synthesize` -> `audio-start`, `audio-chunk`s, `audio-stop`, and
//! streamed text (`synthesize-start`, `synthesize-chunk`s, `synthesize-stop`) spoken sentence by
//! sentence as each is complete, then `synthesize-stopped`. Off unless configured; TCP or a
//! Unix socket. The protocol has no authentication.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::watch;

use crate::audio::pcm::s16le;
use crate::engine::{Destination, Event, Interface};
use crate::service::{Request, Speech, Voice};
use crate::text::sentences::{char_slice, split_sentences};

/// Largest header line and largest data block.
const MAX_JSON: usize = 1 << 20;
/// Largest payload accepted (and skipped: no TTS request carries one).
const MAX_PAYLOAD: u64 = 16 << 20;

/// One event as the protocol frames it: `data` merged from the header and the data block.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub kind: String,
    pub data: Map<String, Value>,
    pub payload: Vec<u8>,
}

/// Why a connection cannot go on.
#[derive(Debug)]
enum ReadError {
    /// The peer closed or broke the connection.
    Closed,
    /// A frame we cannot read; the connection is out of step after it.
    Bad(String),
}

/// Reads one event: a JSON header line, `data_length` bytes of JSON merged over its `data`,
/// `payload_length` bytes of payload.
async fn read_message<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<Message, ReadError> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(MAX_JSON as u64 + 1)
        .read_until(b'\n', &mut line)
        .await
        .map_err(|_| ReadError::Closed)?;
    if n == 0 {
        return Err(ReadError::Closed);
    }
    if line.len() > MAX_JSON {
        return Err(ReadError::Bad(format!(
            "the event header is larger than {MAX_JSON} bytes"
        )));
    }
    let header: Value = serde_json::from_slice(&line)
        .map_err(|e| ReadError::Bad(format!("the event header is not JSON: {e}")))?;
    let kind = header["type"]
        .as_str()
        .ok_or_else(|| ReadError::Bad("the event has no \"type\"".into()))?
        .to_string();
    let mut data = match &header["data"] {
        Value::Object(m) => m.clone(),
        Value::Null => Map::new(),
        _ => return Err(ReadError::Bad("\"data\" is not an object".into())),
    };
    let length = |key: &str| -> Result<u64, ReadError> {
        match &header[key] {
            Value::Null => Ok(0),
            v => v
                .as_u64()
                .ok_or_else(|| ReadError::Bad(format!("\"{key}\" is not a length"))),
        }
    };
    let data_length = length("data_length")?;
    let payload_length = length("payload_length")?;
    if data_length > MAX_JSON as u64 || payload_length > MAX_PAYLOAD {
        return Err(ReadError::Bad("the event is too large".into()));
    }
    if data_length > 0 {
        let mut block = vec![0; data_length as usize];
        r.read_exact(&mut block)
            .await
            .map_err(|_| ReadError::Closed)?;
        match serde_json::from_slice(&block) {
            Ok(Value::Object(m)) => data.extend(m),
            _ => return Err(ReadError::Bad("the data block is not a JSON object".into())),
        }
    }
    let mut payload = vec![0; payload_length as usize];
    r.read_exact(&mut payload)
        .await
        .map_err(|_| ReadError::Closed)?;
    Ok(Message {
        kind,
        data,
        payload,
    })
}

/// Writes one event as the reference implementation does: `data` in its own block.
async fn write_message<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: &str,
    data: Value,
    payload: &[u8],
) -> std::io::Result<()> {
    let mut header = json!({"type": kind, "version": "1.8.0"});
    let block = match data {
        Value::Object(m) if !m.is_empty() => serde_json::to_vec(&m)?,
        _ => Vec::new(),
    };
    if !block.is_empty() {
        header["data_length"] = block.len().into();
    }
    if !payload.is_empty() {
        header["payload_length"] = payload.len().into();
    }
    let mut out = serde_json::to_vec(&header)?;
    out.push(b'\n');
    out.extend_from_slice(&block);
    out.extend_from_slice(payload);
    w.write_all(&out).await?;
    w.flush().await
}

fn error(text: impl Into<String>) -> Value {
    json!({"text": text.into(), "code": "voxtrald"})
}

/// `info`: one installed TTS program with every voice.
fn info(voices: &[Voice]) -> Value {
    let attribution = json!({
        "name": "Mistral AI",
        "url": "https://huggingface.co/mistralai/Voxtral-4B-TTS-2603",
    });
    let version = env!("CARGO_PKG_VERSION");
    let voices: Vec<Value> = voices
        .iter()
        .map(|v| {
            json!({
                "name": v.id,
                "attribution": attribution,
                "installed": true,
                "description": v.display_name,
                "version": version,
                "languages": [v.language],
                "speakers": null,
            })
        })
        .collect();
    json!({
        "asr": [], "handle": [], "intent": [], "wake": [], "mic": [], "snd": [],
        "tts": [{
            "name": "voxtrald",
            "attribution": attribution,
            "installed": true,
            "description": "Voxtral TTS, on this machine (voxtrald)",
            "version": version,
            "voices": voices,
            "supports_synthesize_streaming": true,
        }],
    })
}

/// The voice a `voice` object asks for: by name, else by language, else the default.
fn pick_voice(voices: &[Voice], voice: Option<&Value>) -> Result<Option<String>, String> {
    let Some(v) = voice.filter(|v| v.is_object()) else {
        return Ok(None);
    };
    if let Some(name) = v["name"].as_str().filter(|n| !n.is_empty()) {
        return match voices.iter().find(|x| x.id == name) {
            Some(x) => Ok(Some(x.id.clone())),
            None => Err(format!("unknown voice {name:?}")),
        };
    }
    if let Some(lang) = v["language"].as_str().filter(|l| !l.is_empty()) {
        let primary = lang.split(['-', '_']).next().unwrap_or("").to_lowercase();
        return match voices.iter().find(|x| x.language == primary) {
            Some(x) => Ok(Some(x.id.clone())),
            None => Err(format!("no voice speaks {lang:?}")),
        };
    }
    Ok(None)
}

/// Serves connections until `shutdown` turns true.
pub async fn serve<L: Listener>(
    speech: Arc<Speech>,
    listener: L,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = listener.accept_one() => match r {
                Ok((rd, wr)) => {
                    let s = speech.clone();
                    tokio::spawn(async move { connection(s, rd, wr).await });
                }
                Err(e) => tracing::warn!(error = %e, "wyoming accept failed"),
            },
            _ = shutdown.changed() => break,
        }
    }
}

/// A TCP or Unix listener, as one type for [`serve`].
pub trait Listener: Send + 'static {
    type Read: AsyncRead + Unpin + Send + 'static;
    type Write: AsyncWrite + Unpin + Send + 'static;
    fn accept_one(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Read, Self::Write)>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    async fn accept_one(&self) -> std::io::Result<(Self::Read, Self::Write)> {
        let (s, _) = self.accept().await?;
        let _ = s.set_nodelay(true);
        Ok(s.into_split())
    }
}

impl Listener for tokio::net::UnixListener {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    async fn accept_one(&self) -> std::io::Result<(Self::Read, Self::Write)> {
        let (s, _) = self.accept().await?;
        Ok(s.into_split())
    }
}

/// Text streamed in by `synthesize-chunk`s, not yet spoken.
struct Streaming {
    voice: Option<String>,
    pending: String,
}

async fn connection<R, W>(speech: Arc<Speech>, rd: R, mut wr: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut rd = BufReader::new(rd);
    let mut streaming: Option<Streaming> = None;
    loop {
        let msg = match read_message(&mut rd).await {
            Ok(m) => m,
            Err(ReadError::Closed) => return,
            Err(ReadError::Bad(why)) => {
                // Out of step with the framing: say why, then close.
                let _ = write_message(&mut wr, "error", error(why), &[]).await;
                return;
            }
        };
        let sent = handle(&speech, msg, &mut streaming, &mut wr).await;
        if sent.is_err() {
            return;
        }
    }
}

async fn handle<W: AsyncWrite + Unpin>(
    speech: &Arc<Speech>,
    msg: Message,
    streaming: &mut Option<Streaming>,
    wr: &mut W,
) -> std::io::Result<()> {
    let voices = || speech.voices();
    match msg.kind.as_str() {
        "describe" => write_message(wr, "info", info(&voices()), &[]).await,
        "ping" => write_message(wr, "pong", json!({}), &[]).await,
        // The compatibility copy of a streamed text is ignored while streaming.
        "synthesize" if streaming.is_some() => Ok(()),
        "synthesize" => {
            let Some(text) = msg.data.get("text").and_then(Value::as_str) else {
                return write_message(wr, "error", error("synthesize needs \"text\""), &[]).await;
            };
            match pick_voice(&voices(), msg.data.get("voice")) {
                Ok(voice) => speak(speech, text, voice, wr).await,
                Err(why) => write_message(wr, "error", error(why), &[]).await,
            }
        }
        "synthesize-start" => match pick_voice(&voices(), msg.data.get("voice")) {
            Ok(voice) => {
                *streaming = Some(Streaming {
                    voice,
                    pending: String::new(),
                });
                Ok(())
            }
            Err(why) => write_message(wr, "error", error(why), &[]).await,
        },
        "synthesize-chunk" => {
            let Some(s) = streaming.as_mut() else {
                return write_message(
                    wr,
                    "error",
                    error("synthesize-chunk before synthesize-start"),
                    &[],
                )
                .await;
            };
            s.pending
                .push_str(msg.data.get("text").and_then(Value::as_str).unwrap_or(""));
            // Every sentence but the last is complete: another one has begun after it.
            let ranges = split_sentences(&s.pending, usize::MAX);
            if ranges.len() < 2 {
                return Ok(());
            }
            let cut = ranges[ranges.len() - 1].start;
            let done = char_slice(&s.pending, &(0..cut));
            s.pending = char_slice(&s.pending, &(cut..s.pending.chars().count()));
            let voice = s.voice.clone();
            speak(speech, &done, voice, wr).await
        }
        "synthesize-stop" => {
            if let Some(s) = streaming.take() {
                if !s.pending.trim().is_empty() {
                    speak(speech, &s.pending, s.voice, wr).await?;
                }
            }
            write_message(wr, "synthesize-stopped", json!({}), &[]).await
        }
        other => {
            tracing::debug!(kind = other, "wyoming event ignored");
            Ok(())
        }
    }
}

/// Speaks `text` as one audio stream: `audio-start`, `audio-chunk`s, `audio-stop`; a refused
/// request is an `error` event.
async fn speak<W: AsyncWrite + Unpin>(
    speech: &Arc<Speech>,
    text: &str,
    voice: Option<String>,
    wr: &mut W,
) -> std::io::Result<()> {
    let mut req = Request::new(text, Interface::Wyoming, Destination::Client);
    req.voice = voice;
    let mut job = match speech.speak_async(req).await {
        Ok(j) => j,
        Err(e) => return write_message(wr, "error", error(e.to_string()), &[]).await,
    };
    let format = json!({"rate": speech.sample_rate(), "width": 2, "channels": 1});
    write_message(wr, "audio-start", format.clone(), &[]).await?;
    while let Some(ev) = job.next().await {
        match ev {
            Event::Audio { samples, .. } => {
                write_message(wr, "audio-chunk", format.clone(), &s16le(&samples)).await?
            }
            Event::Failed { reason } | Event::Cancelled { reason } => {
                write_message(wr, "audio-stop", json!({}), &[]).await?;
                return write_message(wr, "error", error(reason), &[]).await;
            }
            _ => {}
        }
    }
    write_message(wr, "audio-stop", json!({}), &[]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn read(bytes: &[u8]) -> Result<Message, ReadError> {
        read_message(&mut BufReader::new(bytes)).await
    }

    #[tokio::test]
    async fn data_comes_inline_or_as_a_block_and_payloads_are_read() {
        let m = read(b"{\"type\": \"synthesize\", \"data\": {\"text\": \"Hi.\"}}\n")
            .await
            .unwrap();
        assert_eq!(m.kind, "synthesize");
        assert_eq!(m.data["text"], "Hi.");
        let block = br#"{"text": "Hello.", "voice": {"name": "fr_male"}}"#;
        let mut raw = format!(
            "{{\"type\": \"synthesize\", \"data\": {{\"text\": \"x\", \"keep\": 1}}, \"data_length\": {}, \"payload_length\": 3}}\n",
            block.len()
        )
        .into_bytes();
        raw.extend_from_slice(block);
        raw.extend_from_slice(b"abc");
        let m = read(&raw).await.unwrap();
        assert_eq!(m.data["text"], "Hello.", "the block wins");
        assert_eq!(m.data["keep"], 1);
        assert_eq!(m.payload, b"abc");
        for bad in [
            &b"not json\n"[..],
            b"{\"data\": {}}\n",
            b"{\"type\": \"x\", \"data_length\": -1}\n",
            b"{\"type\": \"x\", \"data_length\": 99999999999}\n",
        ] {
            assert!(matches!(read(bad).await, Err(ReadError::Bad(_))), "{bad:?}");
        }
        assert!(matches!(read(b"").await, Err(ReadError::Closed)));
        // A data block cut short is a closed connection, not a panic.
        assert!(matches!(
            read(b"{\"type\": \"x\", \"data_length\": 10}\n{}").await,
            Err(ReadError::Closed)
        ));
    }

    #[tokio::test]
    async fn written_events_read_back() {
        let mut out = Vec::new();
        write_message(&mut out, "audio-chunk", json!({"rate": 24000}), b"\x01\x02")
            .await
            .unwrap();
        let m = read(&out).await.unwrap();
        assert_eq!(
            (
                m.kind.as_str(),
                m.data["rate"].as_u64(),
                m.payload.as_slice()
            ),
            ("audio-chunk", Some(24000), &b"\x01\x02"[..])
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: 512,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x5eed),
            failure_persistence: None,
            ..Default::default()
        })]

        /// Any bytes: frames are read or refused, never a panic, and the reader stops.
        #[test]
        fn framing_takes_any_bytes(
            pieces in proptest::collection::vec(proptest::prop_oneof![
                proptest::strategy::Just(b"{\"type\": \"ping\"}\n".to_vec()),
                proptest::strategy::Just(b"{\"type\": \"x\", \"data_length\": 3}\n".to_vec()),
                proptest::strategy::Just(b"{\"type\": \"x\", \"payload_length\": 2}\n".to_vec()),
                proptest::strategy::Just(b"{}\n".to_vec()),
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40),
            ], 0..12),
        ) {
            let bytes = pieces.concat();
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            rt.block_on(async {
                let mut r = BufReader::new(bytes.as_slice());
                for _ in 0..=bytes.len() {
                    if read_message(&mut r).await.is_err() {
                        break;
                    }
                }
            });
        }
    }
}
