//! `voxtrald voice`: the voice library from the command line. list, import, export, remove
//! and rename work on the library folder directly (a running daemon notices within a
//! second); create clones a voice from a clip on this machine.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use super::ModelArgs;
use crate::audio::clip::{read_clip, ClipOptions};
use crate::clone::{search_codes, speaking_level_dbfs, Progress, SearchOptions};
use crate::library::{catalogue, language_name, CodeOffset, Codes, Library, Made, Quality};
use crate::model::Voxtral;
use crate::settings::Settings;

#[derive(Subcommand)]
pub enum VoiceCommand {
    /// The preset voices and your own, with how each of yours was made and how close it is.
    List {
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make a voice from `[T, 37]` integer codes in a `.npy` file (any encoder's output).
    Import {
        name: String,
        #[arg(long, value_name = "FILE")]
        codes: PathBuf,
        /// ISO 639-1 code of the voice's language.
        #[arg(long, default_value = "en")]
        language: String,
        /// Whether the codes carry the +2 offset of the special codes: auto decides from the
        /// values (a 0 or 1 means raw; above 8191 semantic or 20 acoustic means offset).
        #[arg(long, value_enum, default_value = "auto")]
        offset: CodeOffset,
    },
    /// Write a voice's codes as `.npy` (`<i8`, `[T, 37]`, with the +2 offset).
    Export {
        name: String,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    Remove {
        name: String,
    },
    Rename {
        from: String,
        to: String,
    },
    /// Clone a voice from a recording (WAV or FLAC, 3 to 30 s of speech kept), on this
    /// machine: codes are searched through the model's codec decoder until they sound like
    /// the clip. Ctrl-C stops early and keeps the best codes so far.
    Create {
        name: String,
        /// The recording.
        #[arg(long, value_name = "CLIP")]
        from: PathBuf,
        #[arg(long, default_value = "en")]
        language: String,
        /// Optimisation steps (more is closer and slower).
        #[arg(long)]
        steps: Option<usize>,
        /// Seed of the search (same clip, seed and steps: same codes).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Frames decoded per step (plus their left context); 0 decodes the whole clip.
        #[arg(long)]
        crop_frames: Option<usize>,
        /// Passes of the discrete refinement over the frames after the gradient steps (0: none).
        #[arg(long)]
        refine_sweeps: Option<usize>,
        /// Keep the recording's level instead of bringing it to the level the codec speaks at.
        #[arg(long)]
        keep_level: bool,
        /// Keep silence at the ends.
        #[arg(long)]
        no_trim: bool,
        /// Replace a voice of the same name.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        model: ModelArgs,
    },
}

fn library() -> anyhow::Result<Library> {
    let dir = Settings::of_this_user()?
        .voices_dir()
        .context("no voice library folder: set XDG_DATA_HOME or HOME, or `voices` in the config")?;
    Ok(Library::new(dir))
}

pub fn run(cmd: VoiceCommand) -> anyhow::Result<()> {
    let lib = library()?;
    match cmd {
        VoiceCommand::List { json } => list(&lib, json),
        VoiceCommand::Import {
            name,
            codes,
            language,
            offset,
        } => {
            let v = lib.import(&name, &language, &codes, offset)?;
            println!(
                "imported `{}`: {} frames ({:.1} s) into {}",
                v.name,
                v.codes.len(),
                v.codes.seconds(),
                v.path.display()
            );
            Ok(())
        }
        VoiceCommand::Export { name, out } => {
            let v = lib.export(&name, &out)?;
            println!(
                "wrote {} frames of `{}` to {}",
                v.codes.len(),
                v.name,
                out.display()
            );
            Ok(())
        }
        VoiceCommand::Remove { name } => {
            lib.remove(&name)?;
            println!("removed `{name}`");
            Ok(())
        }
        VoiceCommand::Rename { from, to } => {
            lib.rename(&from, &to)?;
            println!("renamed `{from}` to `{to}`");
            Ok(())
        }
        VoiceCommand::Create {
            name,
            from,
            language,
            steps,
            seed,
            crop_frames,
            refine_sweeps,
            keep_level,
            no_trim,
            replace,
            model,
        } => {
            let mut opts = SearchOptions {
                seed,
                ..SearchOptions::default()
            };
            if let Some(s) = steps {
                opts.steps = s;
            }
            if let Some(c) = crop_frames {
                opts.crop_frames = (c > 0).then_some(c);
            }
            if let Some(n) = refine_sweeps {
                opts.refine.sweeps = n;
            }
            let how = Create {
                name,
                from,
                language,
                keep_level,
                no_trim,
                replace,
            };
            create(&lib, how, opts, &model)
        }
    }
}

fn list(lib: &Library, json: bool) -> anyhow::Result<()> {
    let entries = lib.scan();
    if json {
        let mut v = crate::frontends::protocol::user_voices_json(&entries);
        v["presets"] = serde_json::to_value(
            catalogue()
                .voices
                .iter()
                .map(|p| serde_json::json!({"id": p.id, "language": p.language, "gender": p.gender, "description": p.description}))
                .collect::<Vec<_>>(),
        )?;
        println!("{v:#}");
        return Ok(());
    }
    println!("Presets:");
    for p in &catalogue().voices {
        println!("  {:<18} {:<3} {}", p.id, p.language, p.description);
    }
    println!("Your voices ({}):", lib.dir().display());
    if entries.is_empty() {
        println!("  none yet: `voxtrald voice create NAME --from clip.wav`");
    }
    for e in &entries {
        match e {
            Ok(v) => {
                let made = match &v.made {
                    Made::Clone { steps, .. } => format!("cloned, {steps} steps"),
                    Made::Import { source } => format!("imported from {source}"),
                };
                let quality = v.quality.as_ref().map_or(String::new(), |q| {
                    format!(
                        ", loss {:.4}, STFT distance {:.3} (random codes {:.3})",
                        q.loss, q.stft_distance, q.random_stft_distance
                    )
                });
                println!(
                    "  {:<18} {:<3} {:.1} s, {made}{quality}, {}",
                    v.name,
                    v.language,
                    v.codes.seconds(),
                    v.created
                );
            }
            Err(e) => println!("  damaged: {e}"),
        }
    }
    Ok(())
}

struct Create {
    name: String,
    from: PathBuf,
    language: String,
    keep_level: bool,
    no_trim: bool,
    replace: bool,
}

fn create(
    lib: &Library,
    how: Create,
    opts: SearchOptions,
    model: &ModelArgs,
) -> anyhow::Result<()> {
    // Fail on the name before minutes of work.
    crate::library::store::check_name(&how.name)?;
    if !how.replace && lib.get(&how.name).is_ok() {
        anyhow::bail!(
            "a voice `{}` exists already; pass --replace or pick another name",
            how.name
        );
    }
    let settings = model.settings();
    let device = settings.device.open()?;
    let (codec, rate) = Voxtral::load_codec(&settings.dir, &device)
        .with_context(|| format!("loading the codec decoder from {}", settings.dir.display()))?;
    let level = speaking_level_dbfs(&codec)?;
    let clip = read_clip(
        &how.from,
        ClipOptions {
            rate,
            level_dbfs: (!how.keep_level).then_some(level),
            trim: !how.no_trim,
        },
    )?;
    eprintln!(
        "clip: {:.1} s read, kept {:.1} s from {:.1} s ({:+.1} dB); {} steps on {}",
        clip.original_seconds,
        clip.kept_seconds,
        clip.kept_from,
        clip.gain_db,
        opts.steps,
        format!("{device:?}").to_lowercase()
    );
    let stop = Arc::new(AtomicBool::new(false));
    watch_ctrl_c(stop.clone());
    let bar = ProgressBar::new(opts.steps as u64);
    // The refinement's frame visits count on after the steps: the bar learns the total.
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} cloning [{bar:30}] {pos}/{len} steps, {msg}, {elapsed} elapsed, {eta} left",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    let started = Instant::now();
    // Without a terminal the bar is hidden: a plain line after the first step and at every
    // tenth of the way tells logs (and the Ctrl-C test) that the search is under way.
    let plain = bar.is_hidden();
    let mut report = |p: &Progress| {
        if plain && (p.step == 1 || p.step.is_multiple_of((p.steps / 10).max(1))) {
            eprintln!(
                "step {}/{}: loss {:.4} (best {:.4})",
                p.step, p.steps, p.loss, p.best_loss
            );
        }
        bar.set_length(p.steps as u64);
        bar.set_position(p.step as u64);
        bar.set_message(format!("loss {:.4} (best {:.4})", p.loss, p.best_loss));
    };
    let found = search_codes(&codec, &clip.samples, &opts, &mut report, &stop)?;
    bar.finish_and_clear();
    let secs = started.elapsed().as_secs_f64();
    let random = found.random_stft_distance;
    let codes = Codes::new(found.codes.clone())?;
    let quality = Quality {
        loss: found.loss,
        stft_distance: found.stft_distance,
        random_stft_distance: random,
    };
    let made = Made::Clone {
        source: how.from.file_name().map_or_else(
            || how.from.display().to_string(),
            |n| n.to_string_lossy().into(),
        ),
        source_sha256: clip.sha256.clone(),
        kept_seconds: clip.kept_seconds,
        steps: found.steps_done,
        seed: opts.seed,
    };
    let v = lib.add(
        &how.name,
        &how.language,
        None,
        made,
        Some(quality),
        &codes,
        how.replace,
    )?;
    let mut out = std::io::stdout().lock();
    if found.interrupted {
        writeln!(
            out,
            "stopped after {} steps: kept the best codes so far",
            found.steps_done
        )?;
    }
    writeln!(
        out,
        "created `{}` ({}): {} frames, {} steps and {} refinement passes in {:.0} s, STFT \
         distance {:.3} against {:.3} for random codes ({:.0}%), saved to {}",
        v.name,
        language_name(&v.language),
        codes.len(),
        found.steps_done,
        found.sweeps_done,
        secs,
        found.stft_distance,
        random,
        100.0 * found.stft_distance / random.max(f32::MIN_POSITIVE),
        v.path.display()
    )?;
    Ok(())
}

/// Ctrl-C sets `stop` (the search then returns its best codes); a second Ctrl-C exits.
fn watch_ctrl_c(stop: Arc<AtomicBool>) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("\nstopping: keeping the best codes so far (Ctrl-C again to abort)");
                stop.store(true, Ordering::SeqCst);
            }
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        });
    });
}
