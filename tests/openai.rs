//! The speech API with the official `openai` Python client (pinned in
//! `tests/clients/requirements.txt`): every format, with and without `response_format`,
//! streamed and as server-sent events, decoded here by independent decoders; errors in the
//! API's words.

mod common;

use common::python::run_client;
use common::served::Served;
use serde_json::json;

/// Two sentences of 4 frames.
const SAMPLES: usize = 2 * 4 * 1920;

fn mp3_samples(bytes: &[u8]) -> usize {
    assert_eq!(bytes[0], 0xff, "MP3 frame sync");
    rusty_mp3::decode_pipelined(bytes)
        .iter()
        .map(|f| f.samples.len() / f.channels.max(1) as usize)
        .sum()
}

fn flac_samples(bytes: &[u8]) -> usize {
    let mut r = claxon::FlacReader::new(std::io::Cursor::new(bytes)).expect("a FLAC stream");
    assert_eq!(r.streaminfo().sample_rate, 24000);
    assert_eq!(r.streaminfo().channels, 1);
    let mut n = 0;
    for s in r.samples() {
        s.expect("a decodable sample");
        n += 1;
    }
    n
}

/// Decoded samples of an Ogg Opus stream, and its length by the last granule position.
fn opus_samples(bytes: &[u8]) -> (usize, usize) {
    let mut r = ogg::reading::PacketReader::new(std::io::Cursor::new(bytes));
    let head = r.read_packet_expected().expect("OpusHead");
    assert_eq!(&head.data[..8], b"OpusHead");
    let pre_skip = u16::from_le_bytes([head.data[10], head.data[11]]) as u64;
    let tags = r.read_packet_expected().expect("OpusTags");
    assert_eq!(&tags.data[..8], b"OpusTags");
    let mut dec = opus::Decoder::new(24000, opus::Channels::Mono).unwrap();
    let (mut n, mut granule, mut ended) = (0, 0, false);
    while let Some(p) = r.read_packet().expect("a whole Ogg page") {
        let mut buf = vec![0f32; 5760];
        n += dec
            .decode_float(&p.data, &mut buf, false)
            .expect("a decodable packet");
        granule = p.absgp_page();
        ended = p.last_in_stream();
    }
    assert!(ended, "the last page ends the stream");
    (n, ((granule - pre_skip) / 2) as usize)
}

#[test]
fn the_openai_client_gets_decodable_audio_in_every_format() {
    let d = Served::start("http = \"127.0.0.1:0\"\n[limits]\nmax_frames = 4\n", &[]);
    let addr = d.connect().call(json!({"op": "status"}))["http"]
        .as_str()
        .unwrap()
        .to_string();
    let out = tempfile::tempdir().unwrap();
    let report = run_client(
        "openai_client.py",
        &[&format!("http://{addr}/v1"), out.path().to_str().unwrap()],
    );
    let read = |name: &str| std::fs::read(out.path().join(format!("{name}.bin"))).unwrap();
    // No response_format is MP3, as OpenAI's default.
    assert_eq!(report["default"]["type"], "audio/mpeg", "{report}");
    for name in ["default", "mp3"] {
        let n = mp3_samples(&read(name));
        // All of the audio, plus the codec's delay and padding.
        assert!(
            (SAMPLES..SAMPLES + 3 * 576 + 1152).contains(&n),
            "{name}: {n}"
        );
    }
    assert_eq!(report["opus"]["type"], "audio/ogg");
    let (decoded, length) = opus_samples(&read("opus"));
    assert_eq!(length, SAMPLES, "the granule position counts every sample");
    assert!(decoded >= SAMPLES, "opus: {decoded}");
    assert_eq!(report["flac"]["type"], "audio/flac");
    let n = flac_samples(&read("flac"));
    assert!((SAMPLES..SAMPLES + 16).contains(&n), "flac: {n}");
    let wav = read("wav");
    assert_eq!(&wav[..4], b"RIFF");
    assert_eq!(&wav[4..8], &[0xff; 4], "streamed WAV sizes");
    assert_eq!(wav.len(), 44 + 2 * SAMPLES);
    assert_eq!(read("pcm").len(), 2 * SAMPLES);
    assert_eq!(report["pcm"]["type"], "audio/pcm");
    // Streamed: several chunks, the last FLAC frame there.
    assert!(
        report["streamed"]["chunks"].as_u64().unwrap() > 1,
        "{report}"
    );
    assert!((SAMPLES..SAMPLES + 16).contains(&flac_samples(&read("streamed"))));
    let sse = &report["sse"];
    assert_eq!(sse["type"], "text/event-stream", "{sse}");
    assert_eq!(
        sse["kinds"],
        json!(["speech.audio.delta", "speech.audio.done"])
    );
    assert_eq!(sse["last"], "speech.audio.done");
    assert_eq!(sse["bytes"].as_u64(), Some(2 * SAMPLES as u64));
    let speed = &report["error_speed"];
    assert_eq!(speed["status"], 400, "{report}");
    assert!(
        speed["message"].as_str().unwrap().contains("'speed'"),
        "{speed}"
    );
    assert_eq!(report["error_format"]["status"], 400);
}
