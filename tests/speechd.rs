//! `voxtrald sd-module`, driven as speech-dispatcher drives an output module: the line
//! protocol on stdin/stdout, server-side audio in HDLC-escaped `705` blocks, index marks,
//! stop, and a daemon that is not there.

mod common;

use std::time::Duration;

use common::served::Served;
use common::speechd::{audio_bytes, lines, Module, Msg, WAIT};
use serde_json::json;

#[test]
fn module_protocol_speaks_through_the_daemon_with_marks_and_stops_at_once() {
    let d = Served::start("[limits]\nmax_frames = 6\n", &[]);
    let mut m = Module::start(d.dir.path());
    m.send("INIT\n");
    assert!(m.line().starts_with("299-voxtrald: 20 voices"));
    assert_eq!(m.line(), "299 OK LOADED SUCCESSFULLY");
    m.block(
        "AUDIO",
        "207 OK RECEIVING AUDIO SETTINGS",
        "audio_output_method=server\n.\n",
        "203 OK AUDIO INITIALIZED",
    );
    m.block(
        "SET",
        "203 OK RECEIVING SETTINGS",
        "rate=0\npitch=0\nlanguage=fr\nvoice=FEMALE1\nsynthesis_voice=NULL\n.\n",
        "203 OK SETTINGS RECEIVED",
    );
    m.block(
        "LOGLEVEL",
        "207 OK RECEIVING LOGLEVEL SETTINGS",
        "log_level=3\n.\n",
        "203 OK LOGLEVEL SET",
    );
    m.send("LIST VOICES\n");
    let voices = m.until("200 OK VOICE LIST SENT");
    assert_eq!(voices.len(), 21);
    assert!(voices.contains(&Msg::Line("200-fr_female\tfr\tnone".into())));
    m.send("NONSENSE\n");
    assert_eq!(m.line(), "300 ERR UNKNOWN COMMAND");

    // Orca's say-all: SSML with a mark before each word, a line starting with a dot.
    m.block(
        "SPEAK",
        "202 OK RECEIVING MESSAGE",
        "<speak><mark name=\"0:2\"/>Un <mark name=\"3:8\"/>deux.\n\
         ..et <mark name=\"10:15\"/>Trois &amp; quatre.</speak>\n.\n",
        "200 OK SPEAKING",
    );
    let said = m.until("702 END");
    assert_eq!(said[0], Msg::Line("701 BEGIN".into()));
    assert_eq!(lines(&said, "700-"), ["0:2", "3:8", "10:15"]);
    assert_eq!(
        lines(&said, "705 AUDIO").len(),
        said.iter().filter(|m| matches!(m, Msg::Audio(_))).count()
    );
    // Two sentences of 6 frames, 1920 samples each, 16-bit.
    assert_eq!(audio_bytes(&said), 2 * 6 * 1920 * 2);
    for n in lines(&said, "705-num_samples=") {
        assert!(n.parse::<usize>().unwrap() > 0);
    }
    assert!(lines(&said, "705-sample_rate=")
        .iter()
        .all(|r| r == "24000"));
    // The second sentence's mark comes after the first sentence's audio, before its own.
    let mark = said
        .iter()
        .position(|x| *x == Msg::Line("700-10:15".into()))
        .unwrap();
    let first_audio = said
        .iter()
        .position(|x| matches!(x, Msg::Audio(_)))
        .unwrap();
    let last_audio = said
        .iter()
        .rposition(|x| matches!(x, Msg::Audio(_)))
        .unwrap();
    assert!(
        first_audio < mark && mark < last_audio,
        "{mark} {first_audio} {last_audio}"
    );

    // A long message, stopped once its audio flows.
    let long: String = (0..100).map(|i| format!("Phrase {i}. ")).collect();
    m.block(
        "SPEAK",
        "202 OK RECEIVING MESSAGE",
        &format!("{long}\n.\n"),
        "200 OK SPEAKING",
    );
    assert_eq!(m.line(), "701 BEGIN");
    while !matches!(m.next(), Msg::Audio(_)) {}
    m.send("STOP\n");
    m.until("703 STOP");
    // After the stop event nothing more of that message: the next thing is the next reply.
    m.send("LIST VOICES\n");
    let after = m.until("200 OK VOICE LIST SENT");
    assert_eq!(after.len(), 21, "{:?}", &after[..after.len().min(5)]);
    // The daemon's job was cancelled, not left to run its 600 frames.
    let mut c = d.connect();
    let start = std::time::Instant::now();
    while c.call(json!({"op": "status"}))["queue"] != 0 {
        assert!(start.elapsed() < WAIT, "the stopped job still runs");
        std::thread::sleep(Duration::from_millis(20));
    }
    // CHAR and KEY are spoken; a sound icon just begins and ends.
    m.block(
        "CHAR",
        "202 OK RECEIVING MESSAGE",
        "a\n.\n",
        "200 OK SPEAKING",
    );
    let said = m.until("702 END");
    assert!(audio_bytes(&said) > 0);
    m.block(
        "SOUND_ICON",
        "202 OK RECEIVING MESSAGE",
        "bell\n.\n",
        "200 OK SPEAKING",
    );
    assert_eq!(m.until("702 END").len(), 2);
    m.send("QUIT\n");
    assert_eq!(m.line(), "210 OK QUIT");
    assert!(m.child.wait().unwrap().success());
}

#[test]
fn module_without_a_daemon_refuses_init_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = Module::start(dir.path());
    m.send("INIT\n");
    let why = m.line();
    assert!(
        why.starts_with("399-no voxtrald daemon") && why.contains("voxtrald serve"),
        "{why}"
    );
    assert_eq!(m.line(), "399 ERR CANT INIT MODULE");
    assert!(!m.child.wait().unwrap().success());
}

#[test]
fn a_long_message_read_at_playback_pace_is_spoken_to_the_end() {
    // speech-dispatcher takes a module's audio as it plays it; the model here runs far faster.
    // 200 sentences of 2 frames: 32 s of audio, read in real time.
    let d = Served::start(
        "[limits]\nmax_frames = 2\nclient_buffer = 8\nstall_timeout = 2\n",
        &[],
    );
    let mut m = Module::start_paced(d.dir.path(), Some(24000));
    m.init("language=en\n");
    let text: String = (0..200).map(|i| format!("Sentence {i}. ")).collect();
    let start = std::time::Instant::now();
    let said = m.speak(&text);
    assert!(
        !said
            .iter()
            .any(|x| matches!(x, Msg::Line(l) if l.starts_with("703"))),
        "stopped"
    );
    assert_eq!(audio_bytes(&said), 200 * 2 * 1920 * 2, "all of it");
    // It really was read at playback pace, far slower than it was generated.
    assert!(
        start.elapsed() >= Duration::from_secs(31),
        "{:?}",
        start.elapsed()
    );
}
