//! Settings, resolved once: `$XDG_CONFIG_HOME/voxtrald/config.toml` (every key optional; an
//! unknown key or a bad value is an error that names it) and the command line's overrides,
//! into typed values. Also the XDG paths the daemon and its clients agree on.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::audio::prosody::{MAX_PITCH, MAX_RATE, MIN_PITCH, MIN_RATE};
use crate::engine::EngineConfig;
use crate::error::{Error, Result};
use crate::model::device::{DeviceChoice, DtypeChoice};
use crate::model::nn::Quant;
use crate::model::{LoadOptions, Voxtral, DEFAULT_MAX_POSITIONS};
use crate::text::lexicon::Lexicon;

/// The voice of requests that name none, unless the config says otherwise.
pub const DEFAULT_VOICE: &str = "casual_male";

/// A size in bytes, written `6GiB`, `6G`, `512MiB`, `100k` or plain bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct ByteSize(pub u64);

impl TryFrom<String> for ByteSize {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        parse_size(&s).map(ByteSize)
    }
}

/// `6GiB`, `6G`, `512MiB`, `512M`, `100k` or plain bytes (binary units throughout).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
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

/// A listening address that stays on this machine (loopback), checked when read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct LoopbackAddr(pub SocketAddr);

impl TryFrom<String> for LoopbackAddr {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        let addr: SocketAddr = s
            .parse()
            .map_err(|_| format!("{s:?} is not an address such as \"127.0.0.1:8880\""))?;
        if !addr.ip().is_loopback() {
            return Err(format!(
                "{s} is not a loopback address; only 127.0.0.1 or [::1] are served"
            ));
        }
        Ok(LoopbackAddr(addr))
    }
}

/// Where the Wyoming server listens: `"127.0.0.1:10200"` (any address written out, with a
/// warning when it is not loopback) or `"unix:///path/to/socket"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl TryFrom<String> for ListenAddr {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        if let Some(path) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if !path.starts_with('/') {
                return Err(format!("{s:?}: a Unix socket path must be absolute"));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        s.parse().map(ListenAddr::Tcp).map_err(|_| {
            format!("{s:?} is not an address such as \"127.0.0.1:10200\" or \"unix:///path\"")
        })
    }
}

/// The config file as written.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Checkpoint directory (default: the user cache, see `voxtrald say --help`).
    pub model: Option<PathBuf>,
    pub device: Option<DeviceChoice>,
    pub dtype: Option<DtypeChoice>,
    pub quant: Option<Quant>,
    /// Refuse to load a model needing more than this, e.g. `"6GiB"`.
    pub max_memory: Option<ByteSize>,
    /// Voice used when a request names none.
    pub voice: Option<String>,
    /// Default speaking rate, 0.25 to 4.0 (1.0 = as generated); pitch is kept.
    pub rate: Option<f32>,
    /// Default pitch, a frequency ratio from 0.5 to 2.0; duration is kept.
    pub pitch: Option<f32>,
    /// Playback volume of the daemon's own audio output, 0.0 to 1.0.
    pub volume: Option<f32>,
    /// Unix socket path (default `$XDG_RUNTIME_DIR/voxtrald/voxtrald.sock`).
    pub socket: Option<PathBuf>,
    /// The user voice library (default `$XDG_DATA_HOME/voxtrald/voices`).
    pub voices: Option<PathBuf>,
    /// Serve D-Bus on the session bus (default true).
    pub dbus: Option<bool>,
    /// Serve the OpenAI-style speech API on this loopback address, e.g. `"127.0.0.1:8880"`
    /// (default: not at all).
    pub http: Option<LoopbackAddr>,
    /// Serve the Wyoming protocol (Home Assistant) here (default: not at all).
    pub wyoming: Option<ListenAddr>,
    #[serde(default)]
    pub limits: Limits,
    /// Pronunciations: written form = spoken form, whole words, any case.
    #[serde(default)]
    pub lexicon: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request line on the socket, in bytes (also the largest HTTP body).
    pub max_request_bytes: usize,
    /// Largest text of one request, in bytes.
    pub max_text_bytes: usize,
    /// Messages queued to one socket client; beyond them its jobs wait for it.
    pub client_buffer: usize,
    /// Simultaneous socket clients.
    pub max_clients: usize,
    /// Frames per sentence.
    pub max_frames: usize,
    /// Utterances for clients (Spiel, socket streams, HTTP) decoded together in one step; the
    /// daemon's own output has one more.
    pub max_streams: usize,
    /// Seconds a client may take no audio at all before its job is cancelled. Reading slowly
    /// (at playback pace) never counts: it only slows that client's own job.
    pub stall_timeout: f64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_request_bytes: 1 << 20,
            max_text_bytes: 1 << 20,
            client_buffer: 256,
            max_clients: 64,
            max_frames: crate::model::DEFAULT_MAX_FRAMES,
            max_streams: crate::engine::DEFAULT_MAX_STREAMS,
            stall_timeout: crate::engine::DEFAULT_STALL_TIMEOUT.as_secs_f64(),
        }
    }
}

fn xdg_dir(var: &str, fallback: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(fallback)))
}

/// `$XDG_CONFIG_HOME/voxtrald/config.toml`.
pub fn default_config_path() -> Option<PathBuf> {
    xdg_dir("XDG_CONFIG_HOME", ".config").map(|d| d.join("voxtrald").join("config.toml"))
}

/// `$XDG_DATA_HOME` (`~/.local/share`).
pub fn data_home() -> Option<PathBuf> {
    xdg_dir("XDG_DATA_HOME", ".local/share")
}

/// `$XDG_CONFIG_HOME` (`~/.config`).
pub fn config_home() -> Option<PathBuf> {
    xdg_dir("XDG_CONFIG_HOME", ".config")
}

/// Default checkpoint location: `$XDG_CACHE_HOME/voxtrald/models/<repo>` (`~/.cache/...`).
pub fn default_model_dir() -> PathBuf {
    xdg_dir("XDG_CACHE_HOME", ".cache")
        .unwrap_or_else(|| PathBuf::from(".cache"))
        .join("voxtrald")
        .join("models")
        .join(crate::download::MODEL_REPO)
}

/// The socket path: as configured, else `$XDG_RUNTIME_DIR/voxtrald/voxtrald.sock`.
pub fn socket_path(configured: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = configured {
        return Ok(p.to_path_buf());
    }
    let dir = std::env::var_os("XDG_RUNTIME_DIR")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            Error::InvalidInput(
                "XDG_RUNTIME_DIR is not set; set it or give a socket path in the config".into(),
            )
        })?;
    Ok(PathBuf::from(dir).join("voxtrald").join("voxtrald.sock"))
}

impl Config {
    /// Reads `path`; a missing file is the default configuration.
    pub fn load(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(Error::io(path, e)),
        };
        let cfg: Config = toml::from_str(&text).map_err(|e| {
            // Quote the offending line so the key is named even for type errors.
            let at = e.span().map(|s| {
                let line = text[..s.start.min(text.len())].matches('\n').count();
                let src = text.lines().nth(line).unwrap_or("").trim();
                format!(" at line {}: `{src}`", line + 1)
            });
            Error::Config {
                path: path.into(),
                reason: e.message().to_string() + &at.unwrap_or_default(),
            }
        })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// The config at `path`, else at the default path; an explicit path must exist.
    pub fn find(path: Option<&Path>) -> Result<Self> {
        match path.map(Path::to_path_buf).or_else(default_config_path) {
            Some(p) => {
                if path.is_some() && !p.exists() {
                    return Err(Error::InvalidInput(format!(
                        "{}: no such config file",
                        p.display()
                    )));
                }
                Self::load(&p)
            }
            None => Ok(Self::default()),
        }
    }

    /// The `[lexicon]` table, ready for the engine.
    pub fn lexicon(&self) -> Result<Option<Lexicon>> {
        Lexicon::new(self.lexicon.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |key: &str, why: &str| Error::Config {
            path: path.into(),
            reason: format!("`{key}`: {why}"),
        };
        if let Some(v) = self.volume {
            if !(0.0..=1.0).contains(&v) {
                return Err(bad("volume", "must be between 0.0 and 1.0"));
            }
        }
        if let Some(r) = self.rate {
            if !(MIN_RATE..=MAX_RATE).contains(&r) {
                return Err(bad(
                    "rate",
                    &format!("must be between {MIN_RATE} and {MAX_RATE}"),
                ));
            }
        }
        if let Some(p) = self.pitch {
            if !(MIN_PITCH..=MAX_PITCH).contains(&p) {
                return Err(bad(
                    "pitch",
                    &format!("must be between {MIN_PITCH} and {MAX_PITCH}"),
                ));
            }
        }
        if let Err(e) = self.lexicon() {
            return Err(bad("lexicon", &e.to_string()));
        }
        let l = &self.limits;
        if l.max_request_bytes < 1024 {
            return Err(bad("limits.max_request_bytes", "must be at least 1024"));
        }
        if !(l.stall_timeout.is_finite() && l.stall_timeout > 0.0) {
            return Err(bad(
                "limits.stall_timeout",
                "must be a positive number of seconds",
            ));
        }
        let counts = [
            l.client_buffer,
            l.max_clients,
            l.max_frames,
            l.max_text_bytes,
            l.max_streams,
        ];
        if counts.contains(&0) {
            return Err(bad(
                "limits",
                "client_buffer, max_clients, max_frames, max_text_bytes and max_streams must be \
                 positive",
            ));
        }
        Ok(())
    }
}

/// Which checkpoint to load, where and how.
#[derive(Debug, Clone)]
pub struct ModelSettings {
    pub dir: PathBuf,
    /// The directory was named (flag, config or `$VOXTRALD_MODEL`): it is never downloaded to.
    pub explicit: bool,
    pub device: DeviceChoice,
    pub dtype: DtypeChoice,
    pub quant: Quant,
    pub max_positions: usize,
    pub max_memory: Option<u64>,
}

impl ModelSettings {
    /// `dir` if given, else `$VOXTRALD_MODEL`, else the default cache location.
    pub fn new(dir: Option<PathBuf>) -> Self {
        let named = dir.or_else(|| std::env::var_os("VOXTRALD_MODEL").map(PathBuf::from));
        Self {
            explicit: named.is_some(),
            dir: named.unwrap_or_else(default_model_dir),
            device: DeviceChoice::Auto,
            dtype: DtypeChoice::Auto,
            quant: Quant::None,
            max_positions: DEFAULT_MAX_POSITIONS,
            max_memory: None,
        }
    }

    pub fn load_options(&self) -> Result<LoadOptions> {
        let device = self.device.open()?;
        Ok(LoadOptions {
            dtype: self.dtype.resolve(&device),
            device,
            max_positions: self.max_positions,
            quant: self.quant,
            max_memory: self.max_memory,
        })
    }

    /// Loads the model, downloading the official weights first when the default location is
    /// still empty.
    pub fn load(&self) -> Result<Voxtral> {
        crate::download::ensure_model(&self.dir, self.explicit)?;
        let model = Voxtral::load(&self.dir, &self.load_options()?)?;
        tracing::info!(secs = model.load_timings.total_s, "model ready");
        Ok(model)
    }
}

/// What the command line of `serve` may override.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub model: Option<PathBuf>,
    pub device: Option<DeviceChoice>,
    pub dtype: Option<DtypeChoice>,
    pub quant: Option<Quant>,
    pub socket: Option<PathBuf>,
    pub no_dbus: bool,
}

/// Everything the daemon runs by.
#[derive(Debug, Clone)]
pub struct Settings {
    pub model: ModelSettings,
    /// Defaults of requests that do not say.
    pub voice: String,
    pub rate: f32,
    pub pitch: f32,
    /// Gain of the daemon's own playback.
    pub volume: f32,
    socket: Option<PathBuf>,
    voices: Option<PathBuf>,
    pub dbus: bool,
    pub http: Option<SocketAddr>,
    pub wyoming: Option<ListenAddr>,
    pub limits: Limits,
    pub lexicon: Option<Arc<Lexicon>>,
}

impl Settings {
    /// The config file with the command line's overrides on top.
    pub fn resolve(o: Overrides) -> Result<Self> {
        let cfg = Config::find(o.config.as_deref())?;
        let mut model = ModelSettings::new(o.model.or(cfg.model.clone()));
        model.device = o.device.or(cfg.device).unwrap_or_default();
        model.dtype = o.dtype.or(cfg.dtype).unwrap_or_default();
        model.quant = o.quant.or(cfg.quant).unwrap_or_default();
        model.max_memory = cfg.max_memory.map(|s| s.0);
        Ok(Self {
            model,
            voice: cfg.voice.clone().unwrap_or_else(|| DEFAULT_VOICE.into()),
            rate: cfg.rate.unwrap_or(1.0),
            pitch: cfg.pitch.unwrap_or(1.0),
            volume: cfg.volume.unwrap_or(1.0),
            socket: o.socket.or(cfg.socket.clone()),
            voices: cfg.voices.clone(),
            dbus: !o.no_dbus && cfg.dbus.unwrap_or(true),
            http: cfg.http.map(|a| a.0),
            wyoming: cfg.wyoming.clone(),
            lexicon: cfg.lexicon()?.map(Arc::new),
            limits: cfg.limits,
        })
    }

    /// The default config with no overrides, for clients of a running daemon.
    pub fn of_this_user() -> Result<Self> {
        Self::resolve(Overrides::default())
    }

    pub fn socket_path(&self) -> Result<PathBuf> {
        socket_path(self.socket.as_deref())
    }

    /// The user voice library's folder.
    pub fn voices_dir(&self) -> Option<PathBuf> {
        self.voices
            .clone()
            .or_else(crate::library::Library::default_dir)
    }

    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.limits.stall_timeout)
    }

    pub fn engine_config(&self) -> EngineConfig {
        EngineConfig {
            max_text_bytes: self.limits.max_text_bytes,
            max_streams: self.limits.max_streams,
            stall_timeout: self.stall_timeout(),
            lexicon: self.lexicon.clone(),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        std::fs::write(&p, s).unwrap();
        Config::load(&p)
    }

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

    #[test]
    fn every_key_is_optional() {
        let c = parse("").unwrap();
        assert!(c.model.is_none());
        assert_eq!(c.limits.max_request_bytes, 1 << 20);
        let c =
            parse("voice = \"fr_female\"\nvolume = 0.5\n[limits]\nclient_buffer = 8\n").unwrap();
        assert_eq!(c.voice.as_deref(), Some("fr_female"));
        assert_eq!(c.limits.client_buffer, 8);
        assert_eq!(c.limits.max_clients, 64);
        assert!(Config::load(Path::new("/nonexistent/config.toml")).is_ok());
    }

    #[test]
    fn typed_values_parse_once() {
        let c = parse(
            "device = \"cuda:1\"\ndtype = \"bf16\"\nquant = \"q8\"\nmax_memory = \"6GiB\"\n\
             http = \"127.0.0.1:8880\"\nrate = 0.25\npitch = 1.5\n",
        )
        .unwrap();
        assert_eq!(c.device, Some(DeviceChoice::Cuda(1)));
        assert_eq!(c.dtype, Some(DtypeChoice::Bf16));
        assert_eq!(c.quant, Some(Quant::Q8));
        assert_eq!(c.max_memory, Some(ByteSize(6 << 30)));
        assert_eq!(c.http.unwrap().0.port(), 8880);
        assert!(parse("quant = \"plain\"").is_err());
        let c = parse("wyoming = \"unix:///run/x.sock\"").unwrap();
        assert_eq!(c.wyoming, Some(ListenAddr::Unix("/run/x.sock".into())));
        let c = parse("wyoming = \"0.0.0.0:10200\"").unwrap();
        assert!(matches!(c.wyoming, Some(ListenAddr::Tcp(a)) if a.port() == 10200));
        assert!(parse("wyoming = \"unix:relative\"").is_err());
        assert!(parse("wyoming = \"somewhere\"").is_err());
    }

    #[test]
    fn bad_keys_and_values_are_named() {
        let e = parse("volum = 0.5").unwrap_err().to_string();
        assert!(e.contains("volum"), "{e}");
        let e = parse("volume = 3.0").unwrap_err().to_string();
        assert!(e.contains("`volume`"), "{e}");
        let e = parse("volume = \"loud\"").unwrap_err().to_string();
        assert!(e.contains("volume") || e.contains("float"), "{e}");
        let e = parse("dtype = \"f16\"").unwrap_err().to_string();
        assert!(e.contains("dtype"), "{e}");
        let e = parse("[limits]\nmax_request_bytes = 10")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_request_bytes"), "{e}");
        let e = parse("rate = 7.0").unwrap_err().to_string();
        assert!(e.contains("`rate`"), "{e}");
        let e = parse("pitch = 3.0").unwrap_err().to_string();
        assert!(e.contains("`pitch`"), "{e}");
        let e = parse("device = \"tpu\"").unwrap_err().to_string();
        assert!(e.contains("device"), "{e}");
        let e = parse("max_memory = \"lots\"").unwrap_err().to_string();
        assert!(e.contains("max_memory"), "{e}");
        assert!(parse("max_memory = \"6GiB\"\ndtype = \"auto\"").is_ok());
        let e = parse("http = \"0.0.0.0:8880\"").unwrap_err().to_string();
        assert!(e.contains("http") && e.contains("loopback"), "{e}");
        assert!(parse("http = \"[::1]:8880\"").is_ok());
        let e = parse("[limits]\nstall_timeout = 0")
            .unwrap_err()
            .to_string();
        assert!(e.contains("stall_timeout"), "{e}");
        let e = parse("[lexicon]\n\" \" = \"x\"").unwrap_err().to_string();
        assert!(e.contains("`lexicon`"), "{e}");
        let cfg = parse("[lexicon]\nnginx = \"engine x\"\n\"C++\" = \"C plus plus\"").unwrap();
        let lex = cfg.lexicon().unwrap().unwrap();
        assert_eq!(lex.apply("nginx in C++"), "engine x in C plus plus");
    }
}
