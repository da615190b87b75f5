//! `voxtrald dev`: model-developer commands with a stable contract, used to compare this
//! implementation with reference ones. All compute in f32 on the CPU unless told otherwise.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};

use super::ModelArgs;
use crate::atomic::write_atomic_path;
use crate::model::flow::FlowTrace;
use crate::model::noise::InjectedNoise;
use crate::model::random::{write_random_checkpoint, Preset};
use crate::model::stream::{ChunkSchedule, StreamingDecoder};
use crate::model::{GenerateOptions, Voxtral, DEFAULT_CFG_ALPHA};

#[derive(Subcommand)]
pub enum DevCommand {
    /// Print token ids as JSON (with --voice: the whole speech prompt).
    Tokenize {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        voice: Option<String>,
        text: String,
    },
    /// Decode codes `[37, T]` (int32/int64, with the +2 offset) to a waveform `.npy`.
    Decode {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        codes: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Decode through the streaming decoder with the engine's chunk schedule.
        #[arg(long)]
        streaming: bool,
    },
    /// Prompt, backbone prefill and first semantic code, to `.npz`.
    Prefill {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        voice: String,
        #[arg(long)]
        text: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// One flow-matching frame from a hidden state and noise, to `.npz`.
    Flow {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        hidden: PathBuf,
        #[arg(long)]
        noise: PathBuf,
        #[arg(long, default_value_t = DEFAULT_CFG_ALPHA)]
        cfg_alpha: f32,
        #[arg(long)]
        out: PathBuf,
    },
    /// The generation loop with injected noise, to `.npz`.
    Generate(GenerateArgs),
    /// Write a random checkpoint in the official layout.
    RandomCheckpoint {
        #[arg(long, value_enum)]
        preset: Preset,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

#[derive(Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    voice: String,
    #[arg(long)]
    text: String,
    /// f32 `[K, 36]`: row i is frame i's noise.
    #[arg(long)]
    noise: PathBuf,
    #[arg(long)]
    max_frames: usize,
    #[arg(long, default_value_t = DEFAULT_CFG_ALPHA)]
    cfg_alpha: f32,
    #[arg(long)]
    out: PathBuf,
}

fn write_npz(path: &Path, entries: &[(&str, Tensor)]) -> anyhow::Result<()> {
    write_atomic_path(path, |tmp| Ok(Tensor::write_npz(entries, tmp)?))?;
    Ok(())
}

fn write_npy(path: &Path, t: &Tensor) -> anyhow::Result<()> {
    write_atomic_path(path, |tmp| Ok(t.write_npy(tmp)?))?;
    Ok(())
}

fn read_f32(path: &Path) -> anyhow::Result<Tensor> {
    let t = Tensor::read_npy(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(t.to_dtype(DType::F32)?)
}

/// Codes `[37, T]` from an int32/int64 `.npy`, as frames of 37.
pub fn read_codes(path: &Path, per_frame: usize) -> anyhow::Result<Vec<Vec<u32>>> {
    let t = Tensor::read_npy(path).with_context(|| format!("reading {}", path.display()))?;
    if !matches!(t.dtype(), DType::I32 | DType::I64 | DType::U32) {
        bail!(
            "{}: codes must be int32 or int64, got {:?}",
            path.display(),
            t.dtype()
        );
    }
    let (k, n) = t
        .dims2()
        .with_context(|| format!("{}: codes must be [{per_frame}, T]", path.display()))?;
    if k != per_frame {
        bail!(
            "{}: codes have {k} rows, expected {per_frame}",
            path.display()
        );
    }
    let rows = t.to_dtype(DType::I64)?.t()?.to_vec2::<i64>()?;
    debug_assert_eq!(rows.len(), n);
    rows.into_iter()
        .map(|r| {
            r.into_iter()
                .map(|c| u32::try_from(c).map_err(|_| anyhow::anyhow!("negative or huge code {c}")))
                .collect()
        })
        .collect()
}

fn ids_tensor(ids: &[u32]) -> anyhow::Result<Tensor> {
    let v: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    Ok(Tensor::from_vec(v, ids.len(), &Device::Cpu)?)
}

fn frames_tensor(frames: &[Vec<u32>], per_frame: usize) -> anyhow::Result<Tensor> {
    let v: Vec<i32> = frames.iter().flatten().map(|&c| c as i32).collect();
    Ok(Tensor::from_vec(
        v,
        (frames.len(), per_frame),
        &Device::Cpu,
    )?)
}

/// Decodes frames one by one through the streaming decoder, as the engine does.
pub fn streaming_decode(model: &Voxtral, frames: &[Vec<u32>]) -> crate::Result<Vec<f32>> {
    let n = model.codec().valid_frames(frames)?;
    let mut dec = StreamingDecoder::new(ChunkSchedule::default());
    let mut out = Vec::new();
    for f in &frames[..n] {
        if let Some(chunk) = dec.push(model.codec(), f.clone())? {
            out.extend(chunk);
        }
    }
    out.extend(dec.flush(model.codec())?);
    Ok(out)
}

pub fn run(cmd: DevCommand) -> anyhow::Result<()> {
    match cmd {
        DevCommand::Tokenize { model, voice, text } => {
            let m = model.load()?;
            let ids = match voice {
                Some(v) => m.prompt_ids(&v, &text)?,
                None => m.encode_text(&text),
            };
            println!("{}", serde_json::to_string(&ids)?);
        }
        DevCommand::Decode {
            model,
            codes,
            out,
            streaming,
        } => {
            let m = model.load()?;
            let frames = read_codes(&codes, m.codec().codes_per_frame())?;
            let wave = if streaming {
                streaming_decode(&m, &frames)?
            } else {
                m.decode(&frames)?
            };
            let n = wave.len();
            write_npy(&out, &Tensor::from_vec(wave, n, &Device::Cpu)?)?;
        }
        DevCommand::Prefill {
            model,
            voice,
            text,
            out,
        } => {
            let m = model.load()?;
            let prompt = m.prompt(&voice, &text)?;
            let mut cache = m.backbone().new_cache();
            let hidden = m
                .backbone()
                .forward(&mut cache, &prompt.embeddings)?
                .to_dtype(DType::F32)?;
            let last = hidden.get(hidden.dim(0)? - 1)?;
            let logits = m.head().semantic_logits(&last)?;
            let code = m.head().semantic_code(&logits);
            let n = logits.len();
            write_npz(
                &out,
                &[
                    ("prompt_ids", ids_tensor(&prompt.ids)?),
                    (
                        "backbone_input_embeddings",
                        prompt.embeddings.to_dtype(DType::F32)?,
                    ),
                    ("backbone_hidden", hidden.clone()),
                    ("backbone_last_hidden", last),
                    (
                        "semantic_logits",
                        Tensor::from_vec(logits, n, &Device::Cpu)?,
                    ),
                    ("semantic_code", ids_tensor(&[code])?),
                ],
            )?;
        }
        DevCommand::Flow {
            model,
            hidden,
            noise,
            cfg_alpha,
            out,
        } => {
            let m = model.load()?;
            let h = read_f32(&hidden)?.to_device(m.device())?;
            let noise: Vec<f32> = read_f32(&noise)?.flatten_all()?.to_vec1()?;
            if h.dims() != [m.config().dim] || noise.len() != m.head().n_acoustic() {
                bail!(
                    "expected hidden [{}] and noise [{}], got {:?} and [{}]",
                    m.config().dim,
                    m.head().n_acoustic(),
                    h.dims(),
                    noise.len()
                );
            }
            let logits = m.head().semantic_logits(&h)?;
            let semantic = m.head().semantic_code(&logits);
            let mut trace = FlowTrace::default();
            let x = m
                .head()
                .integrate(&h, &noise, cfg_alpha, Some(&mut trace))?;
            let mut codes = vec![semantic];
            codes.extend(m.head().quantize(&x));
            let a = x.len();
            let rows = |v: &[Vec<f32>]| -> anyhow::Result<Tensor> {
                let flat: Vec<f32> = v.iter().flatten().copied().collect();
                Ok(Tensor::from_vec(flat, (v.len(), a), &Device::Cpu)?)
            };
            let steps = trace.t.len();
            write_npz(
                &out,
                &[
                    ("x_final", Tensor::from_vec(x, a, &Device::Cpu)?),
                    ("codes", ids_tensor(&codes)?),
                    ("t", Tensor::from_vec(trace.t.clone(), steps, &Device::Cpu)?),
                    ("x_in", rows(&trace.x_in)?),
                    ("v_cond", rows(&trace.v_cond)?),
                    ("v_uncond", rows(&trace.v_uncond)?),
                ],
            )?;
        }
        DevCommand::Generate(g) => {
            let m = g.model.load()?;
            let noise = read_f32(&g.noise)?;
            let (_, a) = noise
                .dims2()
                .context("noise must be f32 [frames, acoustic codebooks]")?;
            if a != m.head().n_acoustic() {
                bail!(
                    "noise rows have {a} values, expected {}",
                    m.head().n_acoustic()
                );
            }
            let prompt = m.prompt(&g.voice, &g.text)?;
            let opts = GenerateOptions {
                max_frames: g.max_frames,
                cfg_alpha: g.cfg_alpha,
            };
            let rows = noise.to_vec2::<f32>()?;
            let mut gen = m.start(&prompt, Box::new(InjectedNoise::new(rows)), &opts)?;
            let mut frames = Vec::new();
            let mut hidden = Vec::new();
            while let Some(f) = gen.next_frame()? {
                frames.push(f.codes);
                hidden.push(f.hidden.to_dtype(DType::F32)?.to_device(&Device::Cpu)?);
            }
            let wave = m.decode(&frames)?;
            let n = wave.len();
            write_npz(
                &g.out,
                &[
                    (
                        "gen_codes",
                        frames_tensor(&frames, m.codec().codes_per_frame())?,
                    ),
                    ("gen_hidden", Tensor::stack(&hidden, 0)?),
                    ("gen_waveform", Tensor::from_vec(wave, n, &Device::Cpu)?),
                ],
            )?;
        }
        DevCommand::RandomCheckpoint { preset, out, seed } => {
            let dir = write_random_checkpoint(&out, preset, seed)?;
            println!("{}", dir.display());
        }
    }
    Ok(())
}
