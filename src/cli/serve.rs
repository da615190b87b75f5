//! `voxtrald serve`, `install`, and the commands that talk to a running daemon.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use serde_json::json;

use super::{ComputeDtype, ModelArgs};
use crate::daemon::client::Client;
use crate::daemon::config::{default_config_path, Config};
use crate::daemon::{dbus, playback::Playback, socket, socket_path, Daemon, Info};
use crate::engine::{Engine, EngineConfig};

#[derive(Args)]
pub struct ServeArgs {
    /// Configuration file (default `$XDG_CONFIG_HOME/voxtrald/config.toml`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Checkpoint directory (overrides the config).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N (overrides the config).
    #[arg(long)]
    pub device: Option<String>,
    #[arg(long, value_enum)]
    pub dtype: Option<ComputeDtype>,
    /// Weight storage: none or q8.
    #[arg(long, value_enum)]
    pub quant: Option<crate::model::nn::Quant>,
    /// Unix socket path (overrides the config).
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Do not serve D-Bus.
    #[arg(long)]
    pub no_dbus: bool,
}

pub fn load_config(path: Option<&Path>) -> anyhow::Result<Config> {
    match path.map(Path::to_path_buf).or_else(default_config_path) {
        Some(p) => {
            if path.is_some() && !p.exists() {
                bail!("{}: no such config file", p.display());
            }
            Ok(Config::load(&p)?)
        }
        None => Ok(Config::default()),
    }
}

pub fn run_serve(a: ServeArgs) -> anyhow::Result<()> {
    let cfg = load_config(a.config.as_deref())?;
    let margs = ModelArgs {
        model: a.model.clone().or(cfg.model.clone()),
        device: a
            .device
            .clone()
            .or(cfg.device.clone())
            .unwrap_or_else(|| "auto".into()),
        dtype: a.dtype.unwrap_or(match cfg.dtype.as_deref() {
            Some("bf16") => ComputeDtype::Bf16,
            Some("f32") => ComputeDtype::F32,
            _ => ComputeDtype::Auto,
        }),
        max_positions: crate::model::DEFAULT_MAX_POSITIONS,
        quant: a.quant.unwrap_or(match cfg.quant.as_deref() {
            Some("q8") => crate::model::nn::Quant::Q8,
            _ => crate::model::nn::Quant::None,
        }),
        max_memory: match &cfg.max_memory {
            Some(m) => Some(crate::cli::parse_size(m).map_err(anyhow::Error::msg)?),
            None => None,
        },
    };
    let path = socket_path(a.socket.as_ref().or(cfg.socket.as_ref()))?;
    // Claim the socket first: a second daemon fails at once, before loading anything.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let (listener, http_listener, mut term, mut int) = {
        let _g = rt.enter();
        // Signals are caught from here on, so a stop during model loading is clean too.
        use tokio::signal::unix::{signal, SignalKind};
        let http = match &cfg.http {
            Some(addr) => {
                let addr = crate::daemon::http::parse_addr(addr).map_err(anyhow::Error::msg)?;
                let l = std::net::TcpListener::bind(addr)
                    .with_context(|| format!("listening on {addr}"))?;
                l.set_nonblocking(true)?;
                Some(tokio::net::TcpListener::from_std(l)?)
            }
            None => None,
        };
        (
            socket::bind(&path)?,
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
    let model = Arc::new(margs.load()?);
    let voice = cfg.voice.clone().unwrap_or_else(|| "casual_male".into());
    model
        .voice(&voice)
        .with_context(|| format!("default voice {voice:?}"))?;
    let info = Info {
        model: model.dir().to_path_buf(),
        device: format!("{:?}", model.device()).to_lowercase(),
        dtype: format!("{:?}", model.dtype()).to_lowercase(),
        default_voice: voice,
        default_rate: cfg.rate.unwrap_or(1.0),
        http: http_addr,
    };
    let rate = model.sample_rate();
    let engine = Engine::new(
        model,
        EngineConfig {
            max_text_bytes: cfg.limits.max_text_bytes,
            max_streams: cfg.limits.max_streams,
            lexicon: cfg.lexicon()?.map(Arc::new),
            ..Default::default()
        },
    );
    let daemon = Arc::new(Daemon {
        engine,
        playback: Playback::new(rate, cfg.volume.unwrap_or(1.0)),
        info,
        limits: cfg.limits.clone(),
    });
    let use_dbus = !a.no_dbus && cfg.dbus.unwrap_or(true);
    rt.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let sock = tokio::spawn(socket::serve(
            daemon.clone(),
            listener,
            path.clone(),
            stop_rx.clone(),
        ));
        if let Some(l) = http_listener {
            tokio::spawn(crate::daemon::http::serve(daemon.clone(), l, stop_rx));
        }
        let bus = if use_dbus {
            match dbus::serve(daemon.clone()).await {
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
        let d = daemon.clone();
        let _ = tokio::task::spawn_blocking(move || d.stop_all()).await;
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

/// A connection to the running daemon, if there is one.
pub fn daemon_client() -> Option<Client> {
    let cfg = load_config(None).ok()?;
    let path = socket_path(cfg.socket.as_ref()).ok()?;
    Client::connect(&path)
}

pub fn run_status() -> anyhow::Result<()> {
    let mut c = daemon_client().context("no voxtrald daemon is running")?;
    let s = c.call(json!({"op": "status"}))?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

pub fn run_stop() -> anyhow::Result<()> {
    let mut c = daemon_client().context("no voxtrald daemon is running")?;
    c.call(json!({"op": "stop"}))?;
    Ok(())
}

/// Writes the user units with this binary's path and says how to enable them.
pub fn run_install(user: bool) -> anyhow::Result<()> {
    if !user {
        bail!("only per-user installs are supported: voxtrald install --user");
    }
    let exe = std::env::current_exe().context("locating this binary")?;
    let bindir = exe
        .parent()
        .context("the binary has no directory")?
        .to_string_lossy()
        .into_owned();
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME is not set")?;
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".config"));
    let data = std::env::var_os("XDG_DATA_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".local/share"));
    // (path, contents, executable)
    let files = [
        (
            config.join("systemd/user/voxtrald.service"),
            include_str!("../../systemd/voxtrald.service"),
            false,
        ),
        (
            data.join("dbus-1/services/org.voxtrald.Speech.Provider.service"),
            include_str!("../../systemd/org.voxtrald.Speech.Provider.service"),
            false,
        ),
        // Where speech-dispatcher looks for a user's own output modules.
        (
            home.join(".local/libexec/speech-dispatcher-modules/sd_voxtrald"),
            include_str!("../../systemd/sd_voxtrald"),
            true,
        ),
    ];
    for (path, template, executable) in files {
        let dir = path.parent().context("no parent")?;
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let text = template.replace("@BINDIR@", &bindir);
        crate::atomic::write_atomic(&path, |w| std::io::Write::write_all(w, text.as_bytes()))?;
        if executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("making {} executable", path.display()))?;
        }
        println!("wrote {}", path.display());
    }
    println!(
        "enable with: systemctl --user daemon-reload && systemctl --user enable --now voxtrald\n\
         Speech Dispatcher finds the module `voxtrald` when it next starts (try \
         `spd-say -o voxtrald hello`); a speechd.conf with AddModule lines also needs \
         `AddModule \"voxtrald\" \"sd_voxtrald\" \"voxtrald.conf\"`"
    );
    Ok(())
}
