//! `voxtrald sd-module` driven as speech-dispatcher drives an output module: the line protocol
//! on stdin/stdout, with `705` audio blocks unescaped. Optionally read at playback pace, as
//! speech-dispatcher takes a module's audio.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

pub const WAIT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    Line(String),
    /// The unescaped PCM of one `705-AUDIO` block.
    Audio(Vec<u8>),
}

pub struct Module {
    pub child: Child,
    stdin: ChildStdin,
    rx: Receiver<Msg>,
}

impl Module {
    /// The module, read as fast as it writes.
    pub fn start(runtime: &std::path::Path) -> Self {
        Self::start_paced(runtime, None)
    }

    /// The module; with `pace` (a sample rate), its stdout is read no faster than audio of
    /// that rate plays: after each audio block the reader waits until the block would have
    /// played, so the module is held up as speech-dispatcher holds it up.
    pub fn start_paced(runtime: &std::path::Path, pace: Option<u32>) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_voxtrald"))
            .args(["sd-module", "/etc/speech-dispatcher/modules/voxtrald.conf"])
            .env("XDG_RUNTIME_DIR", runtime)
            .env("XDG_CONFIG_HOME", runtime.join("config"))
            .env("HOME", runtime)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut out = BufReader::with_capacity(4096, child.stdout.take().unwrap());
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            let mut played_until: Option<Instant> = None;
            loop {
                let mut raw = Vec::new();
                if out.read_until(b'\n', &mut raw).unwrap_or(0) == 0 {
                    return;
                }
                raw.pop();
                let msg = match raw.strip_prefix(b"705-AUDIO\0") {
                    Some(escaped) => {
                        let mut pcm = Vec::with_capacity(escaped.len());
                        let mut it = escaped.iter();
                        while let Some(&b) = it.next() {
                            pcm.push(if b == 0x7d {
                                it.next().unwrap() ^ 0x20
                            } else {
                                b
                            });
                        }
                        if let Some(rate) = pace {
                            let secs = pcm.len() as f64 / 2.0 / rate as f64;
                            let now = Instant::now();
                            let start = played_until.filter(|t| *t > now).unwrap_or(now);
                            let end = start + Duration::from_secs_f64(secs);
                            std::thread::sleep(end.saturating_duration_since(now));
                            played_until = Some(end);
                        }
                        Msg::Audio(pcm)
                    }
                    None => Msg::Line(String::from_utf8(raw).unwrap()),
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
        });
        Self { child, stdin, rx }
    }

    pub fn send(&mut self, s: &str) {
        self.send_bytes(s.as_bytes());
    }

    pub fn send_bytes(&mut self, b: &[u8]) {
        self.stdin.write_all(b).unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next message, or an error once `wait` passes or the module's output ends.
    pub fn try_next(&self, wait: Duration) -> Result<Msg, std::sync::mpsc::RecvTimeoutError> {
        self.rx.recv_timeout(wait)
    }

    pub fn next(&self) -> Msg {
        self.rx.recv_timeout(WAIT).expect("the module said nothing")
    }

    pub fn line(&self) -> String {
        match self.next() {
            Msg::Line(l) => l,
            other => panic!("expected a line, got {other:?}"),
        }
    }

    /// Messages up to and including the line `last`.
    pub fn until(&self, last: &str) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self.next();
            let done = m == Msg::Line(last.into());
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Sends a command with a data block and checks both replies.
    pub fn block(&mut self, cmd: &str, first: &str, data: &str, last: &str) {
        self.send(&format!("{cmd}\n"));
        assert_eq!(self.line(), first, "{cmd}");
        self.send(data);
        assert_eq!(self.line(), last, "{cmd}");
    }

    /// INIT, server-side audio and `settings` (`key=value` lines), as speech-dispatcher
    /// starts a module.
    pub fn init(&mut self, settings: &str) {
        self.send("INIT\n");
        assert!(self.line().starts_with("299-voxtrald: "));
        assert_eq!(self.line(), "299 OK LOADED SUCCESSFULLY");
        self.block(
            "AUDIO",
            "207 OK RECEIVING AUDIO SETTINGS",
            "audio_output_method=server\n.\n",
            "203 OK AUDIO INITIALIZED",
        );
        self.block(
            "SET",
            "203 OK RECEIVING SETTINGS",
            &format!("{settings}.\n"),
            "203 OK SETTINGS RECEIVED",
        );
    }

    /// Speaks `text` and returns what came back up to `702 END`.
    pub fn speak(&mut self, text: &str) -> Vec<Msg> {
        self.block(
            "SPEAK",
            "202 OK RECEIVING MESSAGE",
            &format!("{text}\n.\n"),
            "200 OK SPEAKING",
        );
        self.until("702 END")
    }
}

pub fn lines(msgs: &[Msg], prefix: &str) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            Msg::Line(l) if l.starts_with(prefix) => Some(l[prefix.len()..].to_string()),
            _ => None,
        })
        .collect()
}

pub fn audio(msgs: &[Msg]) -> Vec<u8> {
    msgs.iter()
        .flat_map(|m| match m {
            Msg::Audio(a) => a.clone(),
            _ => Vec::new(),
        })
        .collect()
}

pub fn audio_bytes(msgs: &[Msg]) -> usize {
    audio(msgs).len()
}
