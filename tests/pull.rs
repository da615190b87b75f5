//! `voxtrald pull` against a local server on 127.0.0.1 that serves the tiny fixture the way the
//! Hugging Face hub does (tree API, `resolve` URLs, ranges), including a connection dropped
//! mid-file and a corrupted file.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use common::*;
use sha1::Sha1;
use sha2::{Digest, Sha256};

const REPO: &str = "mistralai/Voxtral-4B-TTS-2603";

/// Every request: (target, range header).
type RequestLog = Mutex<Vec<(String, Option<String>)>>;

#[derive(Default)]
struct Behaviour {
    /// Paths whose next N GETs send half the body and hang up.
    drops: HashMap<String, usize>,
    /// Paths served with one byte changed.
    corrupt: Vec<String>,
    /// Required bearer token.
    token: Option<String>,
}

struct Hub {
    addr: String,
    files: Arc<HashMap<String, Vec<u8>>>,
    behaviour: Arc<Mutex<Behaviour>>,
    log: Arc<RequestLog>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn fixture_files() -> HashMap<String, Vec<u8>> {
    let root = fixture_dir();
    let mut files = HashMap::new();
    for name in [
        "params.json",
        "tekken.json",
        "consolidated.safetensors",
        "README.md",
    ] {
        files.insert(name.to_string(), std::fs::read(root.join(name)).unwrap());
    }
    for e in std::fs::read_dir(root.join("voice_embedding")).unwrap() {
        let e = e.unwrap();
        files.insert(
            format!("voice_embedding/{}", e.file_name().to_string_lossy()),
            std::fs::read(e.path()).unwrap(),
        );
    }
    files
}

/// The tree listing: big and binary files are LFS (sha256), small text files plain git blobs.
fn tree_json(files: &HashMap<String, Vec<u8>>) -> String {
    let mut entries = vec![
        serde_json::json!({"type": "directory", "path": "voice_embedding", "oid": "0", "size": 0}),
    ];
    let mut names: Vec<_> = files.keys().collect();
    names.sort();
    for name in names {
        let data = &files[name];
        let mut blob = Sha1::new();
        blob.update(format!("blob {}\0", data.len()).as_bytes());
        blob.update(data);
        let mut e = serde_json::json!({
            "type": "file", "path": name, "size": data.len(), "oid": hex(&blob.finalize()),
        });
        if name.ends_with(".safetensors") || name.ends_with(".pt") {
            e["lfs"] = serde_json::json!({"oid": hex(&Sha256::digest(data)), "size": data.len(), "pointerSize": 134});
        }
        entries.push(e);
    }
    serde_json::to_string(&entries).unwrap()
}

fn respond(
    mut s: TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
    cut: Option<usize>,
) {
    let mut head = format!("HTTP/1.1 {status}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let _ = s.write_all(head.as_bytes());
    let n = cut.unwrap_or(body.len());
    let _ = s.write_all(&body[..n]);
    let _ = s.flush();
}

fn serve_one(
    s: TcpStream,
    files: &HashMap<String, Vec<u8>>,
    b: &Mutex<Behaviour>,
    log: &RequestLog,
) {
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).is_err() {
        return;
    }
    let target = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_lowercase(), v.trim().to_string());
        }
    }
    log.lock()
        .unwrap()
        .push((target.clone(), headers.get("range").cloned()));
    let mut b = b.lock().unwrap();
    if let Some(t) = &b.token {
        if headers.get("authorization") != Some(&format!("Bearer {t}")) {
            return respond(s, "401 Unauthorized", &[], b"unauthorized", None);
        }
    }
    if target == format!("/api/models/{REPO}/tree/main?recursive=true") {
        return respond(
            s,
            "200 OK",
            &[("Content-Type", "application/json".into())],
            tree_json(files).as_bytes(),
            None,
        );
    }
    let prefix = format!("/{REPO}/resolve/main/");
    let Some(path) = target.strip_prefix(&prefix) else {
        return respond(s, "404 Not Found", &[], b"no", None);
    };
    let Some(data) = files.get(path) else {
        return respond(s, "404 Not Found", &[], b"no", None);
    };
    let mut data = data.clone();
    if b.corrupt.iter().any(|c| c == path) {
        let i = data.len() / 2;
        data[i] ^= 0xff;
    }
    let drop_now = match b.drops.get_mut(path) {
        Some(n) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    };
    drop(b);
    let start = headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok());
    match start {
        Some(st) if st < data.len() => {
            let body = &data[st..];
            let cr = format!("bytes {st}-{}/{}", data.len() - 1, data.len());
            let cut = drop_now.then_some(body.len() / 2);
            respond(
                s,
                "206 Partial Content",
                &[("Content-Range", cr)],
                body,
                cut,
            )
        }
        _ => {
            let cut = drop_now.then_some(data.len() / 2);
            respond(s, "200 OK", &[], &data, cut)
        }
    }
}

impl Hub {
    fn start(behaviour: Behaviour) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let files = Arc::new(fixture_files());
        let behaviour = Arc::new(Mutex::new(behaviour));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (f, b, l) = (files.clone(), behaviour.clone(), log.clone());
        std::thread::spawn(move || {
            for s in listener.incoming().flatten() {
                let (f, b, l) = (f.clone(), b.clone(), l.clone());
                std::thread::spawn(move || serve_one(s, &f, &b, &l));
            }
        });
        Hub {
            addr,
            files,
            behaviour,
            log,
        }
    }

    fn pull(&self, dir: &Path, token: Option<&str>) -> Output {
        let mut c = Command::new(env!("CARGO_BIN_EXE_voxtrald"));
        c.args(["pull", "--model", dir.to_str().unwrap()])
            .env("HF_ENDPOINT", &self.addr)
            .env("RUST_BACKTRACE", "0");
        match token {
            Some(t) => c.env("HF_TOKEN", t),
            None => c.env_remove("HF_TOKEN"),
        };
        c.output().unwrap()
    }

    fn ranges_for(&self, path: &str) -> Vec<Option<String>> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(t, _)| t.ends_with(path))
            .map(|(_, r)| r.clone())
            .collect()
    }
}

fn assert_complete(hub: &Hub, dir: &Path) {
    for (name, data) in hub.files.iter().filter(|(n, _)| *n != "README.md") {
        assert_eq!(&std::fs::read(dir.join(name)).unwrap(), data, "{name}");
    }
    assert!(
        !dir.join("README.md").exists(),
        "only the files voxtrald needs"
    );
    assert!(!dir.join(".partial").exists());
}

#[test]
fn pull_resumes_after_a_dropped_connection() {
    let hub = Hub::start(Behaviour {
        drops: HashMap::from([("consolidated.safetensors".to_string(), 1)]),
        token: Some("sekrit".into()),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let out = hub.pull(&model, Some("sekrit"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_complete(&hub, &model);
    // The second request for the weights continued where the first stopped.
    let ranges = hub.ranges_for("consolidated.safetensors");
    assert_eq!(ranges.len(), 2, "{ranges:?}");
    assert_eq!(ranges[0], None);
    let half = hub.files["consolidated.safetensors"].len() / 2;
    assert_eq!(
        ranges[1].as_deref(),
        Some(format!("bytes={half}-").as_str())
    );
    // The model it fetched loads and speaks.
    let wav = dir.path().join("x.wav");
    let out = Command::new(env!("CARGO_BIN_EXE_voxtrald"))
        .args([
            "say",
            "--model",
            model.to_str().unwrap(),
            "--max-frames",
            "2",
            "--out",
        ])
        .arg(&wav)
        .arg("Downloaded.")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second pull has nothing to fetch.
    let before = hub.log.lock().unwrap().len();
    assert!(hub.pull(&model, Some("sekrit")).status.success());
    assert_eq!(
        hub.log.lock().unwrap().len(),
        before + 1,
        "only the listing"
    );
}

#[test]
fn a_missing_token_is_reported() {
    let hub = Hub::start(Behaviour {
        token: Some("sekrit".into()),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let out = hub.pull(&dir.path().join("m"), None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

#[test]
fn a_corrupted_file_is_rejected_and_the_model_does_not_look_complete() {
    let hub = Hub::start(Behaviour {
        corrupt: vec!["tekken.json".into()],
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let out = hub.pull(&model, None);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("tekken.json") && err.contains("checksum mismatch"),
        "{err}"
    );
    assert!(!model.join("tekken.json").exists());
    assert!(
        !model.join("params.json").exists(),
        "params.json marks a complete model"
    );
    let say = Command::new(env!("CARGO_BIN_EXE_voxtrald"))
        .args([
            "say",
            "--model",
            model.to_str().unwrap(),
            "--out",
            "/dev/null",
            "x",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&say.stderr).contains("no model at"));
    // Once the server is fixed, pulling again completes (the good files are kept).
    hub.behaviour.lock().unwrap().corrupt.clear();
    let fetched_weights = hub.ranges_for("consolidated.safetensors").len();
    let out = hub.pull(&model, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_complete(&hub, &model);
    assert_eq!(
        hub.ranges_for("consolidated.safetensors").len(),
        fetched_weights
    );
}

#[test]
fn an_interrupted_pull_resumes_in_the_next_run() {
    // The weights drop on every attempt of the first run.
    let hub = Hub::start(Behaviour {
        drops: HashMap::from([("consolidated.safetensors".to_string(), 100)]),
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    let out = hub.pull(&model, None);
    assert!(!out.status.success());
    assert!(!model.join("params.json").exists());
    let partial = model.join(".partial/consolidated.safetensors.part");
    let have = std::fs::metadata(&partial).unwrap().len();
    assert!(have > 0);
    hub.behaviour.lock().unwrap().drops.clear();
    let out = hub.pull(&model, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_complete(&hub, &model);
    let last = hub.ranges_for("consolidated.safetensors").pop().unwrap();
    assert_eq!(last, Some(format!("bytes={have}-")));
}
