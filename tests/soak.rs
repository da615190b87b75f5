//! The soak: well over a hundred clients at once on the socket, the Spiel D-Bus interface and
//! the speech API, for a bounded time (`VOXTRALD_SOAK_SECS`, 20 by default; the clients by
//! `VOXTRALD_SOAK_CLIENTS`, 120). They mix texts of one to four sentences, cancel at random
//! frames, vanish mid-stream, read slowly, fire stop-all storms and pause/resume. Afterwards
//! the daemon answers, its queue is empty, its RSS is back within a bound of where it started,
//! no file descriptor is left open, and every job that was not cancelled delivered all of its
//! audio, sample for sample.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::bus::{connect_when_served, parse_stream_audio, private_bus, provider, synthesize};
use common::served::Served;
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::{json, Value};

/// One, two and four sentences; each sentence is `MAX_FRAMES` frames on the tiny model.
const TEXTS: [&str; 3] = [
    "Hi there.",
    "One here. Two there.",
    "First it goes. Then it follows. The third ends. And a fourth one.",
];
const MAX_FRAMES: usize = 4;
const VOICE: &str = "casual_male";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the clients did and what went wrong, shared by all of them.
#[derive(Default)]
struct Tally {
    requests: AtomicUsize,
    complete: AtomicUsize,
    cancels: AtomicUsize,
    stopped: AtomicUsize,
    vanished: AtomicUsize,
    slow: AtomicUsize,
    storms: AtomicUsize,
    pauses: AtomicUsize,
    /// Even when no stop is in flight; a job that saw it change may have been stopped.
    stop_epoch: AtomicU64,
    problems: Mutex<Vec<String>>,
}

impl Tally {
    fn problem(&self, what: String) {
        eprintln!("soak problem: {what}");
        self.problems.lock().unwrap().push(what);
    }
    fn epoch(&self) -> u64 {
        self.stop_epoch.load(Ordering::SeqCst)
    }
    /// Whether a job that began at epoch `start` can have been caught by a stop.
    fn stopped_since(&self, start: u64) -> bool {
        start % 2 == 1 || self.epoch() != start
    }
    fn count(c: &AtomicUsize) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// Samples each text makes alone (found before the soak).
type Expected = [usize; 3];

fn socket(d: &Served) -> (BufReader<UnixStream>, UnixStream) {
    let s = UnixStream::connect(d.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    (BufReader::new(s.try_clone().unwrap()), s)
}

fn recv(r: &mut BufReader<UnixStream>) -> Option<Value> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(n) if n > 0 => serde_json::from_str(&line).ok(),
        _ => None,
    }
}

fn speak(text: &str, output: &str, seed: u64) -> String {
    format!(
        "{}\n",
        json!({"op": "speak", "text": text, "voice": VOICE, "output": output, "seed": seed})
    )
}

/// A socket client streaming events. `cancel_after`: send a cancel after that many audio
/// events; `vanish_after`: hang up after that many.
fn socket_stream(
    d: &Served,
    t: &Tally,
    want: &Expected,
    which: usize,
    cancel_after: Option<usize>,
    vanish_after: Option<usize>,
) {
    let (mut r, mut w) = socket(d);
    Tally::count(&t.requests);
    w.write_all(speak(TEXTS[which], "stream", 1).as_bytes())
        .unwrap();
    let mut job = None;
    let (mut samples, mut bytes, mut audio_events) = (0usize, 0usize, 0usize);
    loop {
        let Some(m) = recv(&mut r) else {
            t.problem(format!(
                "socket: connection ended without a terminal event (job {job:?})"
            ));
            return;
        };
        match m["event"].as_str().unwrap_or("") {
            "accepted" => job = m["job"].as_u64(),
            "audio" => {
                samples += m["samples"].as_u64().unwrap() as usize;
                bytes += base64::engine::general_purpose::STANDARD
                    .decode(m["pcm"].as_str().unwrap())
                    .unwrap()
                    .len();
                audio_events += 1;
                if Some(audio_events) == vanish_after {
                    Tally::count(&t.vanished);
                    return; // both halves drop here
                }
                if Some(audio_events) == cancel_after {
                    Tally::count(&t.cancels);
                    w.write_all(format!("{}\n", json!({"op": "cancel", "job": job})).as_bytes())
                        .unwrap();
                }
            }
            "finished" => {
                let frames = m["frames"].as_u64().unwrap() as usize;
                if samples != want[which] || bytes != 2 * samples || frames * 1920 != samples {
                    t.problem(format!(
                        "socket job {job:?} finished with {samples} samples ({bytes} bytes, \
                         {frames} frames), alone it makes {}",
                        want[which]
                    ));
                } else {
                    Tally::count(&t.complete);
                }
                return;
            }
            "cancelled" => {
                let reason = m["reason"].as_str().unwrap_or("");
                let by_stop = reason.contains("stopped by");
                if by_stop {
                    Tally::count(&t.stopped);
                } else if cancel_after.is_none() {
                    t.problem(format!("socket job {job:?} cancelled: {reason}"));
                }
                return;
            }
            "failed" | "error" => {
                t.problem(format!("socket job {job:?}: {m}"));
                return;
            }
            _ => {} // started, sentence, word, the cancel's `ok`
        }
    }
}

/// A socket client taking bare PCM and reading it slowly: 1920 bytes every 10 ms, four times
/// real time, so that its job waits on it.
fn socket_raw_slow(d: &Served, t: &Tally, want: &Expected, which: usize) {
    let (mut r, mut w) = socket(d);
    let epoch = t.epoch();
    Tally::count(&t.requests);
    Tally::count(&t.slow);
    w.write_all(speak(TEXTS[which], "raw", 1).as_bytes())
        .unwrap();
    match recv(&mut r) {
        Some(m) if m["event"] == "accepted" => {}
        other => {
            t.problem(format!("raw: no acceptance: {other:?}"));
            return;
        }
    }
    let mut got = 0usize;
    let mut buf = vec![0u8; 1920];
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => {
                t.problem(format!("raw: read failed after {got} bytes: {e}"));
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    if got == 2 * want[which] {
        Tally::count(&t.complete);
    } else if !t.stopped_since(epoch) {
        t.problem(format!(
            "raw: {got} bytes, alone the text makes {}",
            2 * want[which]
        ));
    }
}

/// A speech API client: the whole PCM body, or hanging up after the headers.
fn http_client(addr: &str, t: &Tally, want: &Expected, which: usize, vanish: bool) {
    let epoch = t.epoch();
    Tally::count(&t.requests);
    let body = json!({"model": "tts-1", "input": TEXTS[which], "voice": VOICE,
                      "response_format": "pcm", "seed": 1})
    .to_string();
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    if vanish {
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        Tally::count(&t.vanished);
        return;
    }
    if r.fill_buf().map_or(true, |b| b.is_empty()) {
        t.problem(format!(
            "http: the connection closed without an answer ({})",
            TEXTS[which]
        ));
        return;
    }
    let res = common::http::read_response(&mut r);
    if res.status == 503 && t.stopped_since(epoch) {
        Tally::count(&t.stopped); // stopped before its first audio: a clear refusal
    } else if res.status != 200 {
        t.problem(format!(
            "http: status {} {}",
            res.status,
            String::from_utf8_lossy(&res.body)
        ));
    } else if res.body.len() == 2 * want[which] {
        Tally::count(&t.complete);
    } else if t.stopped_since(epoch) {
        Tally::count(&t.stopped);
    } else {
        t.problem(format!(
            "http: {} bytes, alone the text makes {}",
            res.body.len(),
            2 * want[which]
        ));
    }
}

/// A Spiel client: `Synthesize` on its own bus connection, the stream read to its end or
/// dropped after the first read.
async fn spiel_client(
    bus: &common::bus::Bus,
    t: &Tally,
    want: &Expected,
    which: usize,
    vanish: bool,
) {
    let conn = connect_when_served(bus).await;
    let p = provider(&conn).await;
    let epoch = t.epoch();
    Tally::count(&t.requests);
    let mut reader = synthesize(&p, TEXTS[which], VOICE).await;
    let want = want[which];
    let res = tokio::task::spawn_blocking(move || {
        if vanish {
            let mut b = [0u8; 64];
            let _ = reader.read(&mut b);
            return None;
        }
        Some(parse_stream_audio(reader).1.len())
    })
    .await
    .unwrap();
    match res {
        None => Tally::count(&t.vanished),
        Some(n) if n == 2 * want => Tally::count(&t.complete),
        Some(_) if t.stopped_since(epoch) => Tally::count(&t.stopped),
        Some(n) => t.problem(format!(
            "spiel: {n} bytes, alone the text makes {}",
            2 * want
        )),
    }
}

/// One stop-all storm: `n` connections send `stop` at once.
fn storm(d: &Served, t: &Tally, n: usize) {
    t.stop_epoch.fetch_add(1, Ordering::SeqCst);
    Tally::count(&t.storms);
    std::thread::scope(|s| {
        for _ in 0..n {
            s.spawn(|| {
                let (mut r, mut w) = socket(d);
                w.write_all(b"{\"op\": \"stop\"}\n").unwrap();
                let m = recv(&mut r);
                if m.as_ref().map(|m| m["event"] != "ok").unwrap_or(true) {
                    t.problem(format!("stop: {m:?}"));
                }
            });
        }
    });
    t.stop_epoch.fetch_add(1, Ordering::SeqCst);
}

fn call(d: &Served, msg: Value) -> Value {
    let (mut r, mut w) = socket(d);
    w.write_all(format!("{msg}\n").as_bytes()).unwrap();
    recv(&mut r).expect("a reply")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what} within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_hundred_clients_with_faults_leave_the_daemon_as_it_was() {
    let secs = env_or("VOXTRALD_SOAK_SECS", 20);
    let clients = env_or("VOXTRALD_SOAK_CLIENTS", 120) as usize;
    let busdir = tempfile::tempdir().unwrap();
    let bus = private_bus(busdir.path());
    let d = Served::start(
        &format!(
            "http = \"127.0.0.1:0\"\n[limits]\nmax_frames = {MAX_FRAMES}\nmax_clients = 512\n"
        ),
        &[("DBUS_SESSION_BUS_ADDRESS", &bus.address)],
    );
    let addr = call(&d, json!({"op": "status"}))["http"]
        .as_str()
        .unwrap()
        .to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Each text alone, and a first round on every interface to warm the daemon up.
    let warm = Tally::default();
    let mut want: Expected = [0; 3];
    for (i, text) in TEXTS.iter().enumerate() {
        let (mut r, mut w) = socket(&d);
        w.write_all(speak(text, "stream", 1).as_bytes()).unwrap();
        while let Some(m) = recv(&mut r) {
            match m["event"].as_str().unwrap() {
                "audio" => want[i] += m["samples"].as_u64().unwrap() as usize,
                "finished" => break,
                "failed" | "cancelled" | "error" => panic!("{m}"),
                _ => {}
            }
        }
        assert!(want[i] > 0);
    }
    assert!(want[0] < want[1] && want[1] < want[2], "{want:?}");
    std::thread::scope(|s| {
        for i in 0..12 {
            let (d, warm, want, addr) = (&d, &warm, &want, &addr);
            s.spawn(move || match i % 3 {
                0 => socket_stream(d, warm, want, i % 3, None, None),
                1 => http_client(addr, warm, want, 2, false),
                _ => socket_raw_slow(d, warm, want, 1),
            });
        }
    });
    rt.block_on(async {
        let (warm, want, bus) = (&warm, &want, &bus);
        futures_util::future::join_all((0..4).map(|i| spiel_client(bus, warm, want, i % 3, false)))
            .await;
    });
    assert!(warm.problems.lock().unwrap().is_empty(), "warm-up failed");
    wait_for("the warm-up queue to drain", 30, || {
        call(&d, json!({"op": "status"}))["queue"] == 0
    });
    std::thread::sleep(Duration::from_millis(500));
    let pid = d.pid();
    let (rss0, fds0) = (rss_kib(pid), fds(pid));

    // The soak.
    let t = Tally::default();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);
    std::thread::scope(|s| {
        for i in 0..clients {
            let (d, t, want, addr, bus, rt) = (&d, &t, &want, &addr, &bus, &rt);
            s.spawn(move || {
                let mut rng = StdRng::seed_from_u64(i as u64);
                while Instant::now() < deadline {
                    let which = rng.random_range(0..3);
                    let roll: f64 = rng.random();
                    match i % 6 {
                        0 | 1 => {
                            let (cancel, vanish) = if roll < 0.25 {
                                (Some(rng.random_range(1..6)), None)
                            } else if roll < 0.4 {
                                (None, Some(rng.random_range(1..4)))
                            } else {
                                (None, None)
                            };
                            socket_stream(d, t, want, which, cancel, vanish)
                        }
                        2 => socket_raw_slow(d, t, want, which),
                        3 | 4 => http_client(addr, t, want, which, roll < 0.2),
                        _ => rt.block_on(spiel_client(bus, t, want, which, roll < 0.2)),
                    }
                }
            });
        }
        // Stop-all storms every few seconds, and the speaker paused and resumed meanwhile.
        let (d, t) = (&d, &t);
        s.spawn(move || {
            let mut next = start + Duration::from_secs(3);
            while next < deadline {
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                storm(d, t, 8);
                next += Duration::from_secs(5);
            }
        });
        s.spawn(move || {
            while Instant::now() < deadline {
                for (op, paused) in [("pause", true), ("resume", false)] {
                    let m = call(d, json!({"op": op}));
                    if m["event"] != "ok" {
                        t.problem(format!("{op}: {m}"));
                    }
                    if call(d, json!({"op": "status"}))["paused"] != paused {
                        t.problem(format!("{op} did not show in status"));
                    }
                    Tally::count(&t.pauses);
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        });
    });
    let took = start.elapsed();

    // Afterwards: it answers, the queue drains, memory and descriptors come back.
    wait_for("the queue to drain", 60, || {
        call(&d, json!({"op": "status"}))["queue"] == 0
    });
    let (mut r, mut w) = socket(&d);
    w.write_all(speak(TEXTS[1], "stream", 1).as_bytes())
        .unwrap();
    let mut samples = 0;
    while let Some(m) = recv(&mut r) {
        match m["event"].as_str().unwrap() {
            "audio" => samples += m["samples"].as_u64().unwrap() as usize,
            "finished" => break,
            "failed" | "cancelled" | "error" => panic!("after the soak: {m}"),
            _ => {}
        }
    }
    drop((r, w));
    assert_eq!(samples, want[1], "a job after the soak");
    let mut fds1 = fds(pid);
    let settle = Instant::now();
    while fds1 > fds0 && settle.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        fds1 = fds(pid);
    }
    let rss1 = rss_kib(pid);
    let n = |c: &AtomicUsize| c.load(Ordering::Relaxed);
    eprintln!(
        "soak: {clients} clients for {:.1} s: {} requests, {} complete and checked, {} cancels \
         sent, {} stopped by {} storms, {} vanished, {} slow readers, {} pause/resume; RSS \
         {rss0} KiB before, {rss1} KiB after; {fds0} fds before, {fds1} after",
        took.as_secs_f64(),
        n(&t.requests),
        n(&t.complete),
        n(&t.cancels),
        n(&t.stopped),
        n(&t.storms),
        n(&t.vanished),
        n(&t.slow),
        n(&t.pauses),
    );
    let problems = t.problems.lock().unwrap();
    assert!(
        problems.is_empty(),
        "{} problems: {:#?}",
        problems.len(),
        &problems[..problems.len().min(20)]
    );
    assert!(n(&t.requests) >= clients, "every client made a request");
    assert!(n(&t.complete) > clients / 2, "most requests completed");
    assert!(n(&t.storms) >= 1 && n(&t.vanished) > 0 && n(&t.cancels) > 0);
    assert!(
        fds1 <= fds0,
        "file descriptors leaked: {fds0} before, {fds1} after"
    );
    assert!(
        rss1 <= rss0 + rss0 / 2 + 32 * 1024,
        "RSS grew from {rss0} KiB to {rss1} KiB"
    );
}
