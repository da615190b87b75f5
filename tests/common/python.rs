//! The pinned Python clients (`tests/clients/requirements.txt`) in a venv: the one `.ci/run`
//! made (`$VOXTRALD_CLIENT_PYTHON`), else one made here once per target directory.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// A Python interpreter with the pinned client packages.
pub fn python() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        if let Some(p) = std::env::var_os("VOXTRALD_CLIENT_PYTHON") {
            return PathBuf::from(p);
        }
        let reqs = clients_dir().join("requirements.txt");
        let pins = std::fs::read_to_string(&reqs).unwrap();
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("client-venv");
        let stamp = venv.join("voxtrald-pins");
        let python = venv.join("bin/python");
        if std::fs::read_to_string(&stamp).ok().as_deref() == Some(pins.as_str()) {
            return python;
        }
        // Built beside, then moved into place, so that test binaries running at once do not
        // see half a venv.
        let tmp = venv.with_extension(format!("part-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&tmp)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "python3 -m venv failed (the tests need Python 3 with venv)"
        );
        let ok = Command::new(tmp.join("bin/python"))
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&reqs)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "installing {} failed (needs PyPI)", reqs.display());
        std::fs::write(tmp.join("voxtrald-pins"), &pins).unwrap();
        if std::fs::rename(&tmp, &venv).is_err() {
            if std::fs::read_to_string(&stamp).ok().as_deref() == Some(pins.as_str()) {
                // Another test binary made the same venv meanwhile.
                let _ = std::fs::remove_dir_all(&tmp);
            } else {
                // An old venv with other pins is in the way.
                std::fs::remove_dir_all(&venv).unwrap();
                std::fs::rename(&tmp, &venv).unwrap();
            }
        }
        python
    })
    .clone()
}

/// Runs `tests/clients/<script>` with `args`; its stdout, which must be one JSON value.
pub fn run_client(script: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(python())
        .arg(clients_dir().join(script))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}
