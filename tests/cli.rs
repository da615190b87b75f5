//! The `voxtrald` binary: say, voices and the dev commands, including bad input.

mod common;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use candle_core::{DType, Tensor};
use common::*;

fn voxtrald(args: &[&str]) -> Output {
    run_with_stdin(args, None)
}

fn run_with_stdin(args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_voxtrald"))
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(bytes) = stdin {
        input.write_all(bytes).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn fails_with(out: &Output, needle: &str) {
    assert!(!out.status.success(), "should have failed");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
}

fn fixture() -> String {
    fixture_dir().to_string_lossy().into_owned()
}

#[test]
fn say_writes_a_24khz_mono_wav_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("out.wav");
    let out = voxtrald(&[
        "say",
        "--model",
        &fixture(),
        "--voice",
        "fr_female",
        "--max-frames",
        "7",
        "--out",
        wav.to_str().unwrap(),
        "Bonjour tout le monde.",
    ]);
    ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("7 frames"), "{stderr}");
    assert!(stderr.contains("real-time factor"), "{stderr}");
    let r = hound::WavReader::open(&wav).unwrap();
    let spec = r.spec();
    assert_eq!(
        (spec.channels, spec.sample_rate, spec.bits_per_sample),
        (1, 24000, 16)
    );
    assert_eq!(r.len(), 7 * 1920);
    // Only the WAV is left in the directory: no temporary files.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn say_reads_stdin_and_rejects_bad_text() {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("s.wav");
    let w = wav.to_str().unwrap();
    let base = [
        "say",
        "--model",
        &fixture(),
        "--max-frames",
        "3",
        "--format",
        "float32",
        "--out",
        w,
    ];
    let out = run_with_stdin(&base, Some("From standard input.".as_bytes()));
    ok(&out);
    let r = hound::WavReader::open(&wav).unwrap();
    assert_eq!(r.spec().bits_per_sample, 32);
    assert_eq!(r.len(), 3 * 1920);

    std::fs::remove_file(&wav).unwrap();
    fails_with(
        &run_with_stdin(&base, Some(b"caf\xe9 \xff")),
        "not valid UTF-8",
    );
    fails_with(&run_with_stdin(&base, Some(b"  \n")), "empty");
    let mut args = base.to_vec();
    args.extend(["--voice", "nobody"]);
    args.push("Hello");
    fails_with(&voxtrald(&args), "unknown voice `nobody`");
    assert!(!wav.exists(), "no file is written on failure");
}

#[test]
fn missing_model_gives_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = voxtrald(&[
        "say",
        "--model",
        dir.path().to_str().unwrap(),
        "--out",
        "/tmp/x.wav",
        "Hello",
    ]);
    fails_with(&out, "no model at");
}

#[test]
fn a_model_too_big_for_the_memory_limit_is_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("x.wav");
    let (fx, out) = (fixture(), wav.to_str().unwrap().to_string());
    let run = |limit: &str| {
        voxtrald(&[
            "say",
            "--model",
            &fx,
            "--device",
            "cpu",
            "--max-memory",
            limit,
            "--max-frames",
            "3",
            "--out",
            &out,
            "Hi.",
        ])
    };
    let out = run("1MiB");
    fails_with(&out, "not enough memory");
    fails_with(&out, "1.00 MiB");
    assert!(!wav.exists());
    fails_with(&run("lots"), "bad size");
    ok(&run("64GiB"));
    assert!(wav.exists());
}

#[test]
fn voices_lists_names_and_languages() {
    let out = ok(&voxtrald(&["voices", "--model", &fixture()]));
    assert_eq!(out.lines().count(), 20);
    assert!(out
        .lines()
        .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["de_female", "de"]));
}

#[test]
fn dev_tokenize_prints_ids() {
    let out = ok(&voxtrald(&[
        "dev",
        "tokenize",
        "--model",
        &fixture(),
        "Hello world.",
    ]));
    assert_eq!(out.trim(), "[22177,4304,1046]");
    let out = ok(&voxtrald(&[
        "dev",
        "tokenize",
        "--model",
        &fixture(),
        "--voice",
        "casual_male",
        "Hello world.",
    ]));
    assert_eq!(out.trim(), "[1,25,24,24,24,24,36,22177,4304,1046,35,25]");
}

#[test]
fn dev_prefill_flow_generate_and_decode_match_golden() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
    let read = |f: &str| -> std::collections::HashMap<String, Tensor> {
        Tensor::read_npz(p(f)).unwrap().into_iter().collect()
    };
    let v = |t: &Tensor| flat(t);

    ok(&voxtrald(&[
        "dev",
        "prefill",
        "--model",
        &fixture(),
        "--voice",
        "casual_male",
        "--text",
        "Hello world.",
        "--out",
        &p("prefill.npz"),
    ]));
    let pre = read("prefill.npz");
    for key in ["backbone_hidden", "backbone_last_hidden", "semantic_logits"] {
        assert_close(key, &v(&pre[key]), &golden_f32(key), 1e-4, 1e-4);
    }
    assert_eq!(pre["prompt_ids"].dtype(), DType::I32);
    assert_eq!(
        pre["semantic_code"]
            .to_dtype(DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap(),
        golden_i64("semantic_code")
    );

    golden("ac_rand_noise_hidden")
        .write_npy(p("h.npy"))
        .unwrap();
    golden("ac_rand_noise_noise").write_npy(p("n.npy")).unwrap();
    ok(&voxtrald(&[
        "dev",
        "flow",
        "--model",
        &fixture(),
        "--hidden",
        &p("h.npy"),
        "--noise",
        &p("n.npy"),
        "--out",
        &p("flow.npz"),
    ]));
    let fl = read("flow.npz");
    assert_close(
        "x_final",
        &v(&fl["x_final"]),
        &golden_f32("ac_rand_noise_x_final"),
        1e-4,
        1e-4,
    );
    assert_eq!(fl["codes"].dims(), &[37]);

    golden("gen_noise").write_npy(p("noise.npy")).unwrap();
    ok(&voxtrald(&[
        "dev",
        "generate",
        "--model",
        &fixture(),
        "--voice",
        "casual_male",
        "--text",
        "Hello world.",
        "--noise",
        &p("noise.npy"),
        "--max-frames",
        "6",
        "--out",
        &p("gen.npz"),
    ]));
    let g = read("gen.npz");
    assert_eq!(g["gen_codes"].dims(), &[6, 37]);
    let codes = g["gen_codes"]
        .to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap();
    assert_eq!(codes.to_vec1::<i64>().unwrap(), golden_i64("gen_codes"));
    assert_close(
        "gen_waveform",
        &v(&g["gen_waveform"]),
        &golden_f32("gen_waveform"),
        1e-3,
        1e-3,
    );

    // Codes as int64 [37, T]; both decoders.
    golden("codec_codes")
        .to_dtype(DType::I64)
        .unwrap()
        .write_npy(p("codes.npy"))
        .unwrap();
    let (fx, codes) = (fixture(), p("codes.npy"));
    for streaming in [false, true] {
        let mut args = vec!["dev", "decode", "--model", &fx, "--codes", &codes, "--out"];
        let out = p(if streaming { "ws.npy" } else { "w.npy" });
        args.push(&out);
        if streaming {
            args.push("--streaming");
        }
        ok(&voxtrald(&args));
        let w = v(&Tensor::read_npy(&out).unwrap());
        assert_close(
            "codec_waveform",
            &w,
            &golden_f32("codec_waveform"),
            1e-3,
            1e-3,
        );
    }
    // Bad codes: wrong row count.
    Tensor::zeros((5, 3), DType::I32, &candle_core::Device::Cpu)
        .unwrap()
        .write_npy(p("bad.npy"))
        .unwrap();
    fails_with(
        &voxtrald(&[
            "dev",
            "decode",
            "--model",
            &fixture(),
            "--codes",
            &p("bad.npy"),
            "--out",
            &p("x.npy"),
        ]),
        "expected 37",
    );
}

#[test]
fn random_tiny_checkpoint_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let ck = ck.to_str().unwrap();
    ok(&voxtrald(&[
        "dev",
        "random-checkpoint",
        "--preset",
        "tiny",
        "--out",
        ck,
        "--seed",
        "3",
    ]));
    let wav = dir.path().join("r.wav");
    let out = voxtrald(&[
        "say",
        "--model",
        ck,
        "--voice",
        "neutral_female",
        "--max-frames",
        "4",
        "--out",
        wav.to_str().unwrap(),
        "Random weights, real layout.",
    ]);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("4 frames"));
    let voices = ok(&voxtrald(&["voices", "--model", ck]));
    assert_eq!(voices.lines().count(), 20);
}

#[test]
fn say_writes_raw_pcm_to_stdout() {
    let out = voxtrald(&[
        "say",
        "--model",
        &fixture(),
        "--max-frames",
        "5",
        "--out",
        "-",
        "Raw samples please.",
    ]);
    assert!(out.status.success());
    let pcm = out.stdout.clone();
    assert_eq!(pcm.len(), 5 * 1920 * 2, "s16le mono, no header");
    // The same samples as the WAV path.
    let dir = tempfile::tempdir().unwrap();
    let wav = dir.path().join("w.wav");
    ok(&voxtrald(&[
        "say",
        "--model",
        &fixture(),
        "--max-frames",
        "5",
        "--out",
        wav.to_str().unwrap(),
        "Raw samples please.",
    ]));
    let from_wav: Vec<u8> = hound::WavReader::open(&wav)
        .unwrap()
        .samples::<i16>()
        .flat_map(|s| s.unwrap().to_le_bytes())
        .collect();
    assert_eq!(pcm, from_wav);
}

#[test]
fn missing_sound_device_is_a_clear_error() {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join(".asoundrc"),
        "pcm.!default { type hw card 7 }\nctl.!default { type hw card 7 }\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_voxtrald"))
        .args(["say", "--model", &fixture(), "--max-frames", "2", "Hello."])
        .env("HOME", home.path())
        .env("XDG_RUNTIME_DIR", home.path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    fails_with(&out, "audio");
}

#[test]
fn dev_compare_checks_bf16_and_q8_against_the_f32_cpu_path() {
    let fx = fixture();
    let compare = |extra: &[&str]| {
        let mut a = vec!["dev", "compare", "--model", &fx, "--device", "cpu"];
        a.extend_from_slice(extra);
        voxtrald(&a)
    };
    let json = |out: &Output| -> serde_json::Value {
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
    };
    // bf16: every cosine >= 0.999 and the same semantic codes.
    let out = compare(&["--dtype", "bf16"]);
    ok(&out);
    let r = json(&out);
    assert_eq!(r["dtype"], "bf16");
    assert_eq!(r["semantic_codes_equal"], r["frames"]);
    for k in ["prefill_hidden_cos", "frame_hidden_cos_min", "waveform_cos"] {
        assert!(r[k].as_f64().unwrap() >= 0.999, "{k}: {r}");
    }
    // q8 (issue bar: cosine >= 0.99; argmax over the random fixture's flat logits may move).
    let out = compare(&["--quant", "q8", "--min-cos", "0.99", "--allow-code-changes"]);
    ok(&out);
    assert!(json(&out)["frame_hidden_cos_min"].as_f64().unwrap() >= 0.99);
    // A bar bf16 cannot meet fails, with the numbers printed.
    let out = compare(&["--dtype", "bf16", "--min-cos", "1.0"]);
    fails_with(&out, "does not match the f32 CPU path");
    assert!(json(&out)["pass"] == false);
}

#[test]
fn bench_reports_single_and_multi_stream_json() {
    let fx = fixture();
    let base = ["bench", "--model", &fx, "--device", "cpu", "--frames", "3"];
    let out = ok(&voxtrald(&[&base[..], &["--runs", "1", "--json"]].concat()));
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    for k in [
        "load_s",
        "prefill_s",
        "first_audio_s",
        "backbone_ms_per_frame",
        "rtf",
    ] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
    }
    assert_eq!(r["dtype"], "f32");
    // The bandwidth floor: the bytes each stage reads per frame, from the checkpoint's shapes.
    assert!(r["copy_gb_per_s"].as_f64().unwrap() > 0.1, "{r}");
    let backbone = r["backbone_bytes_per_frame"].as_u64().unwrap();
    let flow = r["flow_bytes_per_frame"].as_u64().unwrap();
    assert!(backbone > 0 && flow > 0, "{r}");
    // The binary counts its heap: each frame allocates something (candle's ops do).
    assert!(r["allocations_per_frame"].as_f64().unwrap() >= 1.0, "{r}");
    assert!(r["allocated_mb_per_frame"].as_f64().unwrap() > 0.0, "{r}");
    let q8 = ok(&voxtrald(
        &[&base[..], &["--runs", "1", "--json", "--quant", "q8"]].concat(),
    ));
    let q8: serde_json::Value = serde_json::from_str(q8.trim()).unwrap();
    // Int8 blocks read about a quarter of the f32 bytes (the tiny fixture's rows are 32-aligned).
    let ratio = q8["backbone_bytes_per_frame"].as_u64().unwrap() as f64 / backbone as f64;
    assert!((0.25..0.3).contains(&ratio), "q8 reads {ratio} of f32");
    assert!(r["flow_over_floor"].as_f64().unwrap() > 0.0);
    let args = [&base[..], &["--runs", "1", "--streams", "1,3", "--json"]].concat();
    let r: serde_json::Value = serde_json::from_str(ok(&voxtrald(&args)).trim()).unwrap();
    let results = r["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    assert_eq!(results[1]["streams"], 3);
    assert_eq!(results[1]["frames_per_stream"], 3);
    assert!(results[1]["audio_s_per_s"].as_f64().unwrap() > 0.0);
}

/// SIGKILL in the middle of `say --out`: the target never exists half written (the WAV goes
/// to a temporary file beside it and is renamed into place only when complete).
#[test]
fn sigkill_during_say_out_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("speech.wav");
    let text = "A sentence that goes on for a while. ".repeat(40);
    let mut child = Command::new(env!("CARGO_BIN_EXE_voxtrald"))
        .args(["say", "--model", &fixture(), "--max-frames", "400", "--out"])
        .arg(&out)
        .arg(&text)
        .env("RUST_BACKTRACE", "0")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the audio is being written (a file appears beside the target), then kill.
    let started = std::time::Instant::now();
    loop {
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        if !names.is_empty() {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "say ended before writing"
        );
        assert!(started.elapsed().as_secs() < 60, "no output file appeared");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "say finished before the kill: the test proves nothing"
    );
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!out.exists(), "a partial {} was left", out.display());
    // What is left is only the hidden temporary file, never under the target's name.
    for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        assert!(name.starts_with('.'), "visible leftover {name}");
    }
}

/// `say --out` onto a full disk (a 64 KiB tmpfs in a private mount namespace) and past a file
/// size limit (`ulimit -f`): a clear error naming the file, a failing exit, and nothing left
/// behind, neither the target nor the temporary file.
#[test]
fn say_out_on_a_full_disk_fails_clearly_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("full");
    std::fs::create_dir(&target).unwrap();
    let out = target.join("speech.wav");
    // 40 frames of 1920 16-bit samples: 150 KiB, more than either limit allows.
    let say = format!(
        "{} say --model {} --max-frames 40 --out {} 'Long enough to fill the disk.'",
        env!("CARGO_BIN_EXE_voxtrald"),
        fixture(),
        out.display()
    );
    let listing = format!(
        "rc=$?; echo; echo left:; ls -A {}; exit $rc",
        target.display()
    );
    let mut cases: Vec<(&str, Vec<String>, &str)> = vec![(
        "file size limit",
        vec![
            "bash".into(),
            "-c".into(),
            format!("trap '' XFSZ; ulimit -f 64; {say}; {listing}"),
        ],
        "File too large",
    )];
    let can_mount = Command::new("unshare")
        .args(["-rm", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if can_mount {
        let tmpfs = format!(
            "mount -t tmpfs -o size=64k voxtrald-full {} || exit 99; {say}; {listing}",
            target.display()
        );
        cases.push((
            "full disk",
            ["unshare", "-rm", "bash", "-c", &tmpfs]
                .map(String::from)
                .to_vec(),
            "No space left on device",
        ));
    } else {
        eprintln!("no private mount namespace here (unshare -rm): the full-disk case is skipped");
    }
    for (what, argv, expect) in cases {
        let o = Command::new(&argv[0])
            .args(&argv[1..])
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_ne!(
            o.status.code(),
            Some(99),
            "{what}: the tmpfs could not be mounted: {stderr}"
        );
        assert!(!o.status.success(), "{what}: say succeeded: {stdout}");
        assert!(stderr.contains(expect), "{what}: {stderr}");
        assert!(
            stderr.contains("speech.wav"),
            "{what}: the error names the file: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        let left = stdout.rsplit("left:").next().unwrap().trim();
        assert!(left.is_empty(), "{what}: files left behind: {left}");
    }
}
