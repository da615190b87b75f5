//! A `voxtrald serve` child process in a private runtime/config directory, and a JSON-lines
//! client of its socket.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::fixture_dir;

pub struct Served {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
}

impl Served {
    pub fn start(config: &str, extra_env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("config/voxtrald")).unwrap();
        std::fs::write(dir.path().join("config/voxtrald/config.toml"), config).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_voxtrald"));
        cmd.args(["serve", "--model", fixture_dir().to_str().unwrap()])
            .env("XDG_RUNTIME_DIR", dir.path())
            .env("XDG_CONFIG_HOME", dir.path().join("config"))
            .env("HOME", dir.path())
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !extra_env
            .iter()
            .any(|(k, _)| *k == "DBUS_SESSION_BUS_ADDRESS")
        {
            cmd.arg("--no-dbus");
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let s = Self {
            child: Some(child),
            dir,
        };
        let start = Instant::now();
        while UnixStream::connect(s.socket()).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The socket is bound before the model loads; the first answer means ready.
        assert_eq!(s.connect().call(json!({"op": "status"}))["event"], "status");
        s
    }

    /// The daemon's process id, for reading `/proc`.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("voxtrald/voxtrald.sock")
    }

    pub fn connect(&self) -> Conn {
        Conn::new(UnixStream::connect(self.socket()).unwrap())
    }

    /// Sends SIGTERM and returns the exit status and stderr.
    pub fn terminate(&mut self) -> Output {
        let child = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs the CLI in the daemon's environment.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_voxtrald"))
            .args(args)
            .env("XDG_RUNTIME_DIR", self.dir.path())
            .env("XDG_CONFIG_HOME", self.dir.path().join("config"))
            .env("HOME", self.dir.path())
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct Conn {
    pub r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Conn {
    fn new(s: UnixStream) -> Self {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Self {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }
    pub fn send(&mut self, v: Value) {
        self.send_raw(format!("{v}\n").as_bytes());
    }
    pub fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).unwrap()),
        }
    }
    pub fn call(&mut self, v: Value) -> Value {
        self.send(v);
        self.recv().expect("a reply")
    }
    /// Messages until the job's terminal event.
    pub fn until_done(&mut self) -> Vec<Value> {
        let mut out = Vec::new();
        while let Some(m) = self.recv() {
            let done = matches!(
                m["event"].as_str(),
                Some("finished" | "failed" | "cancelled")
            );
            out.push(m);
            if done {
                break;
            }
        }
        out
    }
}
