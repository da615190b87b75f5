//! The user's voices on disk: one `NAME.json` per voice in a private folder, written whole
//! (temp file, then rename) and read back with every field checked. A damaged or foreign
//! file is an error naming it, and never hides the other voices.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::catalogue::catalogue;
use super::codes::{CodeOffset, Codes};
use crate::error::{Error, Result};
use crate::service::voices::Gender;

const FORMAT: &str = "voxtrald-voice";
const VERSION: u32 = 1;
const EXTENSION: &str = "json";
/// Voice files are small (codes of at most 1024 frames); anything far larger is not one.
const MAX_FILE_BYTES: u64 = 4 << 20;

/// How a voice was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "by", rename_all = "lowercase", deny_unknown_fields)]
pub enum Made {
    /// Codes imported from a file (another encoder's output, or an export).
    Import { source: String },
    /// Codes searched through the decoder to sound like a clip (`voice create`).
    Clone {
        source: String,
        /// SHA-256 of the clip file, so a voice can be traced to its recording without
        /// keeping the recording.
        source_sha256: String,
        /// Seconds of the clip kept after trimming.
        kept_seconds: f32,
        steps: usize,
        seed: u64,
    },
}

/// How close the codes' decoding is to the clip they were made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quality {
    /// The search's final loss.
    pub loss: f32,
    /// Multi-resolution STFT distance of the decoded codes to the clip.
    pub stft_distance: f32,
    /// The same distance for random codes of the clip's length: the scale to read it on.
    pub random_stft_distance: f32,
}

/// The stored form of a voice.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VoiceFile {
    format: String,
    version: u32,
    name: String,
    language: String,
    #[serde(default)]
    gender: Option<Gender>,
    made: Made,
    /// RFC 3339, UTC.
    created: String,
    #[serde(default)]
    quality: Option<Quality>,
    /// Model-side codes (+2 offset), `[T, 37]`, no end frame.
    codes: Vec<Vec<u32>>,
}

/// A user voice as read from the library.
#[derive(Debug, Clone)]
pub struct UserVoice {
    pub name: String,
    pub language: String,
    pub gender: Option<Gender>,
    pub made: Made,
    pub created: String,
    pub quality: Option<Quality>,
    pub codes: Codes,
    pub path: PathBuf,
    /// The file's modification time when read, to notice changes.
    pub modified: Option<SystemTime>,
}

/// The folder of user voices.
#[derive(Debug, Clone)]
pub struct Library {
    dir: PathBuf,
}

/// A voice name: 1 to 64 of `A-Z a-z 0-9 _ - .`, not starting with a dot, not a preset's.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !ok {
        return Err(Error::InvalidInput(format!(
            "`{name}` is not a voice name: use 1 to 64 letters, digits, `_`, `-` or `.`, not \
             starting with a dot"
        )));
    }
    if catalogue().preset(name).is_some() {
        return Err(Error::InvalidInput(format!(
            "`{name}` is a preset voice; choose another name"
        )));
    }
    Ok(())
}

fn check_language(language: &str) -> Result<()> {
    if language.len() == 2 && language.chars().all(|c| c.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "`{language}` is not an ISO 639-1 language code (two lowercase letters, e.g. en, fr)"
        )))
    }
}

/// Now as RFC 3339 UTC (`2026-12-02T09:30:00Z`).
pub fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl Library {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// `$XDG_DATA_HOME/voxtrald/voices`.
    pub fn default_dir() -> Option<PathBuf> {
        crate::settings::data_home().map(|d| d.join("voxtrald").join("voices"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.{EXTENSION}"))
    }

    /// Creates the folder private (0700), and makes an existing one private.
    fn ensure_dir(&self) -> Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| Error::io(&self.dir, e))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| Error::io(&self.dir, e))
    }

    /// Every voice file, each read on its own: `Err` entries name the damaged files.
    pub fn scan(&self) -> Vec<Result<UserVoice>> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut paths: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|x| x == EXTENSION)
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        paths.sort();
        paths.iter().map(|p| read_voice(p)).collect()
    }

    /// The readable voices by name.
    pub fn voices(&self) -> BTreeMap<String, UserVoice> {
        self.scan()
            .into_iter()
            .filter_map(|v| v.ok())
            .map(|v| (v.name.clone(), v))
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<UserVoice> {
        let path = self.path_of(name);
        if !path.exists() {
            return Err(self.unknown(name));
        }
        read_voice(&path)
    }

    fn unknown(&self, name: &str) -> Error {
        let have: Vec<String> = self.voices().into_keys().collect();
        Error::InvalidInput(format!(
            "no user voice `{name}` in {} (there: {})",
            self.dir.display(),
            if have.is_empty() {
                "none".into()
            } else {
                have.join(", ")
            }
        ))
    }

    /// Stores a new voice; refuses to overwrite one unless `replace`.
    #[allow(clippy::too_many_arguments)]
    pub fn add(
        &self,
        name: &str,
        language: &str,
        gender: Option<Gender>,
        made: Made,
        quality: Option<Quality>,
        codes: &Codes,
        replace: bool,
    ) -> Result<UserVoice> {
        check_name(name)?;
        check_language(language)?;
        self.ensure_dir()?;
        let path = self.path_of(name);
        if path.exists() && !replace {
            return Err(Error::InvalidInput(format!(
                "a voice `{name}` exists already ({}); remove it first or pick another name",
                path.display()
            )));
        }
        let file = VoiceFile {
            format: FORMAT.into(),
            version: VERSION,
            name: name.into(),
            language: language.into(),
            gender,
            made,
            created: now_rfc3339(),
            quality,
            codes: codes.frames().to_vec(),
        };
        write_private(
            &path,
            &serde_json::to_vec(&file).map_err(|e| Error::Internal(e.to_string()))?,
        )?;
        read_voice(&path)
    }

    /// Imports `[T, 37]` codes from a `.npy` file.
    pub fn import(
        &self,
        name: &str,
        language: &str,
        npy: &Path,
        offset: CodeOffset,
    ) -> Result<UserVoice> {
        let codes = Codes::read_npy(npy, offset)?;
        let made = Made::Import {
            source: npy
                .file_name()
                .map_or_else(|| npy.display().to_string(), |n| n.to_string_lossy().into()),
        };
        self.add(name, language, None, made, None, &codes, false)
    }

    /// Writes a voice's codes as `.npy` (model-side, +2 offset) to `out`, whole or not at all.
    pub fn export(&self, name: &str, out: &Path) -> Result<UserVoice> {
        let v = self.get(name)?;
        crate::atomic::write_atomic(out, |w| std::io::Write::write_all(w, &v.codes.to_npy()))?;
        Ok(v)
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        let path = self.path_of(name);
        if !path.exists() {
            return Err(self.unknown(name));
        }
        std::fs::remove_file(&path).map_err(|e| Error::io(&path, e))
    }

    /// Renames a voice: its file is rewritten under the new name, then the old one removed.
    pub fn rename(&self, from: &str, to: &str) -> Result<UserVoice> {
        let v = self.get(from)?;
        check_name(to)?;
        if self.path_of(to).exists() {
            return Err(Error::InvalidInput(format!(
                "a voice `{to}` exists already; remove it first or pick another name"
            )));
        }
        let mut file = to_file(&v);
        file.name = to.into();
        let path = self.path_of(to);
        write_private(
            &path,
            &serde_json::to_vec(&file).map_err(|e| Error::Internal(e.to_string()))?,
        )?;
        self.remove(from)?;
        read_voice(&path)
    }
}

fn to_file(v: &UserVoice) -> VoiceFile {
    VoiceFile {
        format: FORMAT.into(),
        version: VERSION,
        name: v.name.clone(),
        language: v.language.clone(),
        gender: v.gender,
        made: v.made.clone(),
        created: v.created.clone(),
        quality: v.quality.clone(),
        codes: v.codes.frames().to_vec(),
    }
}

/// Writes `bytes` to `path` atomically, the file readable by its owner only (0600).
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".voxtrald-")
        .permissions(std::fs::Permissions::from_mode(0o600))
        .tempfile_in(dir)
        .map_err(|e| Error::io(dir, e))?;
    std::io::Write::write_all(tmp.as_file_mut(), bytes).map_err(|e| Error::io(path, e))?;
    tmp.as_file().sync_all().map_err(|e| Error::io(path, e))?;
    tmp.persist(path).map_err(|e| Error::io(path, e.error))?;
    Ok(())
}

/// Reads and checks one voice file.
pub fn read_voice(path: &Path) -> Result<UserVoice> {
    let bad = |reason: String| Error::Voice {
        path: path.into(),
        voice: path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(bad(format!(
            "{} bytes is far too large for a voice file",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let file: VoiceFile = serde_json::from_slice(&bytes)
        .map_err(|e| bad(format!("not a voxtrald voice file: {e}")))?;
    if file.format != FORMAT {
        return Err(bad(format!(
            "format is `{}`, expected `{FORMAT}`",
            file.format
        )));
    }
    if file.version != VERSION {
        return Err(bad(format!(
            "version {} is not supported (this voxtrald reads version {VERSION})",
            file.version
        )));
    }
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned());
    if stem.as_deref() != Some(file.name.as_str()) {
        return Err(bad(format!(
            "the file names voice `{}` but is called {}",
            file.name,
            path.display()
        )));
    }
    check_name(&file.name).map_err(|e| bad(e.to_string()))?;
    check_language(&file.language).map_err(|e| bad(e.to_string()))?;
    let codes = Codes::new(file.codes).map_err(|e| bad(e.to_string()))?;
    Ok(UserVoice {
        name: file.name,
        language: file.language,
        gender: file.gender,
        made: file.made,
        created: file.created,
        quality: file.quality,
        codes,
        path: path.into(),
        modified: meta.modified().ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(t: usize) -> Codes {
        Codes::new(
            (0..t)
                .map(|i| {
                    let mut f = vec![2 + i as u32 * 11];
                    f.extend((0..36).map(|k| 2 + (k + i as u32) % 21));
                    f
                })
                .collect(),
        )
        .unwrap()
    }

    fn made() -> Made {
        Made::Import {
            source: "x.npy".into(),
        }
    }

    #[test]
    fn voices_are_private_whole_and_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = Library::new(tmp.path().join("voxtrald/voices"));
        let v = lib
            .add("alice", "fr", None, made(), None, &codes(5), false)
            .unwrap();
        assert_eq!(v.codes, codes(5));
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(lib.dir()), 0o700);
        assert_eq!(mode(&v.path), 0o600);
        // No temp file is left beside it.
        let names: Vec<_> = std::fs::read_dir(lib.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("alice.json")]);
        assert!(lib
            .add("alice", "fr", None, made(), None, &codes(2), false)
            .is_err());
        let out = tmp.path().join("alice.npy");
        lib.export("alice", &out).unwrap();
        let again = lib.import("bob", "en", &out, CodeOffset::Auto).unwrap();
        assert_eq!(again.codes, codes(5));
        let r = lib.rename("bob", "carol").unwrap();
        assert_eq!(r.name, "carol");
        assert_eq!(mode(&r.path), 0o600);
        assert!(lib.get("bob").is_err());
        lib.remove("carol").unwrap();
        let e = lib.remove("carol").unwrap_err().to_string();
        assert!(
            e.contains("no user voice `carol`") && e.contains("alice"),
            "{e}"
        );
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", ".hidden", "a/b", "fr_male", "x y", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        check_name("my-voice_2.0").unwrap();
        assert!(check_language("french").is_err());
    }

    #[test]
    fn damaged_and_foreign_files_are_named_and_do_not_hide_others() {
        let tmp = tempfile::tempdir().unwrap();
        let lib = Library::new(tmp.path());
        lib.add("good", "en", None, made(), None, &codes(3), false)
            .unwrap();
        std::fs::write(tmp.path().join("junk.json"), b"{not json").unwrap();
        std::fs::write(
            tmp.path().join("other.json"),
            br#"{"format":"x","version":1}"#,
        )
        .unwrap();
        let good = std::fs::read_to_string(tmp.path().join("good.json")).unwrap();
        std::fs::write(tmp.path().join("moved.json"), &good).unwrap();
        let scanned = lib.scan();
        assert_eq!(scanned.len(), 4);
        let errors: Vec<String> = scanned
            .iter()
            .filter_map(|r| r.as_ref().err())
            .map(|e| e.to_string())
            .collect();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors
            .iter()
            .any(|e| e.contains("junk.json") && e.contains("not a voxtrald voice")));
        assert!(errors
            .iter()
            .any(|e| e.contains("moved.json") && e.contains("names voice `good`")));
        assert_eq!(lib.voices().len(), 1);
    }

    #[test]
    fn dates_are_rfc3339() {
        let d = now_rfc3339();
        assert_eq!(d.len(), 20, "{d}");
        assert!(d.starts_with("20") && d.ends_with('Z'));
    }
}
