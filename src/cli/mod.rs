//! Command-line interface: argument parsing and dispatch. Each command lives in its own module.

mod bench;
pub use bench::peak_rss_bytes;
mod dev;
mod say;
mod sd_module;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::model::{LoadOptions, Voxtral, DEFAULT_MAX_POSITIONS};

/// The official model repository on the Hugging Face hub.
pub const MODEL_REPO: &str = "mistralai/Voxtral-4B-TTS-2603";

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ComputeDtype {
    /// bf16 on a GPU, f32 on the CPU (where candle's bf16 matmul is slow).
    Auto,
    F32,
    Bf16,
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
    pub device: String,
    /// Compute dtype.
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: ComputeDtype,
    /// Context limit in positions (prompt plus frames).
    #[arg(long, default_value_t = DEFAULT_MAX_POSITIONS)]
    pub max_positions: usize,
    /// Weight storage of the backbone and flow head: none (the compute dtype) or q8 (int8).
    #[arg(long, value_enum, default_value = "none")]
    pub quant: crate::model::nn::Quant,
    /// Refuse to load a model that would need more memory than this (e.g. 6GiB, 512MiB,
    /// bytes). The device's free memory is always checked.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<u64>,
}

/// `6GiB`, `6G`, `512MiB`, `512M`, `100k` or plain bytes (binary units throughout).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?} (e.g. 6GiB, 512MiB)"))?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "bad size unit in {s:?} (use B, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    Ok((n * scale as f64) as u64)
}

/// Default checkpoint location: `$XDG_CACHE_HOME/voxtrald/models/<repo>` (`~/.cache/...`).
pub fn default_model_dir() -> PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    cache.join("voxtrald").join("models").join(MODEL_REPO)
}

/// Checks a device name's syntax without opening it.
pub fn parse_device_name(s: &str) -> anyhow::Result<()> {
    match s {
        "cpu" | "auto" | "cuda" => Ok(()),
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(_)) => Ok(()),
            _ => bail!("unknown device {s:?} (expected auto, cpu, cuda or cuda:N)"),
        },
    }
}

pub fn parse_device(s: &str) -> anyhow::Result<Device> {
    parse_device_name(s)?;
    match s {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(if candle_core::utils::cuda_is_available() {
            open_cuda(0).unwrap_or_else(|e| {
                tracing::warn!("no usable CUDA device, using the CPU: {e:#}");
                Device::Cpu
            })
        } else {
            Device::Cpu
        }),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = s
                .strip_prefix("cuda:")
                .map(|n| n.parse())
                .transpose()
                .with_context(|| format!("bad device {s:?}"))?
                .unwrap_or(0);
            if !candle_core::utils::cuda_is_available() {
                bail!("device {s}: this voxtrald was built without CUDA support (build with --features cuda)");
            }
            open_cuda(n)
        }
        other => bail!("unknown device {other:?} (expected auto, cpu, cuda or cuda:N)"),
    }
}

/// Opens CUDA device `n`. CUDA builds load libcuda, cuBLAS and cuRAND at run time, and cudarc
/// panics when one of them cannot be loaded; that becomes an error here instead.
fn open_cuda(n: usize) -> anyhow::Result<Device> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Device::new_cuda(n));
    std::panic::set_hook(hook);
    match opened {
        Ok(dev) => dev.with_context(|| format!("cannot open CUDA device {n}")),
        Err(panic) => {
            let msg = crate::error::panic_message(panic.as_ref());
            // cudarc appends every file name it tried; the first sentence says what is missing.
            let msg = msg.split(" - searched for").next().unwrap_or(&msg);
            bail!(
                "cannot open CUDA device {n}: {msg} (needs the NVIDIA driver and the CUDA 13 \
                 libraries on the loader path, e.g. LD_LIBRARY_PATH)"
            )
        }
    }
}

impl ModelArgs {
    pub fn dir(&self) -> PathBuf {
        self.model
            .clone()
            .or_else(|| std::env::var_os("VOXTRALD_MODEL").map(PathBuf::from))
            .unwrap_or_else(default_model_dir)
    }

    pub fn load_options(&self) -> anyhow::Result<LoadOptions> {
        let device = parse_device(&self.device)?;
        let dtype = match self.dtype {
            ComputeDtype::Auto if device.is_cpu() => DType::F32,
            ComputeDtype::Auto | ComputeDtype::Bf16 => DType::BF16,
            ComputeDtype::F32 => DType::F32,
        };
        Ok(LoadOptions {
            device,
            dtype,
            max_positions: self.max_positions,
            quant: self.quant,
            max_memory: self.max_memory,
        })
    }

    /// A clear error when no checkpoint is at the model path. The default location is filled
    /// from the hub on first use.
    pub fn check_present(&self) -> anyhow::Result<()> {
        let dir = self.dir();
        let params = dir.join(crate::model::checkpoint::PARAMS_FILE);
        let explicit = self.model.is_some() || std::env::var_os("VOXTRALD_MODEL").is_some();
        if !params.exists() && !explicit {
            eprintln!(
                "voxtrald: downloading {MODEL_REPO} (8 GB) to {} on first use",
                dir.display()
            );
            let hub = crate::download::Hub::from_env();
            crate::download::pull(&hub, MODEL_REPO, "main", &dir)?;
        }
        if !params.exists() {
            bail!(
                "no model at {}: run `voxtrald pull --model {}` (downloads {MODEL_REPO}), or pass --model DIR",
                dir.display(),
                dir.display()
            );
        }
        Ok(())
    }

    pub fn load(&self) -> anyhow::Result<Voxtral> {
        self.check_present()?;
        let dir = self.dir();
        let opts = self.load_options()?;
        let model = Voxtral::load(&dir, &opts)?;
        tracing::info!(secs = model.load_timings.total_s, "model ready");
        Ok(model)
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
                if let Some(mut c) = serve::daemon_client() {
                    let v = c.call(serde_json::json!({"op": "voices"}))?;
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
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run_serve(a),
        Command::Pull {
            model,
            repo,
            revision,
        } => {
            let dir = ModelArgs {
                model,
                device: "cpu".into(),
                dtype: ComputeDtype::F32,
                max_positions: DEFAULT_MAX_POSITIONS,
                quant: Default::default(),
                max_memory: None,
            }
            .dir();
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
            let socket = serve::load_config(None).and_then(|cfg| {
                crate::daemon::socket_path(cfg.socket.as_ref()).map_err(anyhow::Error::from)
            });
            sd_module::run(socket)
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

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("6GiB"), Ok(6 << 30));
        assert_eq!(parse_size("6G"), Ok(6 << 30));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("5 parsecs").is_err());
    }
}
