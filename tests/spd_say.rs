//! Debian's real speech-dispatcher, started by the test with `sd_voxtrald` as its only module
//! and playing into a private PulseAudio null sink: `spd-say` speaks through voxtrald, and an
//! SSIP client with index-mark notifications gets one `700` per `<mark/>`, in order, each
//! after the audio before it has played.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::pulse::{have, start_pulse};
use common::served::Served;
use serde_json::json;

const SSML: &str = r#"<speak><mark name="a"/>One <mark name="b"/>two. <mark name="c"/>Three four.<mark name="d"/></speak>"#;

struct Dispatcher {
    child: Child,
}

impl Drop for Dispatcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// speech-dispatcher in `dir`, its only module `voxtrald` (our sd-module), audio to `pulse`.
fn start_dispatcher(dir: &Path, runtime: &Path, pulse: &str) -> Dispatcher {
    let (conf, mods) = (dir.join("conf"), dir.join("modules"));
    std::fs::create_dir_all(conf.join("modules")).unwrap();
    std::fs::create_dir_all(&mods).unwrap();
    std::fs::write(
        conf.join("speechd.conf"),
        "AddModule \"voxtrald\" \"sd_voxtrald\" \"voxtrald.conf\"\nDefaultModule voxtrald\n\
         AudioOutputMethod \"pulse\"\nLogLevel 3\n",
    )
    .unwrap();
    std::fs::write(conf.join("modules/voxtrald.conf"), "").unwrap();
    let module = mods.join("sd_voxtrald");
    std::fs::write(
        &module,
        format!(
            "#!/bin/sh\nexec {} sd-module\n",
            env!("CARGO_BIN_EXE_voxtrald")
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&module, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.join("speechd.sock");
    let child = Command::new("speech-dispatcher")
        .args(["-s", "-t", "0", "-l", "3"])
        .arg("-C")
        .arg(&conf)
        .arg("-m")
        .arg(&mods)
        .arg("-S")
        .arg(&socket)
        .arg("-L")
        .arg(dir)
        .arg("-P")
        .arg(dir.join("pid"))
        .env("XDG_RUNTIME_DIR", runtime)
        .env("HOME", dir)
        .env("PULSE_SERVER", pulse)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting speech-dispatcher");
    let start = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "speech-dispatcher did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Dispatcher { child }
}

/// One SSIP reply (its lines, the last one without `-`).
fn reply(r: &mut impl BufRead) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let mut line = String::new();
        assert!(
            r.read_line(&mut line).unwrap() > 0,
            "speech-dispatcher hung up"
        );
        let line = line.trim_end().to_string();
        let last = line.as_bytes().get(3) == Some(&b' ');
        out.push(line);
        if last {
            return out;
        }
    }
}

#[test]
fn spd_say_and_index_marks_through_a_real_speech_dispatcher() {
    if !have("speech-dispatcher") || !have("spd-say") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install speech-dispatcher"
        );
        eprintln!("skipping: speech-dispatcher not installed");
        return;
    }
    let Some(pulse) = start_pulse() else { return };
    // Short sentences (12 frames at most, under a second each).
    let served = Served::start("[limits]\nmax_frames = 12\n", &[]);
    let dir = tempfile::tempdir().unwrap();
    let _sd = start_dispatcher(dir.path(), served.dir.path(), &pulse.server());
    let address = format!("unix_socket:{}", dir.path().join("speechd.sock").display());

    // How long each sentence's audio is, from the daemon itself (same text, same seed).
    let mut c = served.connect();
    c.send(json!({"op": "speak", "text": SSML, "ssml": true, "output": "stream"}));
    let (mut samples, mut first) = (0u64, None);
    loop {
        let ev = c.recv().expect("the daemon hung up");
        match ev["event"].as_str().unwrap() {
            "sentence" if samples > 0 => first = Some(samples),
            "audio" => samples += ev["samples"].as_u64().unwrap(),
            "finished" => break,
            _ => {}
        }
    }
    let first = first.expect("two sentences") as f64 / 24000.0;
    let total = samples as f64 / 24000.0;

    // spd-say waits (-w) until the message is spoken.
    let t = Instant::now();
    let status = Command::new("spd-say")
        .args(["-w", "-o", "voxtrald", "Hello there."])
        .env("SPEECHD_ADDRESS", &address)
        .status()
        .unwrap();
    assert!(status.success(), "spd-say: {status}");
    assert!(
        t.elapsed() > Duration::from_millis(300),
        "spd-say did not wait for the audio"
    );

    // An SSIP client as Orca is one: SSML, index marks on.
    let mut s = UnixStream::connect(dir.path().join("speechd.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    for cmd in [
        "SET SELF CLIENT_NAME test:voxtrald:main",
        "SET SELF NOTIFICATION ALL on",
        "SET SELF SSML_MODE on",
        "SET SELF OUTPUT_MODULE voxtrald",
        "SPEAK",
    ] {
        write!(s, "{cmd}\r\n").unwrap();
        let rep = reply(&mut r);
        assert!(rep.last().unwrap().starts_with('2'), "{cmd}: {rep:?}");
    }
    write!(s, "{SSML}\r\n.\r\n").unwrap();
    let queued = reply(&mut r);
    assert!(queued.last().unwrap().starts_with("225"), "{queued:?}");
    let msg = queued[0].trim_start_matches("225-").to_string();
    let mut marks = Vec::new();
    let t0 = Instant::now();
    loop {
        let ev = reply(&mut r);
        assert_eq!(ev[0], format!("{}-{msg}", &ev[0][..3]), "{ev:?}");
        match &ev.last().unwrap()[..] {
            "700 INDEX MARK" => {
                marks.push((ev[2].trim_start_matches("700-").to_string(), t0.elapsed()))
            }
            "702 END" => break,
            "701 BEGIN" => {}
            other => panic!("unexpected {other}: {ev:?}"),
        }
    }
    let names: Vec<&str> = marks.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
    let at = |i: usize| marks[i].1.as_secs_f64();
    // "c" starts the second sentence: it comes once the first one's audio has played, and "d"
    // (after the last word) once all of it has. The slack is the player's buffer.
    assert!(
        at(2) - at(0) > first - 0.3,
        "c after {:.2} s, first sentence {first:.2} s",
        at(2) - at(0)
    );
    assert!(
        at(3) - at(0) > total - 0.3,
        "d after {:.2} s, all {total:.2} s",
        at(3) - at(0)
    );
    assert!(at(1) >= at(0) && at(3) >= at(2));
}
