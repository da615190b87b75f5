//! `voxtrald serve`: start-up wiring. Claim the socket (and the HTTP address) before loading
//! anything, so a second daemon fails at once; catch signals from then on; load the model; put
//! the speech service under every configured interface; on SIGTERM or SIGINT cancel the jobs,
//! remove the socket and release the bus name.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::frontends;
use crate::service::Speech;
use crate::settings::Settings;

/// Runs the daemon until a signal stops it.
pub fn run(settings: Settings) -> anyhow::Result<()> {
    let path = settings.socket_path()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (listener, http_listener, mut term, mut int) = {
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
        (
            frontends::socket::bind(&path)?,
            http,
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        )
    };
    let http_addr = match &http_listener {
        Some(l) => Some(l.local_addr()?.to_string()),
        None => None,
    };
    let path_guard = RemoveOnDrop(path.clone());
    let model = Arc::new(settings.model.load()?);
    let voice = settings.voice.clone();
    let use_dbus = settings.dbus;
    let speech = Arc::new(
        Speech::new(model, settings, http_addr)
            .with_context(|| format!("default voice {voice:?}"))?,
    );
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let sock = tokio::spawn(frontends::socket::serve(
            speech.clone(),
            listener,
            path.clone(),
            stop_rx.clone(),
        ));
        if let Some(l) = http_listener {
            tokio::spawn(frontends::http::serve(speech.clone(), l, stop_rx));
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

/// Removes the socket however `serve` ends (an error while loading, say).
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
