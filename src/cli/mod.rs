//! Command-line interface: argument parsing and dispatch, nothing else imports it. Each
//! command lives in its own module; arguments become typed settings once, here.

mod bench;
mod dev;
mod say;
mod serve;
mod voice;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::client::socket::Client;
use crate::download::MODEL_REPO;
use crate::frontends::protocol::Message;
use crate::model::device::{DeviceChoice, DtypeChoice};
use crate::model::{Voxtral, DEFAULT_MAX_POSITIONS};
use crate::settings::{parse_size, ModelSettings, Settings};

#[derive(Parser)]
#[command(
    name = "voxtrald",
    version,
    about = "Local speech synthesis with Voxtral TTS"
)]
pub struct Cli {
    /// Log more (-v info, -vv debug); VOXTRALD_LOG / RUST_LOG override.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Synthesize speech from text (argument or stdin) to a WAV file.
    Say(say::SayArgs),
    /// List the preset voices of a model with their languages.
    Voices {
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Your own voices: list, import, export, remove, rename, and create (clone from a clip).
    #[command(subcommand)]
    Voice(voice::VoiceCommand),
    /// Measure load, prefill, per-frame and first-audio times.
    Bench(bench::BenchArgs),
    /// Download the official weights (resumable, verified) into the model directory.
    Pull {
        /// Target directory (default: $VOXTRALD_MODEL, else the user cache).
        #[arg(long, value_name = "DIR")]
        model: Option<PathBuf>,
        #[arg(long, default_value = MODEL_REPO)]
        repo: String,
        #[arg(long, default_value = "main")]
        revision: String,
    },
    /// Run the daemon: Unix socket and D-Bus, one model for all clients.
    Serve(serve::ServeArgs),
    /// Show the running daemon's state.
    Status,
    /// Stop everything the running daemon is saying.
    Stop,
    /// Speech Dispatcher output module (speech-dispatcher starts it as `sd_voxtrald`): speaks
    /// the module protocol on stdin/stdout, using the running daemon.
    SdModule {
        /// The module configuration file speech-dispatcher passes (not used).
        config: Option<PathBuf>,
    },
    /// Install the systemd user unit and D-Bus activation file.
    Install {
        /// Install for the current user (the only supported mode).
        #[arg(long)]
        user: bool,
    },
    /// Model-developer commands (stable contract for reference comparisons).
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

/// Where and how to load the model.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint directory in the official layout (params.json, consolidated.safetensors,
    /// tekken.json, voice_embedding/). Default: $VOXTRALD_MODEL, else the user cache.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// auto, cpu, cuda or cuda:N (auto = first CUDA device when built with `cuda`).
    #[arg(long, default_value = "auto")]
    pub device: DeviceChoice,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: DtypeChoice,
    /// Context limit in positions (prompt plus frames).
    #[arg(long, default_value_t = DEFAULT_MAX_POSITIONS)]
    pub max_positions: usize,
    /// Weight storage of the backbone and flow head: none (the compute dtype), q8 (int8) or
    /// q4 (4-bit feed-forward gate and up projections, int8 elsewhere).
    #[arg(long, value_enum, default_value = "none")]
    pub quant: crate::model::nn::Quant,
    /// Refuse to load a model that would need more memory than this (e.g. 6GiB, 512MiB,
    /// bytes). The device's free memory is always checked.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,
}

impl ModelArgs {
    pub fn settings(&self) -> ModelSettings {
        ModelSettings {
            device: self.device,
            dtype: self.dtype,
            quant: self.quant,
            max_positions: self.max_positions,
            max_memory: self.max_memory,
            ..ModelSettings::new(self.model.clone())
        }
    }

    pub fn load(&self) -> anyhow::Result<Voxtral> {
        Ok(self.settings().load()?)
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = std::env::var("VOXTRALD_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Say(a) => say::run(a),
        Command::Voices { model } => {
            if model.model.is_none() {
                if let Some(mut c) = Client::of_this_user() {
                    let v = c.call(Message::Voices)?;
                    for v in v["voices"].as_array().into_iter().flatten() {
                        println!(
                            "{:<18} {}",
                            v["id"].as_str().unwrap_or(""),
                            v["language"].as_str().unwrap_or("")
                        );
                    }
                    return Ok(());
                }
            }
            let m = model.load()?;
            for v in m.voices() {
                println!("{:<18} {}", v.name, v.language);
            }
            Ok(())
        }
        Command::Voice(v) => voice::run(v),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => crate::daemon::run(Settings::resolve(a.overrides())?),
        Command::Pull {
            model,
            repo,
            revision,
        } => {
            let dir = ModelSettings::new(model).dir;
            let hub = crate::download::Hub::from_env();
            crate::download::pull(&hub, &repo, &revision, &dir)?;
            println!("{}", dir.display());
            Ok(())
        }
        Command::Status => serve::run_status(),
        Command::Stop => serve::run_stop(),
        Command::Install { user } => serve::run_install(user),
        Command::SdModule { config: _ } => {
            // Resolved here, reported at INIT: speech-dispatcher only sees the protocol.
            let socket = Settings::of_this_user()
                .and_then(|s| s.socket_path())
                .map_err(anyhow::Error::from);
            crate::client::speechd::run(socket)
        }
        Command::Dev(d) => dev::run(d),
    }
}

/// Entry point of the `voxtrald` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("voxtrald: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
