//! Fetching the official checkpoint from the Hugging Face hub: resumable (HTTP ranges, retries),
//! verified (sizes, and the sha256 of LFS files or the git blob hash of small ones), and
//! never half-visible: files are completed under `.partial/`, verified, then renamed into place,
//! with `params.json` (which marks a model directory as present) last.
//!
//! We use `ureq` rather than `hf-hub`: we need resume from partial files across runs, our own
//! verification of every file, a progress bar over the whole model, and tests against a local
//! server; `HF_ENDPOINT` and `HF_TOKEN` are honoured the same way.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The official model repository on the Hugging Face hub.
pub const MODEL_REPO: &str = "mistralai/Voxtral-4B-TTS-2603";
const ATTEMPTS: usize = 5;

#[derive(Debug, Clone, Deserialize)]
pub struct TreeEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub path: String,
    #[serde(default)]
    pub size: u64,
    /// Git blob hash.
    #[serde(default)]
    pub oid: String,
    #[serde(default)]
    pub lfs: Option<Lfs>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Lfs {
    /// sha256 of the content.
    pub oid: String,
    pub size: u64,
}

impl TreeEntry {
    fn expected_size(&self) -> u64 {
        self.lfs.as_ref().map_or(self.size, |l| l.size)
    }
}

/// The files voxtrald needs from the repository.
pub fn wanted(path: &str) -> bool {
    matches!(
        path,
        "params.json" | "tekken.json" | "consolidated.safetensors"
    ) || (path.starts_with("voice_embedding/") && path.ends_with(".pt"))
}

pub struct Hub {
    endpoint: String,
    token: Option<String>,
    agent: ureq::Agent,
    pub quiet: bool,
}

fn net_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Download(format!("{what}: {e}"))
}

impl Hub {
    /// `HF_ENDPOINT` (default huggingface.co) and `HF_TOKEN` from the environment.
    pub fn from_env() -> Self {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.into());
        let token = std::env::var("HF_TOKEN").ok().filter(|s| !s.is_empty());
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(20))
            .timeout_read(Duration::from_secs(60))
            .build();
        Self {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            token,
            agent,
            quiet: false,
        }
    }

    fn get(&self, url: &str) -> ureq::Request {
        let r = self.agent.get(url).set("User-Agent", "voxtrald");
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    /// Every file of the repository at `revision`.
    pub fn list(&self, repo: &str, revision: &str) -> Result<Vec<TreeEntry>> {
        let url = format!(
            "{}/api/models/{repo}/tree/{revision}?recursive=true",
            self.endpoint
        );
        let resp = self.get(&url).call().map_err(|e| net_err(&url, e))?;
        let body = resp
            .into_string()
            .map_err(|e| net_err(&format!("{url}: unreadable reply"), e))?;
        let entries: Vec<TreeEntry> = serde_json::from_str(&body)
            .map_err(|e| net_err(&format!("{url}: unexpected reply"), e))?;
        Ok(entries.into_iter().filter(|e| e.kind == "file").collect())
    }

    /// Downloads `entry` into `dir`, resuming a partial file, and verifies it.
    fn fetch(
        &self,
        repo: &str,
        revision: &str,
        entry: &TreeEntry,
        dir: &Path,
        bar: &ProgressBar,
    ) -> Result<()> {
        let dest = dir.join(&entry.path);
        let size = entry.expected_size();
        if dest.metadata().is_ok_and(|m| m.len() == size) {
            bar.inc(size);
            return Ok(());
        }
        let part = dir.join(".partial").join(format!("{}.part", entry.path));
        if let Some(p) = part.parent() {
            std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
        let url = format!("{}/{repo}/resolve/{revision}/{}", self.endpoint, entry.path);
        let mut last_err = None;
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(200 * attempt as u64));
            }
            match self.fetch_once(&url, &part, size, bar) {
                Ok(()) => {
                    last_err = None;
                    break;
                }
                Err(e) => {
                    tracing::warn!(file = %entry.path, attempt, error = %e, "download interrupted; resuming");
                    last_err = Some(e);
                }
            }
        }
        if let Some(e) = last_err {
            return Err(e);
        }
        verify(&part, entry)?;
        if let Some(p) = dest.parent() {
            std::fs::create_dir_all(p).map_err(|e| Error::io(p, e))?;
        }
        crate::atomic::publish(&part)?;
        std::fs::rename(&part, &dest).map_err(|e| Error::io(&dest, e))?;
        Ok(())
    }

    fn fetch_once(&self, url: &str, part: &Path, size: u64, bar: &ProgressBar) -> Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(part)
            .map_err(|e| Error::io(part, e))?;
        let mut have = f.metadata().map_err(|e| Error::io(part, e))?.len();
        if have > size {
            f.set_len(0).map_err(|e| Error::io(part, e))?;
            have = 0;
        }
        if have == size {
            return Ok(());
        }
        let req = if have > 0 {
            self.get(url).set("Range", &format!("bytes={have}-"))
        } else {
            self.get(url)
        };
        let resp = req.call().map_err(|e| net_err(url, e))?;
        if resp.status() == 200 && have > 0 {
            // The server ignored the range: start over.
            f.set_len(0).map_err(|e| Error::io(part, e))?;
            f.seek(SeekFrom::Start(0)).map_err(|e| Error::io(part, e))?;
            bar.set_position(bar.position().saturating_sub(have));
            have = 0;
        }
        bar.inc(have.min(size));
        let mut body = resp.into_reader().take(size - have);
        let mut buf = vec![0u8; 1 << 20];
        let mut got = have;
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    f.flush().map_err(|e| Error::io(part, e))?;
                    bar.set_position(bar.position().saturating_sub(got));
                    return Err(net_err(url, e));
                }
            };
            f.write_all(&buf[..n]).map_err(|e| Error::io(part, e))?;
            got += n as u64;
            bar.inc(n as u64);
        }
        f.sync_all().map_err(|e| Error::io(part, e))?;
        if got != size {
            bar.set_position(bar.position().saturating_sub(got));
            return Err(Error::Download(format!(
                "{url}: the connection ended after {got} of {size} bytes"
            )));
        }
        Ok(())
    }
}

/// Size and content hash: sha256 for LFS files, the git blob sha1 otherwise.
fn verify(part: &Path, entry: &TreeEntry) -> Result<()> {
    let size = entry.expected_size();
    let bad = |why: String| {
        let _ = std::fs::remove_file(part);
        Error::Download(format!(
            "{}: {why}; the download was discarded, run `voxtrald pull` again",
            entry.path
        ))
    };
    let len = part.metadata().map_err(|e| Error::io(part, e))?.len();
    if len != size {
        return Err(bad(format!("size {len}, expected {size}")));
    }
    let (got, want) = match &entry.lfs {
        Some(lfs) => (hash_file::<Sha256>(part, b"")?, lfs.oid.to_lowercase()),
        // A git blob hash covers a `blob <size>\0` header, then the content.
        None => (
            hash_file::<Sha1>(part, format!("blob {size}\0").as_bytes())?,
            entry.oid.to_lowercase(),
        ),
    };
    if got != want {
        return Err(bad(format!(
            "checksum mismatch (expected {want}, got {got})"
        )));
    }
    Ok(())
}

/// Hex digest of `prefix` followed by the file's content.
fn hash_file<D: Digest>(path: &Path, prefix: &[u8]) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = D::new();
    h.update(prefix);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Downloads what is missing of `repo` into `dir`; `params.json` comes last, so its presence
/// means the rest is complete.
pub fn pull(hub: &Hub, repo: &str, revision: &str, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut files: Vec<TreeEntry> = hub
        .list(repo, revision)?
        .into_iter()
        .filter(|e| wanted(&e.path))
        .collect();
    for need in ["params.json", "tekken.json", "consolidated.safetensors"] {
        if !files.iter().any(|f| f.path == need) {
            return Err(Error::Download(format!("{repo}@{revision} has no {need}")));
        }
    }
    files.sort_by_key(|f| (f.path == "params.json", f.path.clone()));
    let total: u64 = files.iter().map(TreeEntry::expected_size).sum();
    let bar = if hub.quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(total);
        b.set_style(
            ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    };
    for f in &files {
        bar.set_message(f.path.clone());
        hub.fetch(repo, revision, f, dir, &bar)?;
    }
    bar.finish_with_message(format!("{repo} ready"));
    let _ = std::fs::remove_dir_all(dir.join(".partial"));
    Ok(dir.to_path_buf())
}

/// A clear error when no checkpoint is at `dir`. A directory nobody named (the default cache
/// location) is filled from the hub on first use.
pub fn ensure_model(dir: &Path, explicit: bool) -> Result<()> {
    let params = dir.join(crate::model::checkpoint::PARAMS_FILE);
    if !params.exists() && !explicit {
        eprintln!(
            "voxtrald: downloading {MODEL_REPO} (8 GB) to {} on first use",
            dir.display()
        );
        pull(&Hub::from_env(), MODEL_REPO, "main", dir)?;
    }
    if !params.exists() {
        return Err(Error::NoModel {
            dir: dir.into(),
            repo: MODEL_REPO,
        });
    }
    Ok(())
}
