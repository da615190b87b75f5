//! The shipped user unit under a real `systemd --user` (in a private mount namespace, so that
//! the manager runs without systemd as PID 1): `voxtrald install --user` writes it, systemd
//! starts the daemon (Type=dbus, on a private session bus), and after a SIGKILL it restarts
//! the daemon (Restart=on-failure), which comes back and speaks.

mod common;

use std::process::Command;

use common::fixture_dir;

#[test]
fn systemd_restarts_the_daemon_after_a_kill_and_it_serves_again() {
    let have = |c: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let sd = ["/lib/systemd/systemd", "/usr/lib/systemd/systemd"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let namespaces = Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    let (Some(sd), true, true) = (sd, namespaces, have("dbus-daemon") && have("systemctl")) else {
        // CI installs systemd and dbus-daemon and runs as root; this is for other machines.
        eprintln!("skipped: needs systemd, systemctl, dbus-daemon and `unshare -m` (root)");
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let script = format!(
        r#"
set -u
T={t}
BIN={bin}
fail() {{ echo "FAIL: $*"; systemctl --user status voxtrald --no-pager 2>&1 | tail -20; exit 1; }}
mkdir -p /run/systemd && mount -t tmpfs voxtrald-test /run/systemd && mkdir /run/systemd/system || fail "no /run/systemd"
export XDG_RUNTIME_DIR=$T/run XDG_CONFIG_HOME=$T/config XDG_DATA_HOME=$T/data HOME=$T
mkdir -m 700 $XDG_RUNTIME_DIR
$BIN install --user >/dev/null || fail "install"
mkdir -p $XDG_CONFIG_HOME/voxtrald
printf 'model = "%s"\n[limits]\nmax_frames = 4\n' {model} > $XDG_CONFIG_HOME/voxtrald/config.toml
DBUS=$(dbus-daemon --session --address=unix:path=$XDG_RUNTIME_DIR/bus --fork --print-pid) || fail "dbus-daemon"
export DBUS_SESSION_BUS_ADDRESS=unix:path=$XDG_RUNTIME_DIR/bus
{sd} --user >$T/systemd.log 2>&1 &
SD=$!
trap 'systemctl --user stop voxtrald 2>/dev/null; kill $SD $DBUS 2>/dev/null' EXIT
for i in $(seq 100); do
  case $(systemctl --user is-system-running 2>/dev/null) in running|degraded) break;; esac
  sleep 0.1
done
systemctl --user set-environment XDG_CONFIG_HOME=$XDG_CONFIG_HOME XDG_DATA_HOME=$XDG_DATA_HOME HOME=$T RUST_BACKTRACE=0
systemctl --user daemon-reload
systemctl --user start voxtrald || fail "start"
pid1=$(systemctl --user show -p MainPID --value voxtrald)
echo "pid1=$pid1"
$BIN status >/dev/null || fail "no status before the kill"
kill -9 "$pid1"
for i in $(seq 300); do
  pid2=$(systemctl --user show -p MainPID --value voxtrald)
  if [ "$pid2" != 0 ] && [ "$pid2" != "$pid1" ] && $BIN status >/dev/null 2>&1; then break; fi
  sleep 0.1
done
echo "pid2=$pid2"
echo "restarts=$(systemctl --user show -p NRestarts --value voxtrald)"
echo "state=$(systemctl --user is-active voxtrald)"
$BIN say --out $T/after.wav "After the restart." 2>$T/say.err || fail "say after the restart: $(cat $T/say.err)"
grep -q '^daemon: ' $T/say.err || fail "say did not go through the daemon: $(cat $T/say.err)"
echo "said=$(stat -c %s $T/after.wav)"
"#,
        t = t.path().display(),
        bin = env!("CARGO_BIN_EXE_voxtrald"),
        model = fixture_dir().display(),
    );
    let out = Command::new("timeout")
        .args(["120", "unshare", "-m", "bash", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let field = |k: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .to_string()
    };
    assert!(
        out.status.success(),
        "{stdout}\n{stderr}\nsystemd: {}",
        std::fs::read_to_string(t.path().join("systemd.log")).unwrap_or_default()
    );
    let (pid1, pid2) = (field("pid1"), field("pid2"));
    assert!(pid1.parse::<u32>().is_ok_and(|p| p > 0), "{stdout}");
    assert!(
        pid2.parse::<u32>().is_ok_and(|p| p > 0) && pid2 != pid1,
        "not restarted: {stdout}"
    );
    assert_eq!(field("restarts"), "1", "{stdout}");
    assert_eq!(field("state"), "active", "{stdout}");
    // One sentence of 4 frames, 16-bit, after the 44-byte header.
    assert_eq!(field("said"), (44 + 4 * 1920 * 2).to_string(), "{stdout}");
}
