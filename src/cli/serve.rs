//! `voxtrald serve`'s arguments, `install`, and the commands that talk to a running daemon.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

use crate::client::socket::Client;
use crate::frontends::protocol::Message;
use crate::model::device::{DeviceChoice, DtypeChoice};
use crate::settings::{config_home, data_home, Overrides};

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
    pub device: Option<DeviceChoice>,
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeChoice>,
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

impl ServeArgs {
    pub fn overrides(self) -> Overrides {
        Overrides {
            config: self.config,
            model: self.model,
            device: self.device,
            dtype: self.dtype,
            quant: self.quant,
            socket: self.socket,
            no_dbus: self.no_dbus,
        }
    }
}

pub fn run_status() -> anyhow::Result<()> {
    let mut c = Client::of_this_user().context("no voxtrald daemon is running")?;
    let s = c.call(Message::Status)?;
    println!("{}", serde_json::to_string_pretty(&s)?);
    Ok(())
}

pub fn run_stop() -> anyhow::Result<()> {
    let mut c = Client::of_this_user().context("no voxtrald daemon is running")?;
    c.call(Message::Stop)?;
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
    let config = config_home().unwrap_or_else(|| home.join(".config"));
    let data = data_home().unwrap_or_else(|| home.join(".local/share"));
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
        // Where speech-dispatcher looks for a user's own output modules: beside the data
        // folder, `$XDG_DATA_HOME/../libexec/speech-dispatcher-modules` (speechd 0.11).
        (
            data.parent()
                .unwrap_or(&data)
                .join("libexec/speech-dispatcher-modules/sd_voxtrald"),
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
