//! `voxtrald serve`: start-up wiring. Claim the socket (and the HTTP address) before loading
//! anything, so a second daemon fails at once; catch signals from then on; load the model; put
//! the speech service under every configured interface; on SIGTERM or SIGINT cancel the jobs,
//! remove the socket and release the bus name.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::frontends;
use crate::service::{Listening, Speech};
use crate::settings::{ListenAddr, Settings};

/// The Wyoming server's listener.
enum WyomingListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

fn bind_wyoming(addr: &ListenAddr) -> anyhow::Result<WyomingListener> {
    Ok(match addr {
        ListenAddr::Tcp(a) => {
            if !a.ip().is_loopback() {
                tracing::warn!(
                    address = %a,
                    "the Wyoming server listens beyond this machine: the protocol has no \
                     authentication, anyone who can reach {a} can make it speak"
                );
            }
            let l = std::net::TcpListener::bind(a).with_context(|| format!("listening on {a}"))?;
            l.set_nonblocking(true)?;
            WyomingListener::Tcp(tokio::net::TcpListener::from_std(l)?)
        }
        ListenAddr::Unix(p) => WyomingListener::Unix(frontends::socket::bind(p)?, p.clone()),
    })
}

/// Runs the daemon until a signal stops it.
pub fn run(settings: Settings) -> anyhow::Result<()> {
    let path = settings.socket_path()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (listener, http_listener, wyoming_listener, mut term, mut int) = {
        let _g = rt.enter();
        let http = match settings.http {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("listening on {addr}"))?;
                l.set_nonblocking(true)?;
                Some(tokio::net::TcpListener::from_std(l)?)
            }
            None => None,
        };
        let wyoming = settings.wyoming.as_ref().map(bind_wyoming).transpose()?;
        (
            frontends::socket::bind(&path)?,
            http,
            wyoming,
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        )
    };
    let listening = Listening {
        http: match &http_listener {
            Some(l) => Some(l.local_addr()?.to_string()),
            None => None,
        },
        wyoming: match &wyoming_listener {
            Some(WyomingListener::Tcp(l)) => Some(l.local_addr()?.to_string()),
            Some(WyomingListener::Unix(_, p)) => Some(format!("unix://{}", p.display())),
            None => None,
        },
    };
    let path_guard = RemoveOnDrop(path.clone());
    let _wyoming_guard = match &wyoming_listener {
        Some(WyomingListener::Unix(_, p)) => Some(RemoveOnDrop(p.clone())),
        _ => None,
    };
    let model = Arc::new(settings.model.load()?);
    let voice = settings.voice.clone();
    let use_dbus = settings.dbus;
    let speech = Arc::new(
        Speech::new(model, settings, listening)
            .with_context(|| format!("default voice {voice:?}"))?,
    );
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(watch_voice_library(speech.clone()));
        let sock = tokio::spawn(frontends::socket::serve(
            speech.clone(),
            listener,
            path.clone(),
            stop_rx.clone(),
        ));
        if let Some(l) = http_listener {
            tokio::spawn(frontends::http::serve(speech.clone(), l, stop_rx.clone()));
        }
        match wyoming_listener {
            Some(WyomingListener::Tcp(l)) => {
                tokio::spawn(frontends::wyoming::serve(speech.clone(), l, stop_rx));
            }
            Some(WyomingListener::Unix(l, _)) => {
                tokio::spawn(frontends::wyoming::serve(speech.clone(), l, stop_rx));
            }
            None => {}
        }
        let bus = if use_dbus {
            match frontends::serve_dbus(speech.clone()).await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "D-Bus is not available; serving the socket only");
                    None
                }
            }
        } else {
            None
        };
        tracing::info!(socket = %path.display(), dbus = bus.is_some(), "voxtrald is ready");
        eprintln!("voxtrald: ready on {}", path.display());
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        let _ = speech.off_runtime(Speech::shut_down).await;
        drop(bus);
        let _ = sock.await;
        anyhow::Ok(())
    })?;
    drop(path_guard);
    Ok(())
}

/// How often the daemon looks at the voice library folder for voices added, changed or
/// removed by another program (`voxtrald voice ...` without a running daemon's help, a copy).
const LIBRARY_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps the user voices in line with the library folder. A listing of one small folder a
/// second costs nothing measurable, and works on every filesystem, unlike change notification.
async fn watch_voice_library(speech: Arc<Speech>) {
    let mut tick = tokio::time::interval(LIBRARY_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let _ = speech.off_runtime(Speech::sync_voices).await;
    }
}

/// Removes the socket however `serve` ends (an error while loading, say).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
