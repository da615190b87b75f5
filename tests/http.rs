//! The OpenAI-style speech API: streamed WAV and PCM, voices and models, and bad requests
//! answered with JSON errors while the daemon keeps serving.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use common::http::{get, post, post_to, read_response, request};
use common::served::Served;
use serde_json::json;

#[test]
fn speech_api_streams_wav_and_pcm_and_refuses_bad_requests() {
    let d = Served::start(
        "http = \"127.0.0.1:0\"\n[limits]\nmax_frames = 6\nmax_request_bytes = 16384\n",
        &[],
    );
    let status = d.connect().call(json!({"op": "status"}));
    let addr = status["http"]
        .as_str()
        .expect("http address in status")
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");

    let voices = get(&addr, "/v1/audio/voices");
    assert_eq!(voices.status, 200);
    assert_eq!(voices.json()["voices"].as_array().unwrap().len(), 20);
    assert_eq!(
        voices.json()["voices"][0]["id"],
        voices.json()["voices"][0]["name"]
    );
    assert_eq!(
        get(&addr, "/v1/models").json()["data"][0]["id"],
        "voxtral-4b-tts"
    );

    // Two sentences of 6 frames: 2 * 6 * 1920 samples of 16 bits.
    let want = 2 * 6 * 1920 * 2;
    let pcm = post(
        &addr,
        r#"{"model": "tts-1", "input": "One here. Two there.", "voice": "fr_female", "response_format": "pcm"}"#,
    );
    assert_eq!(pcm.status, 200);
    assert_eq!(pcm.header("content-type"), Some("audio/pcm"));
    assert!(pcm.complete);
    assert_eq!(pcm.body.len(), want);
    // WAV, an OpenAI voice name, a voice object, speed.
    let wav = post(
        &addr,
        r#"{"input": "One here. Two there.", "voice": "alloy", "response_format": "wav"}"#,
    );
    assert_eq!(wav.status, 200);
    assert_eq!(wav.header("content-type"), Some("audio/wav"));
    assert_eq!(&wav.body[..4], b"RIFF");
    assert_eq!(&wav.body[8..16], b"WAVEfmt ");
    assert_eq!(
        u32::from_le_bytes(wav.body[24..28].try_into().unwrap()),
        24000
    );
    assert_eq!(wav.body.len(), 44 + want);
    let fast = post(
        &addr,
        r#"{"input": "One here. Two there.", "voice": {"id": "casual_male"}, "speed": 2.0, "response_format": "pcm"}"#,
    );
    assert_eq!(fast.status, 200);
    assert_eq!(fast.body.len(), want / 2);

    let bad: [(&str, u16, &str); 8] = [
        (r#"{"voice": "alloy"}"#, 400, "input"),
        (
            r#"{"input": "hi", "voice": "nobody"}"#,
            400,
            "unknown voice",
        ),
        (
            r#"{"input": "hi", "response_format": "aac"}"#,
            400,
            "\"mp3\"",
        ),
        (
            r#"{"input": "hi", "response_format": "ogg"}"#,
            400,
            "'response_format'",
        ),
        (r#"{"input": "   "}"#, 400, "empty"),
        (r#"{"input": "hi", "speed": 9}"#, 400, "'speed'"),
        (r#"{"input": "hi", "speed": 0.2}"#, 400, "minimum of 0.25"),
        ("{not json", 400, "bad request body"),
    ];
    for (body, status, says) in bad {
        let r = post(&addr, body);
        assert_eq!(r.status, status, "{body}");
        let msg = r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_lowercase();
        assert!(msg.contains(says), "{body}: {msg}");
    }
    let big = format!(r#"{{"input": "{}"}}"#, "a".repeat(20000));
    assert_eq!(post(&addr, &big).status, 413);
    assert_eq!(get(&addr, "/v1/nothing").status, 404);
    assert_eq!(get(&addr, "/v1/audio/speech").status, 405);
    assert_eq!(request(&addr, b"garbage\r\n\r\n").status, 400);

    // A client that leaves mid-stream cancels its job; the daemon goes on serving.
    // 1000 sentences of 6 frames take over a minute here.
    let long = "Go on. ".repeat(1000);
    let body = json!({"input": long, "response_format": "pcm"}).to_string();
    {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(
            format!(
                "POST /v1/audio/speech HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        let mut first = [0u8; 256];
        let _ = s.read(&mut first).unwrap();
    }
    let mut c = d.connect();
    let start = std::time::Instant::now();
    while c.call(json!({"op": "status"}))["queue"] != 0 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "the abandoned job still runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        post(
            &addr,
            r#"{"input": "Still here.", "response_format": "pcm"}"#
        )
        .status,
        200
    );
}

#[test]
fn two_requests_on_one_keep_alive_connection() {
    let d = Served::start("http = \"127.0.0.1:0\"\n[limits]\nmax_frames = 3\n", &[]);
    let addr = d.connect().call(json!({"op": "status"}))["http"]
        .as_str()
        .unwrap()
        .to_string();
    let s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    let body = r#"{"input": "Hello.", "response_format": "pcm"}"#;
    for _ in 0..2 {
        write!(
            w,
            "POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let res = read_response(&mut r);
        assert_eq!(res.status, 200);
        assert!(res.complete);
        assert_eq!(res.body.len(), 3 * 1920 * 2);
    }
    write!(w, "GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let models = read_response(&mut r);
    assert_eq!(models.json()["data"][0]["id"], "voxtral-4b-tts");
}

#[test]
fn no_address_no_listener() {
    let d = Served::start("[limits]\nmax_frames = 6\n", &[]);
    let status = d.connect().call(json!({"op": "status"}));
    assert!(status["http"].is_null());
}

#[test]
fn captioned_speech_gives_word_timestamps_with_the_audio() {
    let d = Served::start("http = \"127.0.0.1:0\"\n[limits]\nmax_frames = 6\n", &[]);
    let addr = d.connect().call(json!({"op": "status"}))["http"]
        .as_str()
        .unwrap()
        .to_string();
    let body = r#"{"model": "kokoro", "input": "One two three. Four five.", "voice": "alloy", "response_format": "pcm"}"#;
    let one = post_to(&addr, "/dev/captioned_speech", body);
    assert_eq!(one.status, 200);
    assert_eq!(one.header("content-type"), Some("application/json"));
    let v = one.json();
    use base64::Engine as _;
    let audio = base64::engine::general_purpose::STANDARD
        .decode(v["audio"].as_str().unwrap())
        .unwrap();
    assert_eq!(audio.len(), 2 * 6 * 1920 * 2, "all the audio");
    let words: Vec<&str> = v["timestamps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["word"].as_str().unwrap())
        .collect();
    assert_eq!(words, ["One", "two", "three.", "Four", "five."]);
    let times: Vec<(f64, f64)> = v["timestamps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["start_time"].as_f64().unwrap(),
                t["end_time"].as_f64().unwrap(),
            )
        })
        .collect();
    let seconds = audio.len() as f64 / 2.0 / 24000.0;
    for w in times.windows(2) {
        assert!(w[0].0 <= w[0].1 && w[0].1 <= w[1].0 + 1e-9, "{times:?}");
    }
    assert_eq!(times[0].0, 0.0);
    assert!(
        (times[3].0 - 0.48).abs() < 1e-6,
        "the second sentence starts at 6 frames: {times:?}"
    );
    assert!(times[4].1 <= seconds + 1e-9);

    // Streamed: one JSON line per piece; together the same audio and words.
    let body = body.replace('}', r#", "stream": true}"#);
    let lines = post_to(&addr, "/dev/captioned_speech", &body);
    assert_eq!(lines.header("content-type"), Some("application/x-ndjson"));
    let text = String::from_utf8(lines.body.clone()).unwrap();
    let pieces: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(pieces.len() > 2, "{} pieces", pieces.len());
    let mut streamed = Vec::new();
    let mut n_words = 0;
    for p in &pieces {
        streamed.extend(
            base64::engine::general_purpose::STANDARD
                .decode(p["audio"].as_str().unwrap())
                .unwrap(),
        );
        n_words += p["timestamps"].as_array().unwrap().len();
    }
    assert_eq!(streamed, audio);
    assert_eq!(n_words, 5);
}
