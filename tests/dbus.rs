//! D-Bus against a private `dbus-daemon`. The client is written against the interface XML
//! below (method and property names, signatures), not against voxtrald's Rust types.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::bus::{
    connect_when_served, parse_stream, parse_stream_audio, private_bus, provider, synthesize,
    synthesize_full, synthesize_pitched, Bus, Chunk, IFACE, NAME, PATH,
};
use common::served::Served;
use serde_json::json;

/// `org.freedesktop.Speech.Provider` as libspeechprovider specifies it.
const PROVIDER_XML: &str = r#"
<interface name="org.freedesktop.Speech.Provider">
  <method name="Synthesize">
    <arg direction="in" type="h" name="pipe_fd"/>
    <arg direction="in" type="s" name="text"/>
    <arg direction="in" type="s" name="voice_id"/>
    <arg direction="in" type="d" name="pitch"/>
    <arg direction="in" type="d" name="rate"/>
    <arg direction="in" type="b" name="is_ssml"/>
    <arg direction="in" type="s" name="language"/>
  </method>
  <property name="Voices" type="a(ssstas)" access="read"/>
  <property name="Name" type="s" access="read"/>
</interface>"#;

struct Setup {
    _bus: Bus,
    daemon: Served,
    conn: zbus::Connection,
    _busdir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let busdir = tempfile::tempdir().unwrap();
    let bus = private_bus(busdir.path());
    let daemon = Served::start(
        "[limits]\nmax_frames = 6\n",
        &[("DBUS_SESSION_BUS_ADDRESS", &bus.address)],
    );
    let conn = connect_when_served(&bus).await;
    Setup {
        _bus: bus,
        daemon,
        conn,
        _busdir: busdir,
    }
}

/// The `type` attributes of a method's arguments in an introspection document.
fn arg_types(xml: &str, method: &str) -> String {
    let start = xml
        .find(&format!("<method name=\"{method}\">"))
        .unwrap_or_else(|| panic!("no method {method} in {xml}"));
    let block = &xml[start..start + xml[start..].find("</method>").unwrap()];
    block
        .split("<arg ")
        .skip(1)
        .map(|a| {
            let t = a.find("type=\"").unwrap() + 6;
            a[t..t + a[t..].find('"').unwrap()].to_string()
        })
        .collect()
}

fn property_type(xml: &str, name: &str) -> String {
    let start = xml
        .find(&format!("<property name=\"{name}\""))
        .unwrap_or_else(|| panic!("no property {name}"));
    let p = &xml[start..start + xml[start..].find('>').unwrap()];
    let t = p.find("type=\"").unwrap() + 6;
    p[t..t + p[t..].find('"').unwrap()].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_matches_the_interface_xml() {
    let s = setup().await;
    let intro = zbus::fdo::IntrospectableProxy::builder(&s.conn)
        .destination(NAME)
        .path(PATH)
        .build()
        .await
        .unwrap()
        .introspect()
        .await
        .unwrap();
    assert!(intro.contains(&format!("<interface name=\"{IFACE}\">")));
    assert_eq!(
        arg_types(&intro, "Synthesize"),
        arg_types(PROVIDER_XML, "Synthesize")
    );
    for prop in ["Voices", "Name"] {
        assert_eq!(
            property_type(&intro, prop),
            property_type(PROVIDER_XML, prop)
        );
    }
    let p = provider(&s.conn).await;
    let name: String = p.get_property("Name").await.unwrap();
    assert_eq!(name, "Voxtral TTS");
    let voices: Vec<(String, String, String, u64, Vec<String>)> =
        p.get_property("Voices").await.unwrap();
    assert_eq!(voices.len(), 20);
    let fr = voices.iter().find(|v| v.1 == "fr_female").unwrap();
    assert_eq!(fr.2, "audio/x-spiel,format=S16LE,channels=1,rate=24000");
    // EVENTS_WORD, EVENTS_SENTENCE, EVENTS_SSML_MARK and SSML_BREAK, nothing else.
    assert_eq!(fr.3, 0x1 | 0x2 | 0x8 | 0x1000);
    assert_eq!(fr.4, vec!["fr".to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthesize_streams_events_before_audio() {
    let s = setup().await;
    let p = provider(&s.conn).await;
    let r = synthesize(&p, "One here. Two there.", "fr_female").await;
    let chunks = tokio::task::spawn_blocking(move || parse_stream(r))
        .await
        .unwrap();
    assert_eq!(chunks[0], Chunk::Sentence(0, 9));
    let second = chunks
        .iter()
        .position(|c| *c == Chunk::Sentence(10, 20))
        .expect("second sentence event");
    let audio = |cs: &[Chunk]| -> usize {
        cs.iter()
            .map(|c| match c {
                Chunk::Audio(n) => *n,
                _ => 0,
            })
            .sum()
    };
    assert_eq!(audio(&chunks[..second]), 6 * 1920 * 2);
    assert_eq!(audio(&chunks[second..]), 6 * 1920 * 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssml_marks_and_words_come_in_order_each_before_its_audio() {
    let s = setup().await;
    let p = provider(&s.conn).await;
    // What Orca sends to a voice that advertises EVENTS_SSML_MARK.
    let ssml = r#"<speak><mark name="0:3"/>One <mark name="4:8"/>here. <mark name="10:13"/>Two <mark name="14:20"/>there.</speak>"#;
    let r = synthesize_full(&p, ssml, "casual_male", 1.0, 1.0, true).await;
    let chunks = tokio::task::spawn_blocking(move || parse_stream(r))
        .await
        .unwrap();
    let marks: Vec<&str> = chunks
        .iter()
        .filter_map(|c| match c {
            Chunk::Mark(n) => Some(n.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(marks, ["0:3", "4:8", "10:13", "14:20"]);
    let words = chunks
        .iter()
        .filter(|c| matches!(c, Chunk::Word(..)))
        .count();
    assert_eq!(words, 4);
    // Each mark is followed by its word, then audio before the next mark.
    for (i, c) in chunks.iter().enumerate() {
        if let Chunk::Mark(_) = c {
            assert!(matches!(chunks[i + 1], Chunk::Word(..)), "{chunks:?}");
            let next_mark = chunks[i + 1..]
                .iter()
                .position(|c| matches!(c, Chunk::Mark(_)))
                .map_or(chunks.len(), |j| i + 1 + j);
            assert!(
                chunks[i..next_mark]
                    .iter()
                    .any(|c| matches!(c, Chunk::Audio(_))),
                "audio between marks: {chunks:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthesize_honours_pitch_and_keeps_the_duration() {
    let s = setup().await;
    let p = provider(&s.conn).await;
    let mut streams = Vec::new();
    // 1.0, a lower pitch, and one beyond the range (clamped to 2.0, not refused).
    for pitch in [1.0, 0.6, 5.0] {
        let r = synthesize_pitched(&p, "Pitch here.", "casual_female", pitch).await;
        let (_, audio) = tokio::task::spawn_blocking(move || parse_stream_audio(r))
            .await
            .unwrap();
        streams.push(audio);
    }
    for (i, audio) in streams.iter().enumerate() {
        let plain = streams[0].len() as i64;
        assert!(
            (audio.len() as i64 - plain).abs() <= 8,
            "stream {i}: {} bytes against {plain}",
            audio.len()
        );
    }
    assert_ne!(streams[0], streams[1], "pitch 0.6 changed nothing");
    assert_ne!(streams[0], streams[2], "pitch 2.0 changed nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_pipe_cancels_and_calls_run_concurrently() {
    let s = setup().await;
    let p = provider(&s.conn).await;
    let long: String = (0..300).map(|i| format!("Sentence {i}. ")).collect();
    let mut r = synthesize(&p, &long, "").await;
    let mut head = [0u8; 64];
    r.read_exact(&mut head).unwrap();
    drop(r); // the client hangs up
             // Three at once: every stream complete and in order.
    let mut readers = Vec::new();
    for i in 0..3 {
        readers.push(synthesize(&p, &format!("Call {i} here. Second part."), "").await);
    }
    let results: Vec<_> = readers
        .into_iter()
        .map(|r| std::thread::spawn(move || parse_stream(r)))
        .collect();
    for h in results {
        let chunks = h.join().unwrap();
        let sentences = chunks
            .iter()
            .filter(|c| matches!(c, Chunk::Sentence(..)))
            .count();
        let audio: usize = chunks
            .iter()
            .map(|c| if let Chunk::Audio(n) = c { *n } else { 0 })
            .sum();
        assert_eq!((sentences, audio), (2, 2 * 6 * 1920 * 2));
    }
    // The abandoned job is gone, not still generating.
    let start = Instant::now();
    loop {
        let q = s.daemon.connect().call(json!({"op": "status"}))["queue"].clone();
        if q == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "queue stuck at {q}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_interface() {
    use futures_util::StreamExt;
    let s = setup().await;
    // Uncached: each property read asks the daemon, not a signal-updated cache.
    let c: zbus::Proxy = zbus::proxy::Builder::new(&s.conn)
        .destination(NAME)
        .path("/org/voxtrald/Daemon")
        .interface("org.voxtrald.Daemon1")
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .unwrap();
    let voices: Vec<(String, String)> = c.call("ListVoices", &()).await.unwrap();
    assert_eq!(voices.len(), 20);
    let status: std::collections::HashMap<String, String> = c.call("Status", &()).await.unwrap();
    assert!(status["model"].ends_with("voxtral-tiny"), "{status:?}");
    let stopped: bool = c.call("Stop", &(999u64,)).await.unwrap();
    assert!(!stopped);
    let () = c.call("Pause", &()).await.unwrap();
    let paused: bool = c.get_property("Paused").await.unwrap();
    assert!(paused);
    let () = c.call("Resume", &()).await.unwrap();
    assert!(!c.get_property::<bool>("Paused").await.unwrap());
    // Speak: the job id comes back at once; its end arrives as a signal (finished when a sound
    // device is there, failed when not).
    let mut finished = c.receive_signal("JobFinished").await.unwrap();
    let mut failed = c.receive_signal("JobFailed").await.unwrap();
    let id: u64 = c
        .call("Speak", &("Hello there.", "", "message"))
        .await
        .unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::select! {
            m = finished.next() => m,
            m = failed.next() => m,
        }
    })
    .await
    .expect("no end-of-job signal")
    .unwrap();
    // JobFinished is (t u d), JobFailed is (t s): the job id comes first in both.
    let job = match msg.body().deserialize::<(u64, u32, f64)>() {
        Ok((j, _, _)) => j,
        Err(_) => msg.body().deserialize::<(u64, String)>().unwrap().0,
    };
    assert_eq!(job, id);
    let err = c
        .call::<_, _, u64>("Speak", &("Hi", "nobody", "text"))
        .await;
    assert!(err.is_err(), "unknown voice must be an error");
    let () = c.call("StopAll", &()).await.unwrap();
}
