//! The Unix-socket API: per-user, 0600, peer uid checked; JSON lines (see
//! `docs/socket-protocol.md`). Every client has a bounded outbox; one that does not keep up is
//! dropped with a reason, so no client can stall the others or the engine.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use super::protocol::{error_json, event_json, parse_priority, pcm_s16le, Output, Request};
use super::Daemon;
use crate::engine::{Destination, Event, SpeechRequest};
use crate::error::{Error, Result};

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
    daemon: Arc<Daemon>,
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
                    let d = daemon.clone();
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

async fn client(daemon: Arc<Daemon>, mut stream: UnixStream, uid: u32, clients: Arc<AtomicUsize>) {
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
    if n > daemon.limits.max_clients {
        let line = error_json(format!(
            "too many clients (limit {})",
            daemon.limits.max_clients
        ));
        let _ = stream.write_all(format!("{line}\n").as_bytes()).await;
        return;
    }
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Out>(daemon.limits.client_buffer);
    let (drop_tx, mut drop_rx) = watch::channel::<Option<String>>(None);
    let drop_tx = Arc::new(drop_tx);
    let writer = tokio::spawn(async move {
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(Out::Line(v)) => {
                        if wr.write_all(format!("{v}\n").as_bytes()).await.is_err() {
                            break;
                        }
                    }
                    Some(Out::Raw(b)) => {
                        if wr.write_all(&b).await.is_err() {
                            break;
                        }
                    }
                    Some(Out::End) | None => break,
                },
                _ = drop_rx.changed() => {
                    let reason = drop_rx.borrow().clone().unwrap_or_default();
                    tracing::warn!(%reason, "dropping a client");
                    let _ = wr.write_all(format!("{}\n", error_json(reason)).as_bytes()).await;
                    break;
                }
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut rd = BufReader::new(rd);
    let limit = daemon.limits.max_request_bytes;
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
            Ok(text) => match serde_json::from_str::<Request>(text) {
                Err(e) => Err(format!("malformed request: {e}")),
                Ok(req) => handle(&daemon, req, &tx, &drop_tx).await,
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
    daemon: &Arc<Daemon>,
    req: Request,
    tx: &mpsc::Sender<Out>,
    drop_tx: &Arc<watch::Sender<Option<String>>>,
) -> std::result::Result<Option<Output>, String> {
    let ok = |v: serde_json::Value| Out::Line(v);
    let reply = match req {
        Request::Speak {
            text,
            voice,
            priority,
            output,
            seed,
            rate,
            pitch,
            tag,
        } => {
            let priority = parse_priority(priority.as_deref())?;
            let mut r = SpeechRequest::new(
                text,
                voice.unwrap_or_else(|| daemon.info.default_voice.clone()),
            );
            r.priority = priority;
            if output != Output::Play {
                r.destination = Destination::Client;
            }
            r.seed = seed.unwrap_or(0);
            r.max_frames = daemon.limits.max_frames;
            r.rate = rate.unwrap_or(daemon.info.default_rate);
            r.pitch = pitch.unwrap_or(1.0);
            let d = daemon.clone();
            let job = tokio::task::spawn_blocking(move || d.engine.submit(r))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let id = job.id;
            let mut accepted = json!({"event": "accepted", "job": id, "tag": tag});
            if output != Output::Play {
                accepted["format"] = "s16le".into();
                accepted["rate"] = daemon.sample_rate().into();
                accepted["channels"] = 1.into();
            }
            let _ = tx.send(ok(accepted)).await;
            let d = daemon.clone();
            let tx = tx.clone();
            let drop_tx = drop_tx.clone();
            std::thread::spawn(move || forward(d, job, output, tx, drop_tx));
            return Ok(Some(output));
        }
        Request::Cancel { job } => {
            json!({"event": "ok", "op": "cancel", "job": job, "cancelled": daemon.engine.cancel(job)})
        }
        Request::Stop => {
            let d = daemon.clone();
            let _ = tokio::task::spawn_blocking(move || d.stop_all()).await;
            json!({"event": "ok", "op": "stop"})
        }
        Request::Pause => {
            daemon.playback.set_paused(true);
            json!({"event": "ok", "op": "pause"})
        }
        Request::Resume => {
            daemon.playback.set_paused(false);
            json!({"event": "ok", "op": "resume"})
        }
        Request::Voices => {
            let voices: Vec<_> = daemon
                .voices()
                .into_iter()
                .map(|(id, lang)| json!({"id": id, "language": lang}))
                .collect();
            json!({"event": "voices", "voices": voices})
        }
        Request::Status => status_json(daemon),
    };
    let _ = tx.send(ok(reply)).await;
    Ok(None)
}

pub fn status_json(daemon: &Daemon) -> serde_json::Value {
    json!({
        "event": "status",
        "model": daemon.info.model.display().to_string(),
        "device": daemon.info.device,
        "dtype": daemon.info.dtype,
        "voice": daemon.info.default_voice,
        "queue": daemon.engine.queue_len(),
        "paused": daemon.playback.is_paused(),
        "peak_rss_bytes": crate::cli::peak_rss_bytes(),
        "http": daemon.info.http,
    })
}

/// Moves a job's events to its client (on a plain thread: `Job::recv` blocks).
fn forward(
    daemon: Arc<Daemon>,
    mut job: crate::engine::Job,
    output: Output,
    tx: mpsc::Sender<Out>,
    drop_tx: Arc<watch::Sender<Option<String>>>,
) {
    let id = job.id;
    // Returns false when the client is gone or too slow; audio it receives itself stops then,
    // audio the daemon plays does not.
    let cancels = output != Output::Play;
    let push = |m: Out| -> bool {
        match tx.try_send(m) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if cancels {
                    daemon.engine.cancel(id);
                }
                let _ = drop_tx.send(Some(format!(
                    "dropped: the client did not keep up with job {id}"
                )));
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                if cancels {
                    daemon.engine.cancel(id);
                }
                false
            }
        }
    };
    match output {
        Output::Play => {
            let mut alive = true;
            daemon.play_job(job, |ev| {
                if alive {
                    if let Some(j) = event_json(id, ev, false) {
                        alive = push(Out::Line(j));
                    }
                }
            });
            // A client that left does not stop what it asked the daemon to say.
            return;
        }
        Output::Stream => {
            while let Some(ev) = job.recv() {
                if let Some(j) = event_json(id, &ev, true) {
                    if !push(Out::Line(j)) {
                        break;
                    }
                }
            }
        }
        Output::Raw => {
            while let Some(ev) = job.recv() {
                let ok = match &ev {
                    Event::Audio { samples, .. } => push(Out::Raw(pcm_s16le(samples))),
                    _ => true,
                };
                if !ok {
                    break;
                }
            }
            let _ = tx.try_send(Out::End);
        }
    }
    while job.recv().is_some() {}
}
