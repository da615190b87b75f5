//! The voice library end to end: codes imported while the daemon runs appear on every
//! interface at once (Spiel `Voices` with `PropertiesChanged`, the control signal, the socket,
//! the HTTP list, Wyoming `info`, Speech Dispatcher's module) and speak; removed ones vanish;
//! damaged files are named and do not hide the others; a voice's rows are the summed code
//! embeddings of the official cloning path.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::time::Duration;

use common::bus::{connect_when_served, private_bus, provider, NAME, PATH};
use common::random_frames;
use common::served::Served;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// A `.npy` of `[T, 37]` `<i4` codes, written here by hand as NumPy lays it out (not by
/// voxtrald's writer), raw (without the +2 offset) as an encoder emits them.
fn write_raw_npy(path: &Path, frames: &[Vec<u32>]) {
    let header = format!(
        "{{'descr': '<i4', 'fortran_order': False, 'shape': ({}, 37), }}",
        frames.len()
    );
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    let mut h = header.into_bytes();
    h.resize(total - 11, b' ');
    h.push(b'\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend_from_slice(&(h.len() as u16).to_le_bytes());
    b.extend_from_slice(&h);
    for c in frames.iter().flatten() {
        b.extend_from_slice(&((*c as i32) - 2).to_le_bytes());
    }
    std::fs::write(path, b).unwrap();
}

fn stream_audio_bytes(d: &Served, voice: &str) -> Result<usize, String> {
    let mut c = d.connect();
    let r = c.call(
        json!({"op": "speak", "text": "Hello there.", "voice": voice,
                          "output": "stream", "seed": 3}),
    );
    if r["event"] == "error" {
        return Err(r["error"].as_str().unwrap_or("").to_string());
    }
    let mut samples = 0;
    for m in c.until_done() {
        samples += m["samples"].as_u64().unwrap_or(0) as usize;
        assert_ne!(m["event"], "failed", "{m}");
    }
    Ok(samples)
}

fn socket_voice_ids(d: &Served) -> Vec<(String, String)> {
    let v = d.connect().call(json!({"op": "voices"}));
    v["voices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap().to_string(),
                v["origin"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Wyoming `describe` over a raw socket: the TTS voices' names.
fn wyoming_voice_names(addr: &str) -> Vec<String> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"{\"type\": \"describe\"}\n").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let header: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(header["type"], "info");
    let mut data = header["data"].clone();
    if let Some(n) = header["data_length"].as_u64().filter(|n| *n > 0) {
        let mut block = vec![0; n as usize];
        r.read_exact(&mut block).unwrap();
        data = serde_json::from_slice(&block).unwrap();
    }
    data["tts"][0]["voices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

fn http_voice_ids(addr: &str) -> Vec<String> {
    let r = common::http::get(addr, "/v1/audio/voices");
    r.json()["voices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_string())
        .collect()
}

/// Speech Dispatcher's view: `LIST VOICES` through `voxtrald sd-module` on the daemon.
fn speechd_voice_ids(d: &Served) -> Vec<String> {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_voxtrald"))
        .arg("sd-module")
        .env("XDG_RUNTIME_DIR", d.dir.path())
        .env("XDG_CONFIG_HOME", d.dir.path().join("config"))
        .env("HOME", d.dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"INIT\nLIST VOICES\nQUIT\n").unwrap();
    drop(stdin);
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child.wait().unwrap();
    out.lines()
        .filter_map(|l| l.strip_prefix("200-"))
        .filter_map(|l| l.split('\t').next())
        .map(str::to_string)
        .collect()
}

async fn spiel_voice_ids(p: &zbus::Proxy<'_>) -> Vec<String> {
    let voices: Vec<(String, String, String, u64, Vec<String>)> =
        p.get_property("Voices").await.unwrap();
    voices.into_iter().map(|v| v.1).collect()
}

/// Waits for the provider's `PropertiesChanged` naming `Voices`.
async fn voices_changed(
    changes: &mut (impl futures_util::Stream<Item = zbus::fdo::PropertiesChanged> + Unpin),
) {
    let wait = async {
        while let Some(sig) = changes.next().await {
            let args = sig.args().unwrap();
            if args.changed_properties().contains_key("Voices")
                || args.invalidated_properties().contains(&"Voices")
            {
                return;
            }
        }
        panic!("signal stream ended");
    };
    tokio::time::timeout(Duration::from_secs(10), wait)
        .await
        .expect("PropertiesChanged for Voices within 10 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voice_imported_while_serving_is_on_every_interface_and_speaks() {
    let busdir = tempfile::tempdir().unwrap();
    let bus = private_bus(busdir.path());
    let d = Served::start(
        "http = \"127.0.0.1:0\"\nwyoming = \"127.0.0.1:0\"\n[limits]\nmax_frames = 6\n",
        &[("DBUS_SESSION_BUS_ADDRESS", &bus.address)],
    );
    let conn = connect_when_served(&bus).await;
    let spiel = provider(&conn).await;
    let props = zbus::fdo::PropertiesProxy::new(&conn, NAME, PATH)
        .await
        .unwrap();
    let mut changes = props.receive_properties_changed().await.unwrap();
    let control = zbus::Proxy::new(&conn, NAME, "/org/voxtrald/Daemon", "org.voxtrald.Daemon1")
        .await
        .unwrap();
    let mut control_changes = control.receive_signal("VoicesChanged").await.unwrap();
    let status = d.connect().call(json!({"op": "status"}));
    let http = status["http"].as_str().unwrap().to_string();
    let wyoming = status["wyoming"].as_str().unwrap().to_string();
    assert!(!spiel_voice_ids(&spiel).await.contains(&"mine".to_string()));

    // Import with the CLI, as a user would, while the daemon runs.
    let npy = d.dir.path().join("mine.npy");
    write_raw_npy(&npy, &random_frames(12, 7));
    let out = d.cli(&[
        "voice",
        "import",
        "mine",
        "--codes",
        npy.to_str().unwrap(),
        "--language",
        "fr",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    voices_changed(&mut changes).await;
    tokio::time::timeout(Duration::from_secs(10), control_changes.next())
        .await
        .expect("VoicesChanged within 10 s");

    // Every interface lists it.
    let voices: Vec<(String, String, String, u64, Vec<String>)> =
        spiel.get_property("Voices").await.unwrap();
    let mine = voices
        .iter()
        .find(|v| v.1 == "mine")
        .expect("Spiel lists mine");
    assert_eq!(mine.4, vec!["fr".to_string()]);
    assert_eq!(mine.0, "mine (French)");
    assert!(socket_voice_ids(&d).contains(&("mine".into(), "user".into())));
    assert!(http_voice_ids(&http).contains(&"mine".to_string()));
    assert!(wyoming_voice_names(&wyoming).contains(&"mine".to_string()));
    assert!(speechd_voice_ids(&d).contains(&"mine".to_string()));
    let user: Vec<(String, String, String, String)> =
        control.call("ListUserVoices", &()).await.unwrap();
    assert_eq!(user.len(), 1);
    assert_eq!(
        (user[0].0.as_str(), user[0].1.as_str(), user[0].3.as_str()),
        ("mine", "fr", "")
    );

    // It speaks, and its codes matter: other codes give other audio.
    let a = stream_audio_bytes(&d, "mine").unwrap();
    assert!(a > 0);
    let mut c = d.connect();
    let other = d.dir.path().join("other.npy");
    write_raw_npy(&other, &random_frames(9, 99));
    let r = c.call(
        json!({"op": "voice_import", "name": "other", "language": "en",
                          "path": other, "offset": "0"}),
    );
    assert_eq!(r["event"], "voice", "{r}");
    assert_eq!(r["voice"]["origin"], "user");
    voices_changed(&mut changes).await;
    let pcm = |voice: &str| {
        let mut c = d.connect();
        c.call(json!({"op": "speak", "text": "Hello there.", "voice": voice, "output": "stream", "seed": 3}));
        c.until_done()
            .iter()
            .filter_map(|m| m["pcm"].as_str().map(str::to_string))
            .collect::<String>()
    };
    assert_ne!(pcm("mine"), pcm("other"), "different codes, same audio");

    // Export through D-Bus, rename and remove through the socket.
    let exported = d.dir.path().join("exported.npy");
    let () = control
        .call("ExportVoice", &("mine", exported.to_str().unwrap()))
        .await
        .unwrap();
    let reimported =
        c.call(json!({"op": "voice_import", "name": "again", "language": "fr", "path": exported}));
    assert_eq!(reimported["event"], "voice", "{reimported}");
    assert_eq!(
        pcm("again"),
        pcm("mine"),
        "an export re-imports to the same voice"
    );
    let r = c.call(json!({"op": "voice_rename", "from": "again", "to": "renamed"}));
    assert_eq!(r["voice"]["id"], "renamed", "{r}");
    let r = c.call(json!({"op": "voice_remove", "name": "mine"}));
    assert_eq!(r["event"], "ok", "{r}");
    // The rename and the removal may come as one change or two: wait for the list to settle.
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids = spiel_voice_ids(&spiel).await;
        if !ids.contains(&"mine".to_string()) && ids.contains(&"renamed".to_string()) {
            break;
        }
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            voices_changed(&mut changes),
        )
        .await;
    }
    assert!(
        !ids.contains(&"mine".to_string()) && ids.contains(&"renamed".to_string()),
        "{ids:?}"
    );
    assert!(!http_voice_ids(&http).contains(&"mine".to_string()));
    let e = stream_audio_bytes(&d, "mine").unwrap_err();
    assert!(
        e.contains("unknown voice `mine`") && e.contains("renamed"),
        "{e}"
    );

    // Bad requests get clear errors and the daemon goes on.
    let r = c.call(json!({"op": "voice_import", "name": "fr_male", "language": "fr", "path": npy}));
    assert!(
        r["error"].as_str().unwrap().contains("is a preset voice"),
        "{r}"
    );
    let r = c.call(
        json!({"op": "voice_import", "name": "x", "language": "fr", "path": "/nonexistent.npy"}),
    );
    assert!(
        r["error"].as_str().unwrap().contains("/nonexistent.npy"),
        "{r}"
    );
    let r = c.call(json!({"op": "voice_remove", "name": "nobody"}));
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("no user voice `nobody`"),
        "{r}"
    );
    let e = control
        .call::<_, _, ()>("RemoveVoice", &("nobody",))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("nobody"), "{e}");
    // A damaged file dropped into the folder is named, the others stay.
    let lib = d.dir.path().join(".local/share/voxtrald/voices");
    std::fs::write(lib.join("broken.json"), b"{\"format\": 1").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listing = c.call(json!({"op": "user_voices"}));
    let damaged = listing["damaged"].as_array().unwrap();
    assert_eq!(damaged.len(), 1, "{listing}");
    assert!(damaged[0]["error"]
        .as_str()
        .unwrap()
        .contains("broken.json"));
    assert_eq!(listing["voices"].as_array().unwrap().len(), 2, "{listing}");
    assert!(stream_audio_bytes(&d, "renamed").unwrap() > 0);
    drop(bus);
}

#[test]
fn the_library_is_private_and_the_cli_names_bad_files() {
    let d = Served::start("[limits]\nmax_frames = 3\n", &[]);
    let npy = d.dir.path().join("codes.npy");
    write_raw_npy(&npy, &random_frames(5, 1));
    let ok = d.cli(&["voice", "import", "alice", "--codes", npy.to_str().unwrap()]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let lib = d.dir.path().join(".local/share/voxtrald/voices");
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&lib), 0o700);
    assert_eq!(mode(&lib.join("alice.json")), 0o600);
    // A damaged code file: a clear error naming it, nothing stored.
    let junk = d.dir.path().join("junk.npy");
    std::fs::write(&junk, b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'").unwrap();
    let bad = d.cli(&["voice", "import", "bob", "--codes", junk.to_str().unwrap()]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("junk.npy"), "{err}");
    assert!(!lib.join("bob.json").exists());
    std::fs::write(lib.join("carol.json"), b"garbage").unwrap();
    let list = d.cli(&["voice", "list"]);
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        text.contains("alice") && text.contains("imported from codes.npy"),
        "{text}"
    );
    assert!(
        text.contains("damaged") && text.contains("carol.json"),
        "{text}"
    );
    assert!(text.contains("casual_male"), "{text}");
    let json: Value = serde_json::from_slice(&d.cli(&["voice", "list", "--json"]).stdout).unwrap();
    assert_eq!(json["presets"].as_array().unwrap().len(), 20);
    assert_eq!(json["voices"][0]["frames"], 5);
    // The daemon keeps serving the good voice beside the damaged file.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(stream_audio_bytes(&d, "alice").unwrap() > 0);
    let gone = d.cli(&["voice", "remove", "alice"]);
    assert!(gone.status.success());
    let again = d.cli(&["voice", "remove", "alice"]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("no user voice `alice`"));
}

#[test]
fn voice_rows_are_the_summed_code_embeddings_plus_an_end_frame() {
    let model = common::model();
    let frames = random_frames(4, 5);
    let rows = model.voice_rows_from_codes(&frames).unwrap();
    assert_eq!(rows.dims(), &[5, 64]);
    // The table, read from the checkpoint directly; row of code c in codebook k:
    // c + (0 for k = 0, else 8194 + 23 (k - 1)).
    let tensors = candle_core::safetensors::load(
        common::fixture_dir().join("consolidated.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let table = tensors["mm_audio_embeddings.audio_codebook_embeddings.embeddings.weight"]
        .to_dtype(candle_core::DType::F32)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let offset = |k: usize| if k == 0 { 0 } else { 8194 + 23 * (k - 1) };
    let mut end = vec![0u32; 37];
    end[0] = 1;
    let got = rows.to_vec2::<f32>().unwrap();
    for (t, f) in frames.iter().chain(std::iter::once(&end)).enumerate() {
        let mut want = vec![0f32; 64];
        for (k, &c) in f.iter().enumerate() {
            for (w, v) in want.iter_mut().zip(&table[c as usize + offset(k)]) {
                *w += v;
            }
        }
        common::assert_close(&format!("row {t}"), &got[t], &want, 1e-5, 1e-5);
    }
    // An end frame inside, a short frame, an out-of-range code: errors, no panic.
    let mut bad = frames.clone();
    bad.insert(1, end.clone());
    assert!(model.voice_rows_from_codes(&bad).is_err());
    assert!(model.voice_rows_from_codes(&[vec![2; 36]]).is_err());
    assert!(model.voice_rows_from_codes(&[vec![9000; 37]]).is_err());
    assert!(model.voice_rows_from_codes(&[]).is_err());
}

/// A 16-bit WAV of `frames` frames of random codes decoded by the fixture (a known voice).
fn write_decoded_clip(path: &Path, frames: usize, seed: u64) {
    let audio = common::model()
        .decode(&random_frames(frames, seed))
        .unwrap();
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 24_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let peak = audio.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for x in &audio {
        w.write_sample((x / peak * 0.8 * 32767.0) as i16).unwrap();
    }
    w.finalize().unwrap();
}

/// `voice create` end to end on the fixture: a clip the codec made is cloned into the user
/// library with its quality figures, listed, refused a second time without `--replace`, and
/// spoken by `say`.
#[test]
fn voice_create_clones_a_clip_into_the_library_and_it_speaks() {
    let home = tempfile::tempdir().unwrap();
    let fixture = common::fixture_dir();
    let clip = home.path().join("me.wav");
    write_decoded_clip(&clip, 48, 7);
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_voxtrald"))
            .args(args)
            .env("HOME", home.path())
            .env("XDG_DATA_HOME", home.path().join("data"))
            .env("XDG_CONFIG_HOME", home.path().join("config"))
            .env("XDG_RUNTIME_DIR", home.path())
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    };
    let fx = fixture.to_str().unwrap();
    let create = [
        "voice",
        "create",
        "mine",
        "--from",
        clip.to_str().unwrap(),
        "--language",
        "fr",
        "--steps",
        "8",
        "--crop-frames",
        "4",
        "--refine-sweeps",
        "0",
        "--seed",
        "3",
        "--device",
        "cpu",
        "--model",
        fx,
    ];
    let out = run(&create);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("created `mine`"), "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("clip: "));
    let file = home.path().join("data/voxtrald/voices/mine.json");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let list: Value = serde_json::from_slice(&run(&["voice", "list", "--json"]).stdout).unwrap();
    let v = &list["voices"][0];
    assert_eq!(v["name"], "mine");
    assert_eq!(v["language"], "fr");
    assert_eq!(v["made"]["by"], "clone", "{v}");
    // Silence trimming may take a few samples off the ends, never seconds.
    let frames = v["frames"].as_u64().unwrap();
    assert!((40..=48).contains(&frames), "{v}");
    assert_eq!(v["made"]["steps"], 8, "{v}");
    assert_eq!(v["made"]["seed"], 3, "{v}");
    assert_eq!(v["made"]["source"], "me.wav", "{v}");
    assert_eq!(
        v["made"]["source_sha256"].as_str().unwrap().len(),
        64,
        "{v}"
    );
    let q = &v["quality"];
    let (d, r) = (
        q["stft_distance"].as_f64().unwrap(),
        q["random_stft_distance"].as_f64().unwrap(),
    );
    assert!(
        d > 0.0 && r > 0.0 && q["loss"].as_f64().unwrap().is_finite(),
        "{q}"
    );
    let table = String::from_utf8_lossy(&run(&["voice", "list"]).stdout).to_string();
    assert!(
        table.contains("mine") && table.contains("cloned, 8 steps"),
        "{table}"
    );
    assert!(table.contains("STFT distance"), "{table}");
    // The clip itself is not kept.
    let kept: Vec<_> = std::fs::read_dir(file.parent().unwrap()).unwrap().collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    // Same name again: refused before any work.
    let again = run(&create);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    // It speaks.
    let wav = home.path().join("out.wav");
    let say = run(&[
        "say",
        "--model",
        fx,
        "--voice",
        "mine",
        "--max-frames",
        "3",
        "--out",
        wav.to_str().unwrap(),
        "Bonjour.",
    ]);
    assert!(
        say.status.success(),
        "{}",
        String::from_utf8_lossy(&say.stderr)
    );
    assert!(hound::WavReader::open(&wav).unwrap().len() > 0);
}

/// Ctrl-C (SIGINT) during `voice create` stops the search and stores the best codes so far.
#[test]
fn ctrl_c_during_voice_create_keeps_the_best_codes_so_far() {
    let home = tempfile::tempdir().unwrap();
    let clip = home.path().join("me.wav");
    write_decoded_clip(&clip, 40, 8);
    let env = |c: &mut std::process::Command| {
        c.env("HOME", home.path())
            .env("XDG_DATA_HOME", home.path().join("data"))
            .env("XDG_CONFIG_HOME", home.path().join("config"))
            .env("RUST_BACKTRACE", "0");
    };
    let fx = common::fixture_dir();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_voxtrald"));
    cmd.args(["voice", "create", "stopped", "--from"])
        .arg(&clip)
        .args([
            "--steps",
            "1000000",
            "--crop-frames",
            "4",
            "--device",
            "cpu",
            "--model",
        ])
        .arg(&fx)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    env(&mut cmd);
    let mut child = cmd.spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    // The first step's line: the search is running, a step is done, and the Ctrl-C watcher
    // was set up before it.
    while !line.starts_with("step ") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "no step line");
    }
    let st = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(st.success());
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = err.read_to_string(&mut rest);
        rest
    });
    let out = child.wait_with_output().unwrap();
    let stderr = drain.join().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stderr.contains("keeping the best codes"), "{stderr}");
    assert!(
        stdout.contains("stopped after") && stdout.contains("created `stopped`"),
        "{stdout}"
    );
    let mut list = std::process::Command::new(env!("CARGO_BIN_EXE_voxtrald"));
    list.args(["voice", "list", "--json"]);
    env(&mut list);
    let json: Value = serde_json::from_slice(&list.output().unwrap().stdout).unwrap();
    let steps = json["voices"][0]["made"]["steps"].as_u64().unwrap();
    assert!(steps > 0 && steps < 1_000_000, "{json}");
}
