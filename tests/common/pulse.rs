//! A private PulseAudio server with a null sink, for tests that play real audio.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Pulse {
    daemon: Child,
    pub runtime: tempfile::TempDir,
}

impl Drop for Pulse {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A private PulseAudio server with a null sink; `None` (skip) only outside CI.
pub fn start_pulse() -> Option<Pulse> {
    if !have("pulseaudio") || !have("parec") {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must install pulseaudio and pulseaudio-utils"
        );
        eprintln!("skipping: pulseaudio/parec not installed");
        return None;
    }
    let runtime = tempfile::tempdir().unwrap();
    let daemon = Command::new("pulseaudio")
        .args([
            "-n",
            "--daemonize=no",
            "--exit-idle-time=-1",
            "--disallow-exit",
            "--load=module-null-sink sink_name=nullsink rate=48000 format=float32le channels=2",
            "--load=module-native-protocol-unix",
        ])
        .env("XDG_RUNTIME_DIR", runtime.path())
        .env("HOME", runtime.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting pulseaudio");
    let p = Pulse { daemon, runtime };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        let ok = Command::new("pactl")
            .arg("info")
            .env("XDG_RUNTIME_DIR", p.runtime.path())
            .env("HOME", p.runtime.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(p);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("pulseaudio did not come up");
}

impl Pulse {
    /// `PULSE_SERVER` for clients of this server.
    pub fn server(&self) -> String {
        format!("unix:{}/pulse/native", self.runtime.path().display())
    }
}
