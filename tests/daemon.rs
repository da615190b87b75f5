//! `voxtrald serve` over its Unix socket: permissions, the protocol, bad input, slow and
//! vanishing clients, cancellation, shutdown, and the CLI talking to the daemon.

mod common;

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::served::Served;
use common::*;
use serde_json::json;

const CONFIG: &str = "[limits]\nmax_frames = 6\n";

fn many(n: usize) -> String {
    (0..n).map(|i| format!("This is sentence {i}. ")).collect()
}

#[test]
fn socket_is_private() {
    let d = Served::start(CONFIG, &[]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&d.socket()), 0o600);
    assert_eq!(mode(d.socket().parent().unwrap()), 0o700);
}

#[test]
fn status_voices_and_bad_requests_keep_the_connection() {
    let d = Served::start(CONFIG, &[]);
    let mut c = d.connect();
    let s = c.call(json!({"op": "status"}));
    assert_eq!(s["event"], "status");
    assert_eq!(s["device"], "cpu");
    assert_eq!(s["voice"], "casual_male");
    let v = c.call(json!({"op": "voices"}));
    assert_eq!(v["voices"].as_array().unwrap().len(), 20);

    let bad: Vec<Vec<u8>> = vec![
        b"{not json\n".to_vec(),
        b"\xff\xfe garbage\n".to_vec(),
        b"{\"op\": \"fly\"}\n".to_vec(),
        b"{\"op\": \"speak\"}\n".to_vec(),
        b"{\"op\": \"speak\", \"text\": \"hi\", \"priority\": \"urgent\"}\n".to_vec(),
        b"{\"op\": \"speak\", \"text\": \"hi\", \"voice\": \"nobody\"}\n".to_vec(),
        b"{\"op\": \"speak\", \"text\": \"   \"}\n".to_vec(),
        b"{\"op\": \"speak\", \"text\": \"hi\", \"rate\": 0.1}\n".to_vec(),
        b"{\"op\": \"speak\", \"text\": \"hi\", \"pitch\": 3.0}\n".to_vec(),
        b"{\"op\": \"speak\", \"text\": \"hi\", \"cfg_alpha\": 11}\n".to_vec(),
        b"{\"op\": \"speak\", \"text\": \"hi\", \"max_frames\": 0}\n".to_vec(),
        b"{\"op\": \"speak\", \"text\": \"hi\", \"max_frames\": -3}\n".to_vec(),
        [
            b"{\"op\":\"speak\",\"text\":\"".to_vec(),
            vec![b'a'; 1 << 20],
            b"\"}\n".to_vec(),
        ]
        .concat(),
    ];
    for b in bad {
        c.send_raw(&b);
        let r = c.recv().unwrap();
        assert_eq!(r["event"], "error", "{r}");
        // Still usable.
        assert_eq!(c.call(json!({"op": "status"}))["event"], "status");
    }
    assert!(c.call(json!({"op": "voices"}))["voices"].is_array());
}

#[test]
fn stream_output_carries_events_and_all_audio() {
    let d = Served::start(CONFIG, &[]);
    let mut c = d.connect();
    c.send(json!({"op": "speak", "text": "One here. Two there.", "output": "stream", "tag": 42}));
    let acc = c.recv().unwrap();
    assert_eq!(acc["event"], "accepted");
    assert_eq!(acc["tag"], 42);
    let msgs = c.until_done();
    let kinds: Vec<&str> = msgs.iter().map(|m| m["event"].as_str().unwrap()).collect();
    assert_eq!(kinds[0], "started");
    assert_eq!(kinds[1], "sentence");
    assert_eq!(*kinds.last().unwrap(), "finished");
    let mut offset = 0u64;
    let mut sentences = 0;
    for m in &msgs {
        match m["event"].as_str().unwrap() {
            "sentence" => sentences += 1,
            "audio" => {
                assert!(sentences > 0, "audio before its sentence");
                assert_eq!(m["offset"].as_u64().unwrap(), offset);
                let pcm = base64_decode(m["pcm"].as_str().unwrap());
                assert_eq!(pcm.len() as u64, 2 * m["samples"].as_u64().unwrap());
                offset += m["samples"].as_u64().unwrap();
            }
            _ => {}
        }
    }
    assert_eq!(sentences, 2);
    assert_eq!(offset, 2 * 6 * 1920);
    assert_eq!(msgs.last().unwrap()["frames"], 12);
}

/// A request may end its sentences sooner than the configured limit, never later; its
/// guidance strength changes the audio.
#[test]
fn a_request_sets_its_frame_limit_and_guidance() {
    let d = Served::start(CONFIG, &[]);
    let mut c = d.connect();
    let mut frames = |extra: serde_json::Value| {
        let mut req = json!({"op": "speak", "text": "One here.", "output": "stream"});
        req.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        c.send(req);
        assert_eq!(c.recv().unwrap()["event"], "accepted");
        let msgs = c.until_done();
        let pcm: Vec<u8> = msgs
            .iter()
            .filter(|m| m["event"] == "audio")
            .flat_map(|m| base64_decode(m["pcm"].as_str().unwrap()))
            .collect();
        (msgs.last().unwrap()["frames"].as_u64().unwrap(), pcm)
    };
    assert_eq!(frames(json!({"max_frames": 2})).0, 2);
    assert_eq!(frames(json!({"max_frames": 100})).0, 6);
    let (_, plain) = frames(json!({}));
    let (_, same) = frames(json!({"cfg_alpha": 1.2}));
    let (_, other) = frames(json!({"cfg_alpha": 3.0}));
    assert_eq!(plain, same);
    assert_ne!(plain, other);
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

#[test]
fn raw_output_is_bare_pcm() {
    let d = Served::start(CONFIG, &[]);
    let mut c = d.connect();
    c.send(json!({"op": "speak", "text": "Raw bytes.", "output": "raw"}));
    let acc = c.recv().unwrap();
    assert_eq!(
        (acc["format"].as_str(), acc["rate"].as_u64()),
        (Some("s16le"), Some(24000))
    );
    let mut pcm = Vec::new();
    c.r.read_to_end(&mut pcm).unwrap();
    assert_eq!(pcm.len(), 6 * 1920 * 2);
}

#[test]
fn cancel_from_another_connection_and_vanished_clients() {
    let d = Served::start(CONFIG, &[]);
    let mut a = d.connect();
    a.send(json!({"op": "speak", "text": many(200), "output": "stream"}));
    let job = a.recv().unwrap()["job"].as_u64().unwrap();
    // Wait for audio, then cancel from elsewhere.
    while a.recv().unwrap()["event"] != "audio" {}
    let mut b = d.connect();
    let r = b.call(json!({"op": "cancel", "job": job}));
    assert_eq!(r["cancelled"], true);
    let rest = a.until_done();
    assert_eq!(rest.last().unwrap()["event"], "cancelled");

    // A client that leaves mid-stream: its job is cancelled, others go on.
    let mut gone = d.connect();
    gone.send(json!({"op": "speak", "text": many(200), "output": "stream"}));
    gone.recv().unwrap();
    while gone.recv().unwrap()["event"] != "audio" {}
    drop(gone);
    let mut c = d.connect();
    c.send(json!({"op": "speak", "text": "Still serving.", "output": "stream"}));
    c.recv().unwrap();
    assert_eq!(c.until_done().last().unwrap()["event"], "finished");
    let start = Instant::now();
    while c.call(json!({"op": "status"}))["queue"] != 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the vanished job kept running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_that_stops_reading_loses_its_job_and_others_proceed() {
    let d = Served::start(
        "[limits]\nmax_frames = 6\nclient_buffer = 4\nstall_timeout = 1\n",
        &[],
    );
    let mut slow = d.connect();
    slow.send(json!({"op": "speak", "text": many(100), "output": "stream"}));
    assert_eq!(slow.recv().unwrap()["event"], "accepted");
    // From now on it never reads. Another client's request is served beside it.
    let mut other = d.connect();
    other.send(json!({"op": "speak", "text": "Served beside it.", "output": "stream"}));
    other.recv().unwrap();
    assert_eq!(other.until_done().last().unwrap()["event"], "finished");
    // The slow job is cancelled long before its 600 frames are done.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        other.send(json!({"op": "status"}));
        if other.recv().unwrap()["queue"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the slow job still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The slow client finds the reason at the end of what it was sent.
    let last = slow.until_done().pop().unwrap();
    assert_eq!(last["event"], "cancelled", "{last}");
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("stopped reading for 1 s"),
        "{last}"
    );
}

#[test]
fn sigterm_cleans_up_and_a_second_daemon_is_refused() {
    let mut d = Served::start(CONFIG, &[]);
    let second = d.cli(&[
        "serve",
        "--no-dbus",
        "--model",
        fixture_dir().to_str().unwrap(),
    ]);
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already listening"));
    let out = d.terminate();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!d.socket().exists(), "socket left behind");
}

#[test]
fn bad_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("voxtrald")).unwrap();
    std::fs::write(dir.path().join("voxtrald/config.toml"), "volume = 7\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_voxtrald"))
        .args([
            "serve",
            "--no-dbus",
            "--model",
            fixture_dir().to_str().unwrap(),
        ])
        .env("XDG_RUNTIME_DIR", dir.path())
        .env("XDG_CONFIG_HOME", dir.path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("`volume`") && err.contains("config.toml"),
        "{err}"
    );
}

#[test]
fn cli_commands_use_the_running_daemon() {
    let d = Served::start(CONFIG, &[]);
    let wav = d.dir.path().join("via.wav");
    let out = d.cli(&["say", "--out", wav.to_str().unwrap(), "Through the daemon."]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("daemon:"));
    assert_eq!(hound::WavReader::open(&wav).unwrap().len(), 6 * 1920);
    let out = d.cli(&["voices"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 20);
    let out = d.cli(&["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"queue\""));
    assert!(d.cli(&["stop"]).status.success());
}

#[test]
fn cli_without_a_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_voxtrald"))
        .arg("status")
        .env("XDG_RUNTIME_DIR", dir.path())
        .env("XDG_CONFIG_HOME", dir.path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no voxtrald daemon is running"));
}

#[test]
fn install_writes_user_units() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_voxtrald"))
        .args(["install", "--user"])
        .env("HOME", dir.path())
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_DATA_HOME")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unit =
        std::fs::read_to_string(dir.path().join(".config/systemd/user/voxtrald.service")).unwrap();
    assert!(unit.contains("Type=dbus"));
    assert!(unit.contains("BusName=org.voxtrald.Speech.Provider"));
    let exe = Path::new(env!("CARGO_BIN_EXE_voxtrald"));
    assert!(
        unit.contains(&format!("ExecStart={} serve", exe.display())),
        "{unit}"
    );
    let act = std::fs::read_to_string(
        dir.path()
            .join(".local/share/dbus-1/services/org.voxtrald.Speech.Provider.service"),
    )
    .unwrap();
    assert!(act.contains("SystemdService=voxtrald.service"));
    assert!(act.contains("Name=org.voxtrald.Speech.Provider"));
    // The Speech Dispatcher module runs this binary's module protocol.
    let module = dir
        .path()
        .join(".local/libexec/speech-dispatcher-modules/sd_voxtrald");
    let mode = std::fs::metadata(&module).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755);
    let mut child = Command::new(&module)
        .arg("voxtrald.conf")
        .env("HOME", dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"QUIT\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "210 OK QUIT\n");
    // With XDG_DATA_HOME elsewhere, the module goes where speech-dispatcher derives from it.
    let data = dir.path().join("elsewhere/share");
    let out = Command::new(env!("CARGO_BIN_EXE_voxtrald"))
        .args(["install", "--user"])
        .env("HOME", dir.path())
        .env("XDG_DATA_HOME", &data)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(dir
        .path()
        .join("elsewhere/libexec/speech-dispatcher-modules/sd_voxtrald")
        .exists());
    assert!(data
        .join("dbus-1/services/org.voxtrald.Speech.Provider.service")
        .exists());
}

#[test]
fn clients_of_other_users_are_refused() {
    // Needs root to act as another user; CI runs as root.
    let root =
        std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    let have_setpriv = Command::new("setpriv").arg("--version").output().is_ok();
    if !root || !have_setpriv {
        eprintln!("skipping: needs root and setpriv");
        return;
    }
    let d = Served::start(CONFIG, &[]);
    // Open the file modes so that only the daemon's own check stands in the way.
    for (p, m) in [
        (d.dir.path().to_path_buf(), 0o755),
        (d.socket().parent().unwrap().to_path_buf(), 0o755),
        (d.socket(), 0o666),
    ] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_voxtrald"))
        .arg("status")
        .env("XDG_RUNTIME_DIR", d.dir.path())
        .env("XDG_CONFIG_HOME", d.dir.path().join("config"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("serves only its own user"), "{err}");
    // The daemon goes on serving its owner.
    assert_eq!(d.connect().call(json!({"op": "status"}))["event"], "status");
}
