//! The engine: streaming, sentence events, cancellation and Speech Dispatcher priorities.

mod common;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use common::*;
use voxtrald::engine::{
    wait_until, Destination, Engine, EngineConfig, Event, Job, Priority, SpeechRequest,
};
use voxtrald::model::noise::SeededNoise;
use voxtrald::text::sentences::{char_slice, split_sentences};
use voxtrald::{Error, GenerateOptions, LoadOptions, Voxtral};

const LONG: Duration = Duration::from_secs(60);

fn shared_model() -> Arc<Voxtral> {
    static M: OnceLock<Arc<Voxtral>> = OnceLock::new();
    M.get_or_init(|| Arc::new(Voxtral::load(&fixture_dir(), &LoadOptions::default()).unwrap()))
        .clone()
}

fn engine() -> Engine {
    Engine::new(shared_model(), EngineConfig::default())
}

fn req(text: &str, priority: Priority, frames: usize) -> SpeechRequest {
    let mut r = SpeechRequest::new(text, "casual_male");
    r.priority = priority;
    r.max_frames = frames;
    r.seed = 9;
    r
}

fn many_sentences(n: usize) -> String {
    (0..n)
        .map(|i| format!("Sentence number {i} is here. "))
        .collect()
}

/// All events until the terminal one.
fn drain(job: &mut Job) -> Vec<Event> {
    let mut out = Vec::new();
    while let Ok(Some(ev)) = job.recv_timeout(LONG) {
        out.push(ev);
    }
    out
}

fn audio_of(events: &[Event]) -> Vec<f32> {
    let mut out = Vec::new();
    for e in events {
        if let Event::Audio { offset, samples } = e {
            assert_eq!(*offset as usize, out.len(), "audio offsets are contiguous");
            out.extend(samples);
        }
    }
    out
}

#[test]
fn streams_audio_equal_to_a_full_decode() {
    let e = engine();
    let text = "Hello world.";
    let mut job = e.submit(req(text, Priority::Text, 33)).unwrap();
    let events = drain(&mut job);
    assert_eq!(events[0], Event::Started);
    assert_eq!(events[1], Event::Sentence { range: 0..12 });
    let first = events.iter().find_map(|e| match e {
        Event::Audio { samples, .. } => Some(samples.len()),
        _ => None,
    });
    assert_eq!(first, Some(2 * 1920), "first chunk after two frames");
    let Some(Event::Finished {
        frames, seconds, ..
    }) = events.last()
    else {
        panic!("no Finished: {:?}", events.last());
    };
    assert_eq!(*frames, 33);
    assert!((seconds - 33.0 * 0.08).abs() < 1e-9);
    let streamed = audio_of(&events);
    // The same utterance generated directly and decoded in one pass.
    let m = shared_model();
    let prompt = m.prompt("casual_male", text).unwrap();
    let opts = GenerateOptions {
        max_frames: 33,
        ..Default::default()
    };
    let mut gen = m
        .start(&prompt, Box::new(SeededNoise::new(9)), &opts)
        .unwrap();
    let mut frames = Vec::new();
    while let Some(f) = gen.next_frame().unwrap() {
        frames.push(f.codes);
    }
    let full = m.decode(&frames).unwrap();
    assert_eq!(streamed.len(), full.len());
    assert!(max_abs_diff(&streamed, &full) <= 1e-5);
}

#[test]
fn sentences_come_with_offsets_before_their_audio() {
    let e = engine();
    let text = "Dr. Who arrived. Then — quickly — he left! Bye.";
    let mut job = e.submit(req(text, Priority::Text, 4)).unwrap();
    let events = drain(&mut job);
    let ranges: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::Sentence { range } => Some(char_slice(text, range)),
            _ => None,
        })
        .collect();
    assert_eq!(
        ranges,
        ["Dr. Who arrived.", "Then — quickly — he left!", "Bye."]
    );
    // Each sentence event is followed by that sentence's 4 frames before the next one.
    let mut per_sentence = Vec::new();
    for e in &events {
        match e {
            Event::Sentence { .. } => per_sentence.push(0),
            Event::Audio { samples, .. } => *per_sentence.last_mut().unwrap() += samples.len(),
            _ => {}
        }
    }
    assert_eq!(per_sentence, [4 * 1920; 3]);
    assert!(matches!(
        events.last(),
        Some(Event::Finished { frames: 12, .. })
    ));
}

#[test]
fn cancel_stops_within_a_frame_and_emits_no_more_audio() {
    let e = engine();
    let mut job = e
        .submit(req(&many_sentences(50), Priority::Text, 40))
        .unwrap();
    // Wait for audio to flow.
    loop {
        match job.recv_timeout(LONG).unwrap() {
            Some(Event::Audio { .. }) if job.frames() >= 10 => break,
            Some(_) => {}
            None => panic!("ended early"),
        }
    }
    assert!(e.cancel(job.id));
    // Once cancel returns, at most the frame in progress completes.
    let at_cancel = job.frames();
    let rest = drain(&mut job);
    assert!(
        rest.iter().all(|e| !matches!(e, Event::Audio { .. })),
        "audio after cancel"
    );
    assert!(
        matches!(rest.last(), Some(Event::Cancelled { .. })),
        "{rest:?}"
    );
    assert!(
        job.frames() <= at_cancel + 1,
        "{} frames after cancel",
        job.frames() - at_cancel
    );
    assert!(!e.cancel(job.id), "a second cancel is a no-op");
    // The engine goes on with new work.
    let mut next = e.submit(req("Still here.", Priority::Text, 3)).unwrap();
    assert!(matches!(
        drain(&mut next).last(),
        Some(Event::Finished { .. })
    ));
}

#[test]
fn cancel_all_and_queued_jobs() {
    let e = engine();
    let mut a = e
        .submit(req(&many_sentences(20), Priority::Text, 30))
        .unwrap();
    let mut b = e.submit(req("Queued.", Priority::Text, 3)).unwrap();
    assert!(wait_until(LONG, || a.frames() > 0));
    e.cancel_all();
    assert!(matches!(
        drain(&mut a).last(),
        Some(Event::Cancelled { .. })
    ));
    let b_events = drain(&mut b);
    assert_eq!(
        b_events,
        [Event::Cancelled {
            reason: "cancelled".into()
        }]
    );
    assert!(wait_until(LONG, || e.queue_len() == 0));
}

#[test]
fn a_vanished_client_does_not_stall_the_engine() {
    let e = engine();
    let a = e
        .submit(req(&many_sentences(30), Priority::Text, 30))
        .unwrap();
    assert!(wait_until(LONG, || a.frames() > 0));
    drop(a); // the consumer goes away without reading
    let mut b = e.submit(req("Next one.", Priority::Text, 3)).unwrap();
    assert!(matches!(drain(&mut b).last(), Some(Event::Finished { .. })));
}

#[test]
fn priorities_follow_speech_dispatcher() {
    let e = engine();
    // Something long is speaking.
    let mut text1 = e
        .submit(req(&many_sentences(6), Priority::Text, 6))
        .unwrap();
    assert!(wait_until(LONG, || text1.frames() > 0));
    let mut text2 = e.submit(req("Queued text.", Priority::Text, 3)).unwrap();
    // Notifications are dropped while anything is speaking.
    let mut note = e.submit(req("Ding.", Priority::Notification, 3)).unwrap();
    assert!(matches!(
        drain(&mut note).as_slice(),
        [Event::Cancelled { .. }]
    ));
    // Only the latest progress report survives.
    let mut p1 = e
        .submit(req("Ten percent.", Priority::Progress, 3))
        .unwrap();
    let mut p2 = e
        .submit(req("Twenty percent.", Priority::Progress, 3))
        .unwrap();
    // Important goes before queued text and is not cancelled by a message.
    let mut imp = e
        .submit(req("Battery low.", Priority::Important, 3))
        .unwrap();
    // A message cancels the queued and speaking text.
    let mut msg = e.submit(req("New mail.", Priority::Message, 3)).unwrap();

    assert!(matches!(
        drain(&mut p1).last(),
        Some(Event::Cancelled { .. })
    ));
    assert!(matches!(
        drain(&mut text1).last(),
        Some(Event::Cancelled { .. })
    ));
    assert!(matches!(
        drain(&mut text2).as_slice(),
        [Event::Cancelled { .. }]
    ));
    let imp_ev = drain(&mut imp);
    assert!(
        matches!(imp_ev.last(), Some(Event::Finished { .. })),
        "{imp_ev:?}"
    );
    assert!(matches!(
        drain(&mut msg).last(),
        Some(Event::Finished { .. })
    ));
    assert!(matches!(
        drain(&mut p2).last(),
        Some(Event::Finished { .. })
    ));
}

#[test]
fn important_preempts_at_a_sentence_boundary() {
    let e = engine();
    let mut long = e
        .submit(req(&many_sentences(30), Priority::Text, 5))
        .unwrap();
    assert!(wait_until(LONG, || long.frames() > 0));
    let mut imp = e.submit(req("Alert.", Priority::Important, 5)).unwrap();
    let imp_events = drain(&mut imp);
    assert!(matches!(imp_events.last(), Some(Event::Finished { .. })));
    // The important job finished while the long one still had sentences left.
    assert!(long.frames() < 150, "{} frames", long.frames());
    let rest = drain(&mut long);
    assert!(
        matches!(rest.last(), Some(Event::Finished { frames: 150, .. })),
        "{rest:?}"
    );
}

#[test]
fn bad_requests_fail_at_submit() {
    let e = engine();
    assert!(matches!(
        e.submit(req("   ", Priority::Text, 3)),
        Err(Error::EmptyText)
    ));
    let mut r = req("Hi", Priority::Text, 3);
    r.voice = "ghost".into();
    assert!(matches!(e.submit(r), Err(Error::UnknownVoice { .. })));
    let huge = "a".repeat((1 << 20) + 1);
    assert!(matches!(
        e.submit(req(&huge, Priority::Text, 3)),
        Err(Error::InvalidInput(_))
    ));
}

#[test]
fn sentences_too_long_for_the_context_are_split() {
    let m = Arc::new(
        Voxtral::load(
            &fixture_dir(),
            &LoadOptions {
                max_positions: 64,
                ..Default::default()
            },
        )
        .unwrap(),
    );
    let e = Engine::new(m, EngineConfig::default());
    let text = "this sentence has far too many words to fit in a tiny context window at once";
    let mut job = e.submit(req(text, Priority::Text, 2)).unwrap();
    let events = drain(&mut job);
    let parts: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Sentence { range } => Some(char_slice(text, range)),
            _ => None,
        })
        .collect();
    assert!(parts.len() >= 2, "{parts:?}");
    assert_eq!(parts.join(" "), text);
    assert!(
        matches!(events.last(), Some(Event::Finished { .. })),
        "{:?}",
        events.last()
    );
}

#[test]
fn book_length_text_splits_lazily_into_bounded_sentences() {
    let text = many_sentences(20_000);
    let ranges = split_sentences(&text, 300);
    assert_eq!(ranges.len(), 20_000);
    assert!(ranges.iter().all(|r| r.len() <= 300));
}

#[test]
fn rate_changes_duration_not_the_sentence_structure() {
    let e = engine();
    let mut r = req("Faster please. And again.", Priority::Text, 10);
    r.rate = 2.0;
    let mut job = e.submit(r).unwrap();
    let events = drain(&mut job);
    let audio = audio_of(&events);
    // Each sentence's 10 frames (19200 samples) become 9600.
    assert_eq!(audio.len(), 2 * 9600);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Sentence { .. }))
            .count(),
        2
    );
    let mut bad = req("x", Priority::Text, 2);
    bad.rate = 9.0;
    assert!(matches!(e.submit(bad), Err(Error::InvalidInput(_))));
}

#[test]
fn pitch_moves_frequencies_and_keeps_duration() {
    let e = engine();
    let speak = |pitch: f32| {
        let mut r = req("Lower please. And again.", Priority::Text, 10);
        r.pitch = pitch;
        audio_of(&drain(&mut e.submit(r).unwrap()))
    };
    let plain = speak(1.0);
    let low = speak(0.75);
    assert_eq!(plain.len(), 2 * 19200);
    assert!(
        low.len().abs_diff(plain.len()) <= 4,
        "duration kept: {} vs {}",
        low.len(),
        plain.len()
    );
    // Upward zero crossings count the frequencies that dominate.
    let crossings = |x: &[f32]| x.windows(2).filter(|w| w[0] <= 0.0 && w[1] > 0.0).count();
    let ratio = crossings(&low) as f32 / crossings(&plain) as f32;
    assert!((0.6..0.9).contains(&ratio), "crossing ratio {ratio}");
    let mut bad = req("x", Priority::Text, 2);
    bad.pitch = 3.0;
    assert!(matches!(e.submit(bad), Err(Error::InvalidInput(_))));
}

/// Jobs whose audio goes back to their clients, as Spiel and the socket's streams ask.
fn client_req(voice: &str, text: &str, seed: u64, frames: usize) -> SpeechRequest {
    let mut r = SpeechRequest::new(text, voice);
    r.max_frames = frames;
    r.seed = seed;
    r.destination = Destination::Client;
    r
}

const CLIENT_CASES: [(&str, &str, u64, usize); 3] = [
    ("casual_male", "Hello world. And a second sentence.", 9, 24),
    ("fr_female", "Bonjour à tous, comment allez-vous ?", 6, 30),
    ("de_male", "Guten Tag.", 12, 20),
];

#[test]
fn client_jobs_share_decoding_steps_and_sound_as_they_do_alone() {
    // Alone: one engine per job, so nothing can share a step.
    let alone: Vec<Vec<Event>> = CLIENT_CASES
        .iter()
        .map(|&(v, t, seed, n)| {
            let e = engine();
            let events = drain(&mut e.submit(client_req(v, t, seed, n)).unwrap());
            assert_eq!(e.widest_step(), 1);
            events
        })
        .collect();
    let e = engine();
    let mut jobs: Vec<Job> = CLIENT_CASES
        .iter()
        .map(|&(v, t, seed, n)| e.submit(client_req(v, t, seed, n)).unwrap())
        .collect();
    // Read them in turn, so each consumer keeps up as its own client would.
    let mut together = vec![Vec::new(); jobs.len()];
    let mut ended = vec![false; jobs.len()];
    let deadline = std::time::Instant::now() + LONG;
    while ended.contains(&false) {
        assert!(
            std::time::Instant::now() < deadline,
            "client jobs did not end"
        );
        for (i, j) in jobs.iter_mut().enumerate() {
            match j.recv_timeout(Duration::from_millis(1)) {
                Ok(Some(ev)) => {
                    ended[i] = ev.is_terminal();
                    together[i].push(ev);
                }
                Ok(None) => ended[i] = true,
                Err(()) => {}
            }
        }
    }
    assert!(
        e.widest_step() >= 2,
        "client jobs were decoded one at a time (widest step {})",
        e.widest_step()
    );
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        let (a_audio, b_audio) = (audio_of(a), audio_of(b));
        assert!(!a_audio.is_empty(), "job {i} spoke");
        assert_eq!(a_audio.len(), b_audio.len(), "job {i}: audio length");
        assert!(
            max_abs_diff(&a_audio, &b_audio) <= 1e-4,
            "job {i}: audio differs when decoded with others"
        );
        let sentences = |evs: &[Event]| {
            evs.iter()
                .filter(|e| matches!(e, Event::Sentence { .. }))
                .count()
        };
        assert_eq!(sentences(a), sentences(b), "job {i}: sentence events");
        assert!(matches!(b.last(), Some(Event::Finished { .. })), "job {i}");
    }
}

#[test]
fn speaker_jobs_stay_one_at_a_time_beside_client_jobs() {
    let e = engine();
    let mut speaker: Vec<Job> = (0..2)
        .map(|i| {
            e.submit(req(&format!("Speaker {i} here."), Priority::Text, 12))
                .unwrap()
        })
        .collect();
    let mut client = e
        .submit(client_req("casual_female", "A client stream.", 3, 12))
        .unwrap();
    // The second speaker job waits for the first; the client job does not wait.
    assert!(wait_until(LONG, || client.frames() > 0));
    assert!(wait_until(LONG, || speaker[0].frames() > 0));
    let first = drain(&mut speaker[0]);
    assert!(matches!(first.last(), Some(Event::Finished { .. })));
    let second = drain(&mut speaker[1]);
    assert!(matches!(second.last(), Some(Event::Finished { .. })));
    assert!(matches!(
        drain(&mut client).last(),
        Some(Event::Finished { .. })
    ));
    // Never more than the speaker's job and the client's in one step.
    assert!(e.widest_step() <= 2, "widest step {}", e.widest_step());
}

#[test]
fn client_jobs_are_neither_displaced_nor_dropped_by_priorities() {
    let e = engine();
    let mut text = e
        .submit(client_req("casual_male", &many_sentences(3), 9, 8))
        .unwrap();
    assert!(wait_until(LONG, || text.frames() > 0));
    // A message on the speaker cancels speaker text only.
    let mut msg = e.submit(req("New mail.", Priority::Message, 3)).unwrap();
    let mut note = client_req("casual_male", "Ding.", 1, 3);
    note.priority = Priority::Notification;
    let mut note = e.submit(note).unwrap();
    assert!(matches!(
        drain(&mut msg).last(),
        Some(Event::Finished { .. })
    ));
    assert!(matches!(
        drain(&mut note).last(),
        Some(Event::Finished { .. })
    ));
    let events = drain(&mut text);
    assert!(
        matches!(events.last(), Some(Event::Finished { .. })),
        "{:?}",
        events.last()
    );
}

#[test]
fn a_client_that_stops_reading_holds_up_only_its_own_job() {
    let e = Engine::new(
        shared_model(),
        EngineConfig {
            event_buffer: 2,
            max_streams: 2,
            ..Default::default()
        },
    );
    let stuck = e
        .submit(client_req("casual_male", &many_sentences(20), 9, 40))
        .unwrap();
    assert!(wait_until(LONG, || stuck.frames() > 0));
    let mut other = e
        .submit(client_req("fr_male", "Je continue.", 4, 30))
        .unwrap();
    let events = drain(&mut other);
    assert!(matches!(
        events.last(),
        Some(Event::Finished { frames: 30, .. })
    ));
    // The stuck job made no progress beyond what fits its buffer and one pending chunk.
    let frames = stuck.frames();
    assert!(
        frames < 40,
        "the unread job kept generating: {frames} frames"
    );
    assert!(e.cancel(stuck.id));
}

#[test]
fn max_streams_caps_how_many_clients_share_a_step() {
    let e = Engine::new(
        shared_model(),
        EngineConfig {
            max_streams: 2,
            ..Default::default()
        },
    );
    let mut jobs: Vec<Job> = (0..4)
        .map(|i| {
            e.submit(client_req("casual_male", "Capped streams.", i, 10))
                .unwrap()
        })
        .collect();
    for j in &mut jobs {
        assert!(matches!(drain(j).last(), Some(Event::Finished { .. })));
    }
    assert!(e.widest_step() <= 2, "widest step {}", e.widest_step());
}

#[test]
fn a_consumer_at_playback_pace_gets_all_the_audio_and_the_end() {
    let e = Engine::new(
        shared_model(),
        EngineConfig {
            event_buffer: 1,
            ..Default::default()
        },
    );
    let mut job = e.submit(req("Slowly read.", Priority::Text, 30)).unwrap();
    // The consumer falls behind near the end, as a sound card does: from the chunk at frame 26
    // on, generation finishes while the consumer sleeps, and the end waits behind the audio.
    let mut events = Vec::new();
    let mut pauses = 0;
    while let Ok(Some(ev)) = job.recv_timeout(LONG) {
        let audio = matches!(ev, Event::Audio { .. });
        events.push(ev);
        if audio && pauses < 2 && job.frames() >= 26 {
            pauses += 1;
            std::thread::sleep(Duration::from_millis(1500));
        }
    }
    assert!(pauses > 0);
    assert!(
        matches!(events.last(), Some(Event::Finished { frames: 30, .. })),
        "the end was dropped: {} events, the last a terminal one: {:?}",
        events.len(),
        events.last().map(Event::is_terminal)
    );
    assert_eq!(audio_of(&events).len(), 30 * 1920);
}

#[test]
fn the_lexicon_changes_what_is_said_not_the_offsets() {
    let lexicon = voxtrald::text::lexicon::Lexicon::new([("Zork", "Hello world")])
        .unwrap()
        .map(Arc::new);
    let e = Engine::new(
        shared_model(),
        EngineConfig {
            lexicon,
            ..Default::default()
        },
    );
    let plain = drain(&mut e.submit(req("Hello world.", Priority::Text, 8)).unwrap());
    let listed = drain(&mut e.submit(req("ZORK.", Priority::Text, 8)).unwrap());
    assert_eq!(
        audio_of(&plain),
        audio_of(&listed),
        "said as the lexicon says"
    );
    assert!(listed.contains(&Event::Sentence { range: 0..5 }));
    // Without the entry the text is read as written.
    let other = drain(&mut engine().submit(req("ZORK.", Priority::Text, 8)).unwrap());
    assert_ne!(audio_of(&other), audio_of(&listed));
}

fn ssml_req(ssml: &str, frames: usize) -> SpeechRequest {
    let (text, markup) = voxtrald::text::ssml::parse(ssml);
    let mut r = req(&text, Priority::Text, frames);
    r.markup = markup;
    r
}

#[test]
fn words_and_marks_come_in_order_each_before_its_audio() {
    let e = engine();
    let ssml = r#"<speak><mark name="0:5"/>Hello <mark name="6:11"/>world, this is <mark name="m3"/>a test. <mark name="s2"/>Second one here.<mark name="end"/></speak>"#;
    let r = ssml_req(ssml, 14);
    let text = r.text.clone();
    let mut job = e.submit(r).unwrap();
    let events = drain(&mut job);
    let total = audio_of(&events).len() as u64;
    assert!(matches!(events.last(), Some(Event::Finished { .. })));
    let marks: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::Mark { name, .. } => Some(name.as_str()),
            _ => None,
        })
        .collect();
    assert_eq!(marks, ["0:5", "6:11", "m3", "s2", "end"]);
    let words: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Word { range, .. } => Some(char_slice(&text, range)),
            _ => None,
        })
        .collect();
    assert_eq!(
        words,
        ["Hello", "world,", "this", "is", "a", "test.", "Second", "one", "here."]
    );
    // Each mark right before the word it stands before; the last one after all the audio.
    let pos = |f: &dyn Fn(&Event) -> bool| events.iter().position(f).unwrap();
    let mark_at = |n: &str| pos(&|e| matches!(e, Event::Mark { name, .. } if name == n));
    let word_at =
        |w: &str| pos(&|e| matches!(e, Event::Word { range, .. } if char_slice(&text, range) == w));
    assert_eq!(mark_at("0:5") + 1, word_at("Hello"));
    assert_eq!(mark_at("6:11") + 1, word_at("world,"));
    assert_eq!(mark_at("m3") + 1, word_at("a"));
    assert_eq!(mark_at("s2") + 1, word_at("Second"));
    let last_audio = events
        .iter()
        .rposition(|e| matches!(e, Event::Audio { .. }))
        .unwrap();
    assert!(mark_at("end") > last_audio);
    // A word's sample lies in the audio that follows it (or at the end, if none does), and
    // word offsets never go back.
    let mut last = 0;
    for (i, ev) in events.iter().enumerate() {
        let offset = match ev {
            Event::Word { offset, .. } | Event::Mark { offset, .. } => *offset,
            _ => continue,
        };
        assert!(offset >= last, "offsets go forward");
        last = offset;
        let next = events[i + 1..].iter().find(|e| {
            matches!(
                e,
                Event::Audio { .. } | Event::Sentence { .. } | Event::Finished { .. }
            )
        });
        match next {
            Some(Event::Audio { offset: a, samples }) => {
                assert!(
                    (*a..*a + samples.len() as u64).contains(&offset),
                    "word at {offset} outside the next chunk {a}+{}",
                    samples.len()
                );
            }
            _ => assert!(offset <= total),
        }
    }
    // The first word starts the audio.
    assert!(matches!(
        events.iter().find(|e| matches!(e, Event::Word { .. })),
        Some(Event::Word { offset: 0, .. })
    ));
}

#[test]
fn ssml_breaks_are_silence_and_prosody_applies_to_its_span() {
    let e = engine();
    let mut job = e
        .submit(ssml_req(r#"One two.<break time="500ms"/>Three four."#, 6))
        .unwrap();
    let events = drain(&mut job);
    let second = events
        .iter()
        .rposition(|e| matches!(e, Event::Sentence { .. }))
        .unwrap();
    let first_audio_end = events[..second]
        .iter()
        .rposition(
            |e| matches!(e, Event::Audio { samples, .. } if samples.iter().any(|s| *s != 0.0)),
        )
        .unwrap();
    let silence: usize = events[first_audio_end + 1..second]
        .iter()
        .map(|e| match e {
            Event::Audio { samples, .. } => {
                assert!(samples.iter().all(|s| *s == 0.0));
                samples.len()
            }
            _ => 0,
        })
        .sum();
    assert_eq!(silence, 12_000, "500 ms at 24 kHz");
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Sentence { .. }))
            .count(),
        2
    );

    // The same words under `<prosody>`: half the length at twice the rate, half the amplitude
    // at half the volume.
    let plain = audio_of(&drain(
        &mut e
            .submit(req("Fast words here.", Priority::Text, 8))
            .unwrap(),
    ));
    let fast = audio_of(&drain(
        &mut e
            .submit(ssml_req(
                r#"<prosody rate="200%">Fast words here.</prosody>"#,
                8,
            ))
            .unwrap(),
    ));
    let ratio = fast.len() as f64 / plain.len() as f64;
    assert!(
        (0.45..0.56).contains(&ratio),
        "rate 2: length ratio {ratio}"
    );
    let soft = audio_of(&drain(
        &mut e
            .submit(ssml_req(
                r#"<prosody volume="50%">Fast words here.</prosody>"#,
                8,
            ))
            .unwrap(),
    ));
    assert_eq!(soft.len(), plain.len());
    let peak = |a: &[f32]| a.iter().fold(0f32, |m, s| m.max(s.abs()));
    assert!((peak(&soft) / peak(&plain) - 0.5).abs() < 0.01);
    // A span inside a sentence is a piece of its own, with the rest at the request's rate.
    let mut job = e
        .submit(ssml_req(
            r#"Slow start <prosody rate="x-fast">quick middle</prosody> slow end."#,
            4,
        ))
        .unwrap();
    let pieces = drain(&mut job)
        .iter()
        .filter(|e| matches!(e, Event::Sentence { .. }))
        .count();
    assert_eq!(pieces, 3);
}
