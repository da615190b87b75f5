//! The Unix-socket API: per-user, 0600, peer uid checked; JSON lines (see
//! `docs/socket-protocol.md`). Each connection has a bounded outbox: a client that reads
//! slowly makes its own jobs wait, never the others or the engine.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use super::protocol::{
    amount, code_offset, error_json, event_json, status_json, user_voices_json, voices_json,
    Message, Output,
};
use crate::audio::pcm::s16le;
use crate::engine::{Destination, Event, Interface};
use crate::error::{Error, Result};
use crate::service::{Request, Speaking, Speech};

enum Out {
    Line(serde_json::Value),
    Raw(Vec<u8>),
    /// Close after everything queued before it.
    End,
}

/// Creates the socket's directory (0700) and binds the socket (0600). A stale socket left by
/// a dead daemon is replaced; a live one is an error.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(dir, e))?;
        }
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(Error::InvalidInput(format!(
                "{}: another voxtrald is already listening there",
                path.display()
            )));
        }
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| Error::io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(path, e))?;
    Ok(listener)
}

fn my_uid() -> u32 {
    std::fs::metadata("/proc/self").map_or(u32::MAX, |m| m.uid())
}

/// Accepts clients until `shutdown` turns true, then removes the socket.
pub async fn serve(
    speech: Arc<Speech>,
    listener: UnixListener,
    path: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) {
    let clients = Arc::new(AtomicUsize::new(0));
    let uid = my_uid();
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let d = speech.clone();
                    let c = clients.clone();
                    tokio::spawn(async move { client(d, stream, uid, c).await });
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
            _ = shutdown.changed() => break,
        }
    }
    let _ = std::fs::remove_file(&path);
}

async fn client(speech: Arc<Speech>, mut stream: UnixStream, uid: u32, clients: Arc<AtomicUsize>) {
    let peer = stream.peer_cred().map(|c| c.uid()).ok();
    if peer != Some(uid) {
        tracing::warn!(peer_uid = ?peer, "refused a client of another user");
        let line = error_json("permission denied: this daemon serves only its own user");
        let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
        return;
    }
    let n = clients.fetch_add(1, Ordering::SeqCst) + 1;
    struct Count(Arc<AtomicUsize>);
    impl Drop for Count {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _count = Count(clients.clone());
    let limits = &speech.settings().limits;
    if n > limits.max_clients {
        let line = error_json(format!("too many clients (limit {})", limits.max_clients));
        let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
        return;
    }
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Out>(limits.client_buffer);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let written = match m {
                Out::Line(v) => wr.write_all(format!("{v}\n").as_bytes()).await,
                Out::Raw(b) => wr.write_all(&b).await,
                Out::End => break,
            };
            if written.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut rd = BufReader::new(rd);
    let limit = limits.max_request_bytes;
    loop {
        let line = match read_line(&mut rd, limit).await {
            Ok(Some(l)) => l,
            Ok(None) => break,
            Err(msg) => {
                if tx.send(Out::Line(error_json(msg))).await.is_err() {
                    break;
                }
                continue;
            }
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let reply = match std::str::from_utf8(&line) {
            Err(e) => Err(format!(
                "the request is not valid UTF-8 (at byte {})",
                e.valid_up_to()
            )),
            Ok(text) => match serde_json::from_str::<Message>(text) {
                Err(e) => Err(format!("malformed request: {e}")),
                Ok(msg) => handle(&speech, msg, &tx).await,
            },
        };
        let raw = matches!(reply, Ok(Some(Output::Raw)));
        if let Err(msg) = reply {
            if tx.send(Out::Line(error_json(msg))).await.is_err() {
                break;
            }
        }
        if raw {
            // The connection now carries PCM only; stop reading requests.
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// One request line, without its newline; `Err` for a line over `limit` (skipped whole).
async fn read_line<R: AsyncBufReadExt + Unpin>(
    rd: &mut R,
    limit: usize,
) -> std::result::Result<Option<Vec<u8>>, String> {
    let mut line = Vec::new();
    let mut too_long = false;
    loop {
        let buf = match rd.fill_buf().await {
            Ok(b) => b,
            Err(_) => return Ok(None),
        };
        if buf.is_empty() {
            return Ok(if line.is_empty() || too_long {
                None
            } else {
                Some(line)
            });
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        if !too_long {
            if line.len() + chunk.len() > limit {
                too_long = true;
                line = Vec::new();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        let used = done.unwrap_or(buf.len());
        rd.consume(used);
        if done.is_some() {
            return if too_long {
                Err(format!("the request is larger than {limit} bytes"))
            } else {
                Ok(Some(line))
            };
        }
    }
}

/// Handles one request; `Ok(Some(output))` for an accepted speak.
async fn handle(
    speech: &Arc<Speech>,
    msg: Message,
    tx: &mpsc::Sender<Out>,
) -> std::result::Result<Option<Output>, String> {
    let reply = match msg {
        Message::Speak(s) => {
            let (output, tag) = (s.output, s.tag);
            let destination = match output {
                Output::Play => Destination::Speaker,
                Output::Stream | Output::Raw => Destination::Client,
            };
            let mut req = Request::new(s.text, Interface::Socket, destination);
            req.ssml = s.ssml;
            req.voice = s.voice;
            req.priority = s.priority;
            req.seed = s.seed;
            req.rate = amount(s.rate, s.relative_rate);
            req.pitch = amount(s.pitch, s.relative_pitch);
            req.volume = s.volume;
            req.punctuation = s.punctuation;
            req.max_frames = s.max_frames;
            req.cfg_alpha = s.cfg_alpha;
            let job = speech.speak_async(req).await.map_err(|e| e.to_string())?;
            let mut accepted = serde_json::json!({"event": "accepted", "job": job.id, "tag": tag});
            if output != Output::Play {
                accepted["format"] = "s16le".into();
                accepted["rate"] = speech.sample_rate().into();
                accepted["sample_rate"] = speech.sample_rate().into();
                accepted["channels"] = 1.into();
            }
            let _ = tx.send(Out::Line(accepted)).await;
            tokio::spawn(forward(job, output, tx.clone()));
            return Ok(Some(output));
        }
        Message::Cancel { job } => {
            let cancelled = speech.cancel(job, Interface::Socket);
            serde_json::json!({"event": "ok", "op": "cancel", "job": job, "cancelled": cancelled})
        }
        Message::Stop => {
            let _ = speech.off_runtime(|s| s.stop_all(Interface::Socket)).await;
            serde_json::json!({"event": "ok", "op": "stop"})
        }
        Message::Pause => {
            speech.set_paused(true);
            serde_json::json!({"event": "ok", "op": "pause"})
        }
        Message::Resume => {
            speech.set_paused(false);
            serde_json::json!({"event": "ok", "op": "resume"})
        }
        Message::Voices => voices_json(&speech.voices()),
        Message::Status => status_json(&speech.status()),
        Message::UserVoices => {
            let entries = speech.user_voices().map_err(|e| e.to_string())?;
            user_voices_json(&entries)
        }
        Message::VoiceImport {
            name,
            language,
            path,
            offset,
        } => {
            let offset = code_offset(offset.as_deref())?;
            let v = speech
                .try_off_runtime(move |s| s.import_voice(&name, &language, &path, offset))
                .await
                .map_err(|e| e.to_string())?;
            serde_json::json!({"event": "voice", "voice": v})
        }
        Message::VoiceExport { name, path } => {
            speech
                .try_off_runtime(move |s| s.export_voice(&name, &path))
                .await
                .map_err(|e| e.to_string())?;
            serde_json::json!({"event": "ok", "op": "voice_export"})
        }
        Message::VoiceRemove { name } => {
            speech
                .try_off_runtime(move |s| s.remove_voice(&name))
                .await
                .map_err(|e| e.to_string())?;
            serde_json::json!({"event": "ok", "op": "voice_remove"})
        }
        Message::VoiceRename { from, to } => {
            let v = speech
                .try_off_runtime(move |s| s.rename_voice(&from, &to))
                .await
                .map_err(|e| e.to_string())?;
            serde_json::json!({"event": "voice", "voice": v})
        }
    };
    let _ = tx.send(Out::Line(reply)).await;
    Ok(None)
}

/// Moves a job's events to its client at the pace the client reads them. A client that leaves
/// drops the job, which cancels it unless the daemon plays it.
async fn forward(mut job: Speaking, output: Output, tx: mpsc::Sender<Out>) {
    let id = job.id;
    while let Some(ev) = job.next().await {
        let msg = match (output, ev) {
            (Output::Raw, Event::Audio { samples, .. }) => Out::Raw(s16le(&samples)),
            (Output::Raw, _) => continue,
            (_, ev) => match event_json(id, &ev, output == Output::Stream) {
                Some(line) => Out::Line(line),
                None => continue,
            },
        };
        if tx.send(msg).await.is_err() {
            return;
        }
    }
    if output == Output::Raw {
        let _ = tx.send(Out::End).await;
    }
}
