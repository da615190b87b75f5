//! Property-based fuzzing of what reaches a running daemon over the wire: HTTP requests to the
//! speech API (garbage bytes, wrong methods and headers, bodies cut short or too long, JSON
//! mutated field by field) and the speech-dispatcher module protocol (commands, blocks and
//! garbage lines in any order, invalid UTF-8 included). Every request gets an answer, never a
//! server error, and the daemon (and the module) go on serving.
//!
//! Fixed seeds and case counts by default; a longer run:
//! `VOXTRALD_FUZZ_CASES=2000 VOXTRALD_FUZZ_SEED=$RANDOM cargo test --test fuzz_wire`.

mod common;

use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::served::Served;
use common::speechd::{Module, Msg};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use serde_json::{json, Value};

fn config(default_cases: u32) -> Config {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    Config {
        cases: env("VOXTRALD_FUZZ_CASES").map_or(default_cases, |c| c as u32),
        rng_seed: RngSeed::Fixed(env("VOXTRALD_FUZZ_SEED").unwrap_or(0x5eed)),
        failure_persistence: None,
        ..Config::default()
    }
}

/// JSON values of every kind, the odd ones included.
fn any_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        prop_oneof![
            Just(0.0),
            Just(-1.0),
            Just(0.25),
            Just(4.0),
            Just(1e300),
            any::<f64>()
        ]
        .prop_map(|f| json!(f)),
        ".{0,40}".prop_map(Value::from),
        Just(json!([])),
        Just(json!({"nested": [1, "x"]})),
    ]
}

/// A speech request, valid or with one field replaced, removed or added.
fn speech_body() -> impl Strategy<Value = Vec<u8>> {
    let field = prop_oneof![
        Just("input"),
        Just("voice"),
        Just("model"),
        Just("response_format"),
        Just("speed"),
        Just("stream_format"),
        Just("instructions"),
        Just("seed"),
        Just("bogus"),
    ];
    let edit = prop_oneof![
        Just(None),
        (field.clone(), any_json()).prop_map(Some),
        (field, Just(Value::Null)).prop_map(|(f, _)| Some((f, Value::String("\u{0}".into())))),
    ];
    let format = prop_oneof![
        Just("pcm"),
        Just("wav"),
        Just("mp3"),
        Just("flac"),
        Just("opus"),
        Just("aac"),
        Just("ogg")
    ];
    let input = prop_oneof![
        Just("Hello there.".to_string()),
        Just(String::new()),
        Just("   ".to_string()),
        ".{1,60}",
        Just("x".repeat(20_000)),
    ];
    let raw_tail =
        prop_oneof![3 => Just(Vec::new()), 1 => proptest::collection::vec(any::<u8>(), 1..20)];
    (input, format, edit, any::<bool>(), raw_tail).prop_map(
        |(input, format, edit, drop_field, tail)| {
            let mut body = json!({"model": "tts-1", "input": input, "voice": "alloy",
                              "response_format": format});
            if let Some((f, v)) = edit {
                if drop_field {
                    body.as_object_mut().unwrap().remove(f);
                } else {
                    body[f] = v;
                }
            }
            let mut bytes = body.to_string().into_bytes();
            // Sometimes trailing garbage, which makes it invalid JSON.
            bytes.extend(tail);
            bytes
        },
    )
}

#[derive(Debug, Clone)]
struct Request {
    method: &'static str,
    path: String,
    content_type: Option<&'static str>,
    /// How the Content-Length header relates to the body.
    length: Length,
    body: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
enum Length {
    Exact,
    Missing,
    Short,
    Long,
    Junk,
}

fn request() -> impl Strategy<Value = Request> {
    let method = prop_oneof![
        Just("POST"),
        Just("POST"),
        Just("GET"),
        Just("PUT"),
        Just("DELETE"),
        Just("OPTIONS"),
        Just("FOO")
    ];
    let path = prop_oneof![
        Just("/v1/audio/speech".to_string()),
        Just("/v1/audio/speech".to_string()),
        Just("/v1/audio/voices".to_string()),
        Just("/v1/models".to_string()),
        Just("/v1/status".to_string()),
        Just("/dev/captioned_speech".to_string()),
        Just("/v1/audio/speech?x=%ff%00".to_string()),
        "/[a-z%0-9/.]{0,30}",
    ];
    let content_type = prop_oneof![
        Just(Some("application/json")),
        Just(None),
        Just(Some("text/plain")),
        Just(Some("application/json; charset=latin1")),
    ];
    let length = prop_oneof![
        Just(Length::Exact),
        Just(Length::Exact),
        Just(Length::Missing),
        Just(Length::Short),
        Just(Length::Long),
        Just(Length::Junk)
    ];
    let body = prop_oneof![
        3 => speech_body(),
        1 => proptest::collection::vec(any::<u8>(), 0..200),
    ];
    let anything = (method, path, content_type, length, body).prop_map(
        |(method, path, content_type, length, body)| Request {
            method,
            path,
            content_type,
            length,
            body,
        },
    );
    // Most cases are a well-formed request whose JSON body alone is mutated.
    let speech = speech_body().prop_map(|body| Request {
        method: "POST",
        path: "/v1/audio/speech".into(),
        content_type: Some("application/json"),
        length: Length::Exact,
        body,
    });
    prop_oneof![3 => speech, 2 => anything]
}

impl Request {
    fn bytes(&self) -> Vec<u8> {
        let mut head = format!("{} {} HTTP/1.1\r\nHost: x\r\n", self.method, self.path);
        if let Some(ct) = self.content_type {
            head += &format!("Content-Type: {ct}\r\n");
        }
        let n = self.body.len();
        match self.length {
            Length::Exact => head += &format!("Content-Length: {n}\r\n"),
            Length::Missing => {}
            Length::Short => head += &format!("Content-Length: {}\r\n", n / 2),
            Length::Long => head += &format!("Content-Length: {}\r\n", n + 100),
            Length::Junk => head += "Content-Length: twelve\r\n",
        }
        head += "Connection: close\r\n\r\n";
        let mut out = head.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// Sends `raw` and reads the answer to its end (the requests say `Connection: close`).
/// Returns the status code, the head and the body, or `None` when the server closed without
/// answering. A request that leaves the server waiting for more (a body shorter than its
/// Content-Length) gets its writing half closed after two quiet seconds, as a client that gives
/// up would.
fn exchange(addr: &str, raw: &[u8]) -> Option<(u16, String, Vec<u8>)> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    // The server may answer and close before it has read everything: a reset is an answer.
    let _ = s.write_all(raw);
    let mut all = Vec::new();
    let mut buf = [0u8; 8192];
    let mut closed_ours = false;
    let started = std::time::Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "no end to the answer"
                );
                if all.is_empty() && !closed_ours {
                    let _ = s.shutdown(Shutdown::Write);
                    closed_ours = true;
                }
            }
            Err(_) => break,
        }
    }
    let text_end = all.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&all[..text_end]).to_string();
    let code = head.split(' ').nth(1)?.parse().ok()?;
    Some((code, head, all[text_end + 4..].to_vec()))
}

fn status_ok(d: &Served) -> bool {
    d.connect().call(json!({"op": "status"}))["event"] == "status"
}

#[test]
fn http_requests_of_any_shape_are_answered_without_a_server_error() {
    let d = Served::start(
        "http = \"127.0.0.1:0\"\n[limits]\nmax_frames = 2\nmax_request_bytes = 16384\n",
        &[],
    );
    let addr = d.connect().call(json!({"op": "status"}))["http"]
        .as_str()
        .unwrap()
        .to_string();
    let (answered, audio, refused) = (Cell::new(0), Cell::new(0), Cell::new(0));
    // Garbage first: bytes that are not HTTP at all.
    TestRunner::new(config(64))
        .run(&proptest::collection::vec(any::<u8>(), 0..300), |raw| {
            if let Some((code, _, _)) = exchange(&addr, &raw) {
                prop_assert!(code < 500, "{code} for garbage");
            }
            Ok(())
        })
        .unwrap();
    TestRunner::new(config(128))
        .run(&request(), |req| {
            let got = exchange(&addr, &req.bytes());
            let Some((code, head, body)) = got else {
                // Only a request hyper cannot read at all may be closed without an answer.
                prop_assert!(
                    matches!(req.length, Length::Long | Length::Junk | Length::Short),
                    "{req:?}"
                );
                return Ok(());
            };
            answered.set(answered.get() + 1);
            prop_assert!(
                code < 500,
                "{code} for {req:?}: {}",
                String::from_utf8_lossy(&body)
            );
            let lower = head.to_ascii_lowercase();
            if code == 200 && req.path.starts_with("/v1/audio/speech") {
                prop_assert!(lower.contains("content-type: audio/"), "{head}");
                audio.set(audio.get() + 1);
            } else if code >= 400 && lower.contains("content-type: application/json") {
                let v: Value = serde_json::from_slice(&body)
                    .map_err(|e| TestCaseError::fail(format!("{e}: {head}")))?;
                prop_assert!(
                    v["error"]["message"]
                        .as_str()
                        .is_some_and(|m| !m.is_empty()),
                    "{v}"
                );
                refused.set(refused.get() + 1);
            }
            Ok(())
        })
        .unwrap();
    let (answered, audio, refused) = (answered.get(), audio.get(), refused.get());
    eprintln!(
        "http fuzz: {answered} answered, {audio} with audio, {refused} refused with a JSON error"
    );
    assert!(audio > 0 && refused > 0, "the cases reached both outcomes");
    assert!(status_ok(&d), "the daemon still answers");
    let after = common::http::post(
        &addr,
        r#"{"input": "Still here.", "voice": "alloy", "response_format": "pcm"}"#,
    );
    assert_eq!(after.status, 200);
}

/// One line of the module protocol, or a block with its data, or garbage.
fn sd_command() -> impl Strategy<Value = Vec<u8>> {
    let text = prop_oneof![
        Just("Hello there.".to_string()),
        Just("<speak><mark name=\"a\"/>One <mark name=\"b\"/>two.</speak>".to_string()),
        Just("<speak><mark name=\"only\"/></speak>".to_string()),
        Just("..leading dot".to_string()),
        Just("<speak>unclosed <mark".to_string()),
        "[^\n.]{0,40}",
    ];
    let setting = prop_oneof![
        Just("rate"),
        Just("pitch"),
        Just("volume"),
        Just("language"),
        Just("voice"),
        Just("synthesis_voice"),
        Just("punctuation_mode"),
        Just("spelling_mode"),
        Just("bogus"),
    ];
    let value = prop_oneof![
        Just("0".to_string()),
        Just("-100".to_string()),
        Just("100".to_string()),
        Just("fr".to_string()),
        Just("all".to_string()),
        Just("NULL".to_string()),
        "[^\n]{0,12}"
    ];
    prop_oneof![
        3 => text.prop_map(|t| format!("SPEAK\n{t}\n.\n").into_bytes()),
        1 => "[a-z_]{1,8}".prop_map(|k| format!("KEY\n{k}\n.\n").into_bytes()),
        1 => "[^\n.]{1,2}".prop_map(|c| format!("CHAR\n{c}\n.\n").into_bytes()),
        1 => Just(b"SOUND_ICON\nbell\n.\n".to_vec()),
        2 => proptest::collection::vec((setting, value), 0..4).prop_map(|kv| {
            let mut s = "SET\n".to_string();
            for (k, v) in kv {
                s += &format!("{k}={v}\n");
            }
            (s + ".\n").into_bytes()
        }),
        2 => Just(b"STOP\n".to_vec()),
        1 => Just(b"PAUSE\n".to_vec()),
        1 => Just(b"LIST VOICES\n".to_vec()),
        1 => Just(b"DEBUG ON /tmp\n".to_vec()),
        1 => Just(b"LOGLEVEL\nlog_level=5\n.\n".to_vec()),
        1 => Just(b"AUDIO\naudio_output_method=server\n.\n".to_vec()),
        // A garbage line: any bytes but the line end, invalid UTF-8 included.
        2 => proptest::collection::vec(any::<u8>().prop_filter("not a line end", |b| *b != b'\n'), 0..30)
            .prop_map(|mut l| { l.push(b'\n'); l }),
    ]
}

#[test]
fn the_module_protocol_in_any_order_is_answered_and_the_module_goes_on() {
    let d = Served::start("[limits]\nmax_frames = 2\n", &[]);
    let mut runner = TestRunner::new(config(24));
    let commands = Cell::new(0);
    runner
        .run(&proptest::collection::vec(sd_command(), 1..12), |cmds| {
            let mut m = Module::start(d.dir.path());
            m.init("");
            for c in &cmds {
                m.send_bytes(c);
                commands.set(commands.get() + 1);
            }
            // The module still takes commands: a voice list, then QUIT, answered in order.
            m.send("LIST VOICES\n");
            loop {
                match m.next() {
                    Msg::Line(l) if l == "200 OK VOICE LIST SENT" => break,
                    Msg::Line(l) => prop_assert!(
                        l.len() >= 4
                            && l.as_bytes()[..3].iter().all(u8::is_ascii_digit)
                            && matches!(l.as_bytes()[3], b' ' | b'-'),
                        "malformed reply {l:?} to {cmds:?}"
                    ),
                    Msg::Audio(_) => {}
                }
            }
            m.send("QUIT\n");
            let mut quit = false;
            while let Ok(msg) = m.try_next(Duration::from_secs(30)) {
                if msg == Msg::Line("210 OK QUIT".into()) {
                    quit = true;
                    break;
                }
            }
            prop_assert!(quit, "no QUIT reply after {cmds:?}");
            let status = m.child.wait().unwrap();
            prop_assert!(status.success(), "module exited {status}");
            Ok(())
        })
        .unwrap();
    eprintln!("sd-module fuzz: {} commands", commands.get());
    assert!(status_ok(&d), "the daemon still answers");
}
