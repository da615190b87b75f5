//! `scripts/gpu-check.sh --device cpu`: the GPU check's own dry run, so the script that a GPU
//! session gets one try at is tested here: every step on the CPU and tiny checkpoints, the
//! summary, and the logs it leaves in `$OUT`.

use std::process::Command;

#[test]
fn the_gpu_check_script_passes_its_cpu_dry_run() {
    let work = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu-check.sh"))
        .args(["--device", "cpu"])
        .env("VOXTRALD_BIN", env!("CARGO_BIN_EXE_voxtrald"))
        .env("WORK", work.path())
        .env("OUT", out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let summary = std::fs::read_to_string(out.path().join("summary.txt")).unwrap();
    for step in [
        "tiny-bf16",
        "tiny-q8",
        "checkpoint",
        "bench-bf16",
        "bench-q8",
        "streams",
        "long-run",
        "refuse",
        "daemon",
        "full-bf16",
    ] {
        assert!(
            summary.contains(&format!("PASS {step}")),
            "{step} missing:\n{summary}"
        );
    }
    assert!(!summary.contains("FAIL"), "{summary}");
    assert!(!summary.contains("SKIP"), "{summary}");
    // The benchmarks' JSON made it into the summary, and the summary ends the output.
    assert!(summary.contains("\"first_audio_s\""), "{summary}");
    let tail: Vec<&str> = stdout.lines().rev().take(40).collect();
    assert!(
        tail.iter().any(|l| l.contains("passed, 0 failed")),
        "{stdout}"
    );
    assert!(out.path().join("logs.tar.gz").exists());
}

/// `--only` runs the steps named (and the checkpoint when one of them reads it), nothing else:
/// what a second device call uses to redo a few steps.
#[test]
fn the_gpu_check_runs_only_the_steps_asked_for() {
    let work = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/gpu-check.sh"))
        .args(["--device", "cpu", "--only", "tiny-q8,streams"])
        .env("VOXTRALD_BIN", env!("CARGO_BIN_EXE_voxtrald"))
        .env("WORK", work.path())
        .env("OUT", out.path())
        .output()
        .unwrap();
    let summary = std::fs::read_to_string(out.path().join("summary.txt")).unwrap();
    assert!(run.status.success(), "{summary}");
    let ran: Vec<&str> = summary
        .lines()
        .filter_map(|l| l.strip_prefix("PASS "))
        .map(|l| l.split([' ', ':']).next().unwrap())
        .collect();
    assert_eq!(ran, ["tiny-q8", "checkpoint", "streams"], "{summary}");
    assert!(
        summary.contains("3 passed, 0 failed, 0 skipped"),
        "{summary}"
    );
}
