//! `voxtrald dev`: model-developer commands with a stable contract, used to compare this
//! implementation with reference ones. All compute in f32 on the CPU unless told otherwise
//! (`--device auto` and `--dtype auto` mean the CPU and f32 here).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::{Args, Subcommand};
use serde::Serialize;

use super::ModelArgs;
use crate::atomic::write_atomic_path;
use crate::model::device::{DeviceChoice, DtypeChoice};
use crate::model::flow::FlowTrace;
use crate::model::noise::{InjectedNoise, SeededNoise};
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
    /// Compare a device/dtype/quantization against the f32 CPU path: cosine similarity of
    /// hidden states and waveforms, semantic and acoustic code agreement (teacher-forced on
    /// the reference codes). Fails when a cosine is below --min-cos or a semantic code differs.
    Compare(CompareArgs),
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

#[derive(Args)]
pub struct CompareArgs {
    /// The candidate (the reference is always the CPU in f32, unquantized).
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value = "Hello world, this is a device comparison.")]
    text: String,
    /// Default: the checkpoint's first voice.
    #[arg(long)]
    voice: Option<String>,
    #[arg(long, default_value_t = 12)]
    frames: usize,
    #[arg(long, default_value_t = 0.999)]
    min_cos: f64,
    /// Accept semantic codes that differ (quantized paths may move some).
    #[arg(long)]
    allow_code_changes: bool,
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

#[derive(Serialize)]
struct Comparison {
    device: String,
    dtype: String,
    quant: String,
    frames: usize,
    prefill_hidden_cos: f64,
    frame_hidden_cos_min: f64,
    semantic_codes_equal: usize,
    acoustic_codes_moved: usize,
    acoustic_max_level_diff: u32,
    waveform_cos: f64,
    waveform_max_abs_diff: f64,
    pass: bool,
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 && bb == 0.0 {
        return 1.0;
    }
    ab / (aa.sqrt() * bb.sqrt()).max(f64::MIN_POSITIVE)
}

fn flat(t: &Tensor) -> anyhow::Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()?)
}

fn compare(a: CompareArgs) -> anyhow::Result<()> {
    let mut reference_args = a.model.clone();
    reference_args.device = DeviceChoice::Cpu;
    reference_args.dtype = DtypeChoice::F32;
    reference_args.quant = Default::default();
    let reference = reference_args.load()?;
    let candidate = a.model.load()?;
    let voice = match &a.voice {
        Some(v) => v.clone(),
        None => reference
            .voices()
            .next()
            .map(|v| v.name.clone())
            .context("the checkpoint has no voices")?,
    };
    let prompts = (
        reference.prompt(&voice, &a.text)?,
        candidate.prompt(&voice, &a.text)?,
    );
    let prefill = |m: &Voxtral, p: &crate::model::Prompt| -> anyhow::Result<Vec<f32>> {
        let mut cache = m.backbone().new_cache();
        flat(&m.backbone().forward(&mut cache, &p.embeddings)?)
    };
    let prefill_hidden_cos = cosine(
        &prefill(&reference, &prompts.0)?,
        &prefill(&candidate, &prompts.1)?,
    );
    let opts = GenerateOptions {
        max_frames: a.frames,
        cfg_alpha: DEFAULT_CFG_ALPHA,
    };
    let mut gr = reference.start(&prompts.0, Box::new(SeededNoise::new(a.seed)), &opts)?;
    let mut gc = candidate.start(&prompts.1, Box::new(SeededNoise::new(a.seed)), &opts)?;
    let (mut frames, mut hidden_min, mut sem_equal, mut moved, mut max_diff) =
        (Vec::new(), 1f64, 0, 0, 0u32);
    while let Some(fr) = gr.next_frame()? {
        let Some(fc) = gc.next_frame()? else {
            break;
        };
        hidden_min = hidden_min.min(cosine(&flat(&gr.hidden()?)?, &flat(&gc.hidden()?)?));
        sem_equal += usize::from(fr.codes[0] == fc.codes[0]);
        for (x, y) in fr.codes[1..].iter().zip(&fc.codes[1..]) {
            moved += usize::from(x != y);
            max_diff = max_diff.max(x.abs_diff(*y));
        }
        gc.force_next_input(fr.codes);
        frames.push(fr.codes);
    }
    let wr = reference.decode(&frames)?;
    let wc = candidate.decode(&frames)?;
    let waveform_max_abs_diff = wr
        .iter()
        .zip(&wc)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let waveform_cos = cosine(&wr, &wc);
    let pass = !frames.is_empty()
        && prefill_hidden_cos >= a.min_cos
        && hidden_min >= a.min_cos
        && waveform_cos >= a.min_cos
        && (a.allow_code_changes || sem_equal == frames.len());
    let report = Comparison {
        device: format!("{:?}", candidate.device()),
        dtype: format!("{:?}", candidate.dtype()).to_lowercase(),
        quant: format!("{:?}", a.model.quant).to_lowercase(),
        frames: frames.len(),
        prefill_hidden_cos,
        frame_hidden_cos_min: hidden_min,
        semantic_codes_equal: sem_equal,
        acoustic_codes_moved: moved,
        acoustic_max_level_diff: max_diff,
        waveform_cos,
        waveform_max_abs_diff,
        pass,
    };
    println!("{}", serde_json::to_string(&report)?);
    if !pass {
        anyhow::bail!("the candidate does not match the f32 CPU path closely enough");
    }
    Ok(())
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

fn frames_tensor<F: AsRef<[u32]>>(frames: &[F], per_frame: usize) -> anyhow::Result<Tensor> {
    let v: Vec<i32> = frames
        .iter()
        .flat_map(|f| f.as_ref().iter().map(|&c| c as i32))
        .collect();
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
        if let Some(chunk) = dec.push(model.codec(), f)? {
            out.extend(chunk);
        }
    }
    out.extend(dec.flush(model.codec())?);
    Ok(out)
}

/// The reference contract: `auto` resolves to the CPU in f32.
fn exact(mut m: ModelArgs) -> ModelArgs {
    if m.device == DeviceChoice::Auto {
        m.device = DeviceChoice::Cpu;
    }
    if m.dtype == DtypeChoice::Auto {
        m.dtype = DtypeChoice::F32;
    }
    m
}

pub fn run(cmd: DevCommand) -> anyhow::Result<()> {
    match cmd {
        DevCommand::Compare(a) => compare(a)?,
        DevCommand::Tokenize { model, voice, text } => {
            let m = exact(model).load()?;
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
            let m = exact(model).load()?;
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
            let m = exact(model).load()?;
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
            let m = exact(model).load()?;
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
            let m = exact(g.model).load()?;
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
                hidden.push(
                    gen.hidden()?
                        .to_dtype(DType::F32)?
                        .to_device(&Device::Cpu)?,
                );
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
