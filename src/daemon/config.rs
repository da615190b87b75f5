//! `$XDG_CONFIG_HOME/voxtrald/config.toml`: every key optional; an unknown key or a bad value
//! is an error that names it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Checkpoint directory (default: the user cache, see `voxtrald say --help`).
    pub model: Option<PathBuf>,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: Option<String>,
    /// `auto` (bf16 on a GPU, f32 on the CPU), `f32` or `bf16`.
    pub dtype: Option<String>,
    /// `none` or `q8` (int8 weights for the backbone and flow head).
    pub quant: Option<String>,
    /// Refuse to load a model needing more than this, e.g. `"6GiB"`.
    pub max_memory: Option<String>,
    /// Voice used when a request names none.
    pub voice: Option<String>,
    /// Default speaking rate, 0.5 to 4.0 (1.0 = as generated); pitch is kept.
    pub rate: Option<f32>,
    /// Playback volume of the daemon's own audio output, 0.0 to 1.0.
    pub volume: Option<f32>,
    /// Unix socket path (default `$XDG_RUNTIME_DIR/voxtrald/voxtrald.sock`).
    pub socket: Option<PathBuf>,
    /// Serve D-Bus on the session bus (default true).
    pub dbus: Option<bool>,
    /// Serve the OpenAI-style speech API on this loopback address, e.g. `"127.0.0.1:8880"`
    /// (default: not at all).
    pub http: Option<String>,
    #[serde(default)]
    pub limits: Limits,
    /// Pronunciations: written form = spoken form, whole words, any case.
    #[serde(default)]
    pub lexicon: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest request line on the socket, in bytes.
    pub max_request_bytes: usize,
    /// Largest text of one request, in bytes.
    pub max_text_bytes: usize,
    /// Messages queued to one client before it is dropped as too slow.
    pub client_buffer: usize,
    /// Simultaneous socket clients.
    pub max_clients: usize,
    /// Frames per sentence.
    pub max_frames: usize,
    /// Utterances for clients (Spiel, socket streams) decoded together in one step; the
    /// daemon's own output has one more.
    pub max_streams: usize,
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
        }
    }
}

pub fn default_config_path() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|d| d.join("voxtrald").join("config.toml"))
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

    /// The `[lexicon]` table, ready for the engine.
    pub fn lexicon(&self) -> Result<Option<crate::engine::lexicon::Lexicon>> {
        crate::engine::lexicon::Lexicon::new(
            self.lexicon.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        )
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
            if !(crate::audio::stretch::MIN_RATE..=crate::audio::stretch::MAX_RATE).contains(&r) {
                return Err(bad("rate", "must be between 0.5 and 4.0"));
            }
        }
        if let Some(d) = &self.dtype {
            if d != "auto" && d != "f32" && d != "bf16" {
                return Err(bad("dtype", "must be \"auto\", \"f32\" or \"bf16\""));
            }
        }
        if let Some(m) = &self.max_memory {
            if let Err(e) = crate::cli::parse_size(m) {
                return Err(bad("max_memory", &e));
            }
        }
        if let Some(q) = &self.quant {
            if q != "none" && q != "q8" {
                return Err(bad("quant", "must be \"none\" or \"q8\""));
            }
        }
        if let Some(d) = &self.device {
            if crate::cli::parse_device_name(d).is_err() {
                return Err(bad("device", "must be auto, cpu, cuda or cuda:N"));
            }
        }
        if let Some(h) = &self.http {
            if let Err(e) = crate::daemon::http::parse_addr(h) {
                return Err(bad("http", &e));
            }
        }
        if let Err(e) = self.lexicon() {
            return Err(bad("lexicon", &e.to_string()));
        }
        let l = &self.limits;
        if l.max_request_bytes < 1024 {
            return Err(bad("limits.max_request_bytes", "must be at least 1024"));
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
    fn bad_keys_and_values_are_named() {
        let e = parse("volum = 0.5").unwrap_err().to_string();
        assert!(e.contains("volum"), "{e}");
        let e = parse("volume = 3.0").unwrap_err().to_string();
        assert!(e.contains("`volume`"), "{e}");
        let e = parse("volume = \"loud\"").unwrap_err().to_string();
        assert!(e.contains("volume") || e.contains("float"), "{e}");
        let e = parse("dtype = \"f16\"").unwrap_err().to_string();
        assert!(e.contains("`dtype`"), "{e}");
        let e = parse("[limits]\nmax_request_bytes = 10")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_request_bytes"), "{e}");
        let e = parse("rate = 7.0").unwrap_err().to_string();
        assert!(e.contains("`rate`"), "{e}");
        let e = parse("device = \"tpu\"").unwrap_err().to_string();
        assert!(e.contains("`device`"), "{e}");
        let e = parse("max_memory = \"lots\"").unwrap_err().to_string();
        assert!(e.contains("`max_memory`"), "{e}");
        assert!(parse("max_memory = \"6GiB\"\ndtype = \"auto\"").is_ok());
        let e = parse("http = \"0.0.0.0:8880\"").unwrap_err().to_string();
        assert!(e.contains("`http`") && e.contains("loopback"), "{e}");
        assert!(parse("http = \"[::1]:8880\"").is_ok());
        let e = parse("[lexicon]\n\" \" = \"x\"").unwrap_err().to_string();
        assert!(e.contains("`lexicon`"), "{e}");
        let cfg = parse("[lexicon]\nnginx = \"engine x\"\n\"C++\" = \"C plus plus\"").unwrap();
        let lex = cfg.lexicon().unwrap().unwrap();
        assert_eq!(lex.apply("nginx in C++"), "engine x in C plus plus");
    }
}
