//! Real playback through ALSA into a user-mode PulseAudio null sink, recorded from its monitor
//! and compared with the same utterance written to a WAV file.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::pulse::start_pulse;
use common::*;

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Correlation coefficient of two equal-length signals.
fn corr(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        ab += (*x as f64) * (*y as f64);
        aa += (*x as f64).powi(2);
        bb += (*y as f64).powi(2);
    }
    ab / (aa.sqrt() * bb.sqrt()).max(1e-12)
}

/// Low-pass around 2.4 kHz (101-tap Hann-windowed sinc), so sub-sample delays and the
/// band edges of the sound server's resamplers do not matter.
fn smooth(x: &[f32]) -> Vec<f32> {
    let fc = 0.1f64;
    let taps: Vec<f64> = (-50i32..=50)
        .map(|n| {
            let n = n as f64;
            let sinc = if n == 0.0 {
                2.0 * fc
            } else {
                (2.0 * std::f64::consts::PI * fc * n).sin() / (std::f64::consts::PI * n)
            };
            let hann = 0.5 + 0.5 * (std::f64::consts::PI * n / 51.0).cos();
            sinc * hann
        })
        .collect();
    let sum: f64 = taps.iter().sum();
    (0..x.len())
        .map(|i| {
            let mut acc = 0f64;
            for (k, t) in taps.iter().enumerate() {
                if let Some(v) = (i + k).checked_sub(50).and_then(|j| x.get(j)) {
                    acc += *v as f64 * t;
                }
            }
            (acc / sum) as f32
        })
        .collect()
}

#[test]
fn say_plays_the_utterance_to_the_sound_server() {
    let Some(pulse) = start_pulse() else { return };
    let env = |c: &mut Command| {
        c.env("XDG_RUNTIME_DIR", pulse.runtime.path())
            .env("HOME", pulse.runtime.path())
            .env("RUST_BACKTRACE", "0");
    };
    let dir = tempfile::tempdir().unwrap();
    let cap = dir.path().join("cap.raw");
    let mut rec = Command::new("parec");
    env(&mut rec);
    let mut rec = rec
        .args([
            "-d",
            "nullsink.monitor",
            "--format=float32le",
            "--channels=1",
            "--rate=24000",
            "--latency-msec=200",
        ])
        .stdout(std::fs::File::create(&cap).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    let fx = fixture_dir();
    let args = |extra: &[&str]| {
        let mut v: Vec<String> = ["say", "--model", fx.to_str().unwrap(), "--seed", "5"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(["--max-frames", "25"].map(String::from));
        v.extend(extra.iter().map(|s| s.to_string()));
        v.push("Playback check. Second sentence.".into());
        v
    };
    let mut play = Command::new(env!("CARGO_BIN_EXE_voxtrald"));
    env(&mut play);
    let out = play
        .env("VOXTRALD_LOG", "voxtrald=info")
        .args(args(&[]))
        .output()
        .unwrap();
    // The log without its colours.
    let mut log = String::new();
    let mut esc = false;
    for c in String::from_utf8_lossy(&out.stderr).chars() {
        match (esc, c) {
            (false, '\u{1b}') => esc = true,
            (false, c) => log.push(c),
            (true, 'm') => esc = false,
            (true, _) => {}
        }
    }
    assert!(out.status.success(), "{log}");
    // Our side of it: the ring never ran dry and the device reported no error. A gap here is
    // voxtrald's fault; one only in the recording below is the capture's.
    assert!(
        log.contains("underruns=0"),
        "voxtrald's playback ran dry: {log}"
    );
    if log.contains("audio stream error") {
        eprintln!("the device reported: {log}");
    }
    std::thread::sleep(Duration::from_millis(300));
    let _ = rec.kill();
    let _ = rec.wait();

    let wav = dir.path().join("ref.wav");
    let mut file = Command::new(env!("CARGO_BIN_EXE_voxtrald"));
    env(&mut file);
    let out = file
        .args(args(&[
            "--format",
            "float32",
            "--out",
            wav.to_str().unwrap(),
        ]))
        .output()
        .unwrap();
    assert!(out.status.success());
    let reference: Vec<f32> = hound::WavReader::open(&wav)
        .unwrap()
        .samples::<f32>()
        .map(|s| s.unwrap().clamp(-1.0, 1.0))
        .collect();
    assert_eq!(reference.len(), 2 * 25 * 1920, "two sentences of 25 frames");

    // Compare low-passed signals: the sound server resamples twice, and the random model's
    // noise-like output decorrelates under sub-sample delays at high frequencies.
    let reference = smooth(&reference);
    let raw = read_f32(&cap);
    let captured = smooth(&raw);
    // Find where the utterance starts in the recording. The monitor of an idle null sink
    // delivers nothing until the sink wakes, so the very start may be missing from the
    // recording (never more than 0.2 s); everything after it must be there, in order.
    let first = captured
        .iter()
        .position(|v| v.abs() > 1e-3)
        .expect("the recording is silent");
    let max_missing = 4800i64;
    let mut best = (0i64, f64::MIN);
    for l in -max_missing..(first as i64 + 200) {
        let (c0, r0) = if l >= 0 {
            (l as usize, 0)
        } else {
            (0, (-l) as usize)
        };
        if r0 as i64 > max_missing || c0 + reference.len() - r0 > captured.len() {
            continue;
        }
        // One second is plenty to find the lag; all of it is checked below.
        let c = corr(&captured[c0..c0 + 24000], &reference[r0..r0 + 24000]);
        if c > best.1 {
            best = (l, c);
        }
    }
    let (lag, score) = best;
    assert!(
        score > 0.9,
        "utterance not found in the recording (best {score} at {lag}, {} samples)",
        captured.len()
    );
    // All of it, in order: each second is found where the one before it ended, give or take
    // 0.1 s. The capture may drop a few samples under load (parec is a client of the sound
    // server like any other), which moves what follows a little; it must never lose a second.
    let (r0, mut at) = if lag >= 0 {
        (0usize, lag)
    } else {
        ((-lag) as usize, 0)
    };
    let c0 = at as usize;
    let mut drift = 0i64;
    for (i, r) in reference[r0..].chunks(24000).enumerate() {
        let mut best = (at, f64::MIN);
        for l in (at - 2400).max(0)..=at + 2400 {
            let l0 = l as usize;
            if l0 + r.len() > captured.len() {
                break;
            }
            let c = corr(&captured[l0..l0 + r.len()], r);
            if c > best.1 {
                best = (l, c);
            }
        }
        assert!(
            best.1 > 0.9,
            "second {i}: correlation {} (searched around {at})",
            best.1
        );
        drift += best.0 - at;
        at = best.0 + r.len() as i64;
    }
    if drift != 0 {
        eprintln!("the recording drifted by {drift} samples against the file");
    }
    let n = (at as usize).saturating_sub(c0);
    // No gaps: no run of silence inside the utterance.
    let mut run = 0;
    let mut longest = 0;
    for s in &raw[c0..c0 + n] {
        run = if s.abs() < 1e-4 { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    assert!(longest < 48, "a silent gap of {longest} samples");
}
