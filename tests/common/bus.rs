//! A private `dbus-daemon` for the D-Bus tests, and a Spiel client written from the
//! interface XML: `Synthesize` with a fresh pipe, and the `audio/x-spiel` stream parsed.
#![allow(dead_code)]

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NAME: &str = "org.voxtrald.Speech.Provider";
pub const PATH: &str = "/org/voxtrald/Speech/Provider";
pub const IFACE: &str = "org.freedesktop.Speech.Provider";

pub struct Bus {
    child: Child,
    pub address: String,
}

impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn private_bus(dir: &std::path::Path) -> Bus {
    let mut child = Command::new("dbus-daemon")
        .args([
            "--session",
            "--nofork",
            "--print-address=1",
            &format!("--address=unix:dir={}", dir.display()),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("dbus-daemon (Debian package dbus-daemon) must be installed");
    let mut out = child.stdout.take().unwrap();
    let mut address = Vec::new();
    let mut b = [0u8; 1];
    while out.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        address.push(b[0]);
    }
    Bus {
        child,
        address: String::from_utf8(address).unwrap(),
    }
}

/// Calls Synthesize with a fresh pipe and returns the read end.
pub async fn synthesize(p: &zbus::Proxy<'_>, text: &str, voice: &str) -> std::io::PipeReader {
    synthesize_pitched(p, text, voice, 1.0).await
}

pub async fn synthesize_pitched(
    p: &zbus::Proxy<'_>,
    text: &str,
    voice: &str,
    pitch: f64,
) -> std::io::PipeReader {
    synthesize_with(p, text, voice, pitch, 1.0).await
}

/// Calls Synthesize with these Spiel pitch and rate multipliers.
pub async fn synthesize_with(
    p: &zbus::Proxy<'_>,
    text: &str,
    voice: &str,
    pitch: f64,
    rate: f64,
) -> std::io::PipeReader {
    synthesize_full(p, text, voice, pitch, rate, false).await
}

/// Calls Synthesize with everything spelled out.
pub async fn synthesize_full(
    p: &zbus::Proxy<'_>,
    text: &str,
    voice: &str,
    pitch: f64,
    rate: f64,
    is_ssml: bool,
) -> std::io::PipeReader {
    let (reader, writer) = std::io::pipe().unwrap();
    let () = p
        .call(
            "Synthesize",
            &(
                zbus::Fd::from(&writer),
                text,
                voice,
                pitch,
                rate,
                is_ssml,
                "",
            ),
        )
        .await
        .unwrap();
    drop(writer);
    reader
}

#[derive(Debug, PartialEq)]
pub enum Chunk {
    Audio(usize),
    Word(u32, u32),
    Sentence(u32, u32),
    Mark(String),
}

/// Parses an `audio/x-spiel` stream to its end.
pub fn parse_stream(r: impl Read) -> Vec<Chunk> {
    parse_stream_audio(r).0
}

/// [`parse_stream`], with the audio bytes.
pub fn parse_stream_audio(mut r: impl Read) -> (Vec<Chunk>, Vec<u8>) {
    let mut all = Vec::new();
    r.read_to_end(&mut all).unwrap();
    assert_eq!(&all[..4], b"0.01", "stream header");
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap());
    let mut out = Vec::new();
    let mut audio = Vec::new();
    let mut i = 4;
    while i < all.len() {
        match all[i] {
            1 => {
                let n = u32_at(&all, i + 1) as usize;
                out.push(Chunk::Audio(n));
                audio.extend_from_slice(&all[i + 5..i + 5 + n]);
                i += 5 + n;
            }
            2 => {
                let (s, e, m) = (
                    u32_at(&all, i + 2),
                    u32_at(&all, i + 6),
                    u32_at(&all, i + 10) as usize,
                );
                let name = String::from_utf8(all[i + 14..i + 14 + m].to_vec()).unwrap();
                out.push(match all[i + 1] {
                    1 => Chunk::Word(s, e),
                    2 => Chunk::Sentence(s, e),
                    4 => Chunk::Mark(name),
                    other => panic!("event type {other} is not advertised"),
                });
                i += 14 + m;
            }
            t => panic!("bad chunk type {t} at {i}"),
        }
    }
    assert_eq!(i, all.len(), "truncated chunk");
    (out, audio)
}

/// A session connection to `bus`, once the daemon owns its name there.
pub async fn connect_when_served(bus: &Bus) -> zbus::Connection {
    let conn = zbus::connection::Builder::address(bus.address.as_str())
        .build()
        .await
        .unwrap();
    let dbus = zbus::fdo::DBusProxy::new(&conn).await.unwrap();
    let start = Instant::now();
    while !dbus.name_has_owner(NAME.try_into().unwrap()).await.unwrap() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "bus name never appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    conn
}

pub async fn provider(conn: &zbus::Connection) -> zbus::Proxy<'static> {
    zbus::Proxy::new(conn, NAME, PATH, IFACE).await.unwrap()
}
