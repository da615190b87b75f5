//! The Wyoming server, driven by the `wyoming` Python package (pinned in
//! `tests/clients/requirements.txt`) as Home Assistant drives it: `info`, a synthesis, a
//! synthesis by language, streamed text spoken sentence by sentence, and errors that leave the
//! connection serving. Over TCP and over a Unix socket.

mod common;

use common::python::run_client;
use common::served::Served;
use serde_json::{json, Value};

/// Bytes of 16-bit audio for `sentences` sentences of `frames` frames.
fn bytes(sentences: u64, frames: u64) -> u64 {
    sentences * frames * 1920 * 2
}

fn check(out: &Value, frames: u64) {
    let info = &out["info"];
    assert_eq!(info["programs"], 1, "{info}");
    assert_eq!(info["installed"], true);
    assert_eq!(info["streaming"], true);
    assert_eq!(info["voices"].as_array().unwrap().len(), 20, "{info}");
    assert_eq!(info["described"], true);
    assert!(info["languages"].as_array().unwrap().contains(&json!("fr")));
    let one = &out["synthesize"];
    assert_eq!(one.as_array().unwrap().len(), 1, "{one}");
    assert_eq!(one[0]["rate"], 24000);
    assert_eq!(
        (one[0]["width"].as_u64(), one[0]["channels"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(one[0]["bytes"].as_u64(), Some(bytes(1, frames)));
    assert_eq!(
        out["by_language"][0]["bytes"].as_u64(),
        Some(bytes(1, frames))
    );
    // "Hello there." / "How are you today?" / "Fine." as each was complete, then "Bye" at the
    // stop; the compatibility `synthesize` was not spoken again.
    let streamed = out["streamed"].as_array().unwrap();
    assert_eq!(streamed.len(), 4, "{}", out["streamed_events"]);
    for s in streamed {
        assert_eq!(s["bytes"].as_u64(), Some(bytes(1, frames)), "{s}");
    }
    let events: Vec<&str> = out["streamed_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(events.last(), Some(&"synthesize-stopped"));
    assert_eq!(events.iter().filter(|e| **e == "audio-stop").count(), 4);
    let bad = out["bad_voice"].as_array().unwrap();
    assert!(
        bad.last()
            .unwrap()
            .as_str()
            .unwrap()
            .contains("unknown voice"),
        "{bad:?}"
    );
    let blank = out["blank"].as_array().unwrap();
    assert!(
        blank.last().unwrap().as_str().unwrap().contains("empty"),
        "{blank:?}"
    );
    assert_eq!(out["after"].as_array().unwrap().last().unwrap(), "pong");
}

#[test]
fn home_assistants_client_gets_info_speech_and_streamed_speech() {
    let d = Served::start("wyoming = \"127.0.0.1:0\"\n[limits]\nmax_frames = 4\n", &[]);
    let status = d.connect().call(json!({"op": "status"}));
    let addr = status["wyoming"]
        .as_str()
        .expect("wyoming address in status");
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    check(
        &run_client("wyoming_client.py", &[&format!("tcp://{addr}")]),
        4,
    );
    // The daemon still serves its other clients.
    assert_eq!(d.connect().call(json!({"op": "status"}))["queue"], 0);
}

#[test]
fn the_wyoming_server_listens_on_a_private_unix_socket_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wyoming/voxtrald.sock");
    let d = Served::start(
        &format!(
            "wyoming = \"unix://{}\"\n[limits]\nmax_frames = 3\n",
            path.display()
        ),
        &[],
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    check(
        &run_client(
            "wyoming_client.py",
            &[&format!("unix://{}", path.display())],
        ),
        3,
    );
    drop(d);
}

#[test]
fn without_an_address_there_is_no_wyoming_server() {
    let d = Served::start("[limits]\nmax_frames = 3\n", &[]);
    assert!(d.connect().call(json!({"op": "status"}))["wyoming"].is_null());
}
