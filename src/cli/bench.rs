//! `voxtrald bench`: where the time goes, as medians over several runs in one process.

use std::time::Instant;

use clap::Args;
use serde::Serialize;

use super::ModelArgs;
use crate::model::noise::SeededNoise;
use crate::model::stream::{ChunkSchedule, StreamingDecoder};
use crate::model::{GenerateOptions, Voxtral};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Frames to generate per run.
    #[arg(long, default_value_t = 25)]
    frames: usize,
    /// Runs (each loads the model and synthesizes once); medians are reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value = "fr_male")]
    voice: String,
    #[arg(
        long,
        default_value = "The quick brown fox jumps over the lazy dog near the river."
    )]
    text: String,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Concurrent utterances decoded together (shared backbone steps and flow passes), e.g.
    /// `1,4,16`: reports each count's real-time factor per stream, one model load for all.
    #[arg(long, value_delimiter = ',')]
    streams: Vec<usize>,
}

#[derive(Serialize)]
struct StreamsRun {
    streams: usize,
    frames_per_stream: usize,
    wall_s: f64,
    /// Wall time over the audio of one stream: below 1 keeps up with playback.
    rtf_per_stream: f64,
    /// Seconds of audio produced per second, all streams together.
    audio_s_per_s: f64,
}

#[derive(Serialize)]
struct StreamsReport {
    device: String,
    dtype: String,
    quant: String,
    runs: usize,
    results: Vec<StreamsRun>,
}

/// `n` utterances (same text, other seeds) from prefill to the last chunk, stepped together.
fn streams_run(a: &BenchArgs, model: &Voxtral, n: usize) -> anyhow::Result<StreamsRun> {
    let start = Instant::now();
    let prompt = model.prompt(&a.voice, &a.text)?;
    let opts = GenerateOptions {
        max_frames: a.frames,
        ..Default::default()
    };
    let mut gens = (0..n)
        .map(|i| model.start(&prompt, Box::new(SeededNoise::new(i as u64)), &opts))
        .collect::<Result<Vec<_>, _>>()?;
    let mut decs: Vec<_> = (0..n)
        .map(|_| StreamingDecoder::new(ChunkSchedule::default()))
        .collect();
    let mut samples = vec![0usize; n];
    loop {
        let mut refs: Vec<_> = gens.iter_mut().collect();
        let mut any = false;
        for (i, r) in model.next_frames(&mut refs)?.into_iter().enumerate() {
            if let Some(f) = r? {
                any = true;
                if let Some(c) = decs[i].push(model.codec(), f.codes)? {
                    samples[i] += c.len();
                }
            }
        }
        if !any {
            break;
        }
    }
    for (d, s) in decs.iter_mut().zip(&mut samples) {
        *s += d.flush(model.codec())?.len();
    }
    let wall_s = start.elapsed().as_secs_f64();
    let audio: Vec<f64> = samples
        .iter()
        .map(|&s| s as f64 / model.sample_rate() as f64)
        .collect();
    let per_stream = audio
        .iter()
        .cloned()
        .fold(f64::INFINITY, f64::min)
        .max(1e-9);
    Ok(StreamsRun {
        streams: n,
        frames_per_stream: gens.iter().map(|g| g.frames()).min().unwrap_or(0),
        wall_s,
        rtf_per_stream: wall_s / per_stream,
        audio_s_per_s: audio.iter().sum::<f64>() / wall_s,
    })
}

fn run_streams(a: &BenchArgs) -> anyhow::Result<()> {
    let model = a.model.load()?;
    let mut results = Vec::new();
    for &n in &a.streams {
        let runs = (0..a.runs.max(1))
            .map(|_| streams_run(a, &model, n.max(1)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let wall = median(runs.iter().map(|r| r.wall_s).collect());
        let r = runs
            .into_iter()
            .min_by(|x, y| (x.wall_s - wall).abs().total_cmp(&(y.wall_s - wall).abs()))
            .expect("at least one run");
        if !a.json {
            eprintln!(
                "{} streams x {} frames: {:.2} s, RTF per stream {:.3}, {:.2} s of audio per second",
                r.streams, r.frames_per_stream, r.wall_s, r.rtf_per_stream, r.audio_s_per_s
            );
        }
        results.push(r);
    }
    let report = StreamsReport {
        device: format!("{:?}", model.device()),
        dtype: format!("{:?}", model.dtype()).to_lowercase(),
        quant: format!("{:?}", a.model.quant).to_lowercase(),
        runs: a.runs.max(1),
        results,
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

#[derive(Serialize, Default, Clone)]
struct Report {
    device: String,
    dtype: String,
    quant: String,
    runs: usize,
    prompt_positions: usize,
    frames: usize,
    load_s: f64,
    prefill_s: f64,
    first_audio_s: f64,
    first_audio_frames: usize,
    backbone_ms_per_frame: f64,
    flow_ms_per_frame: f64,
    codec_ms_per_frame: f64,
    rtf: f64,
    peak_rss_bytes: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident set size of this process (`VmHWM`), in bytes.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

struct Run {
    load_s: f64,
    prefill_s: f64,
    first_audio_s: f64,
    backbone_ms: f64,
    flow_ms: f64,
    codec_ms: f64,
    rtf: f64,
    frames: usize,
    positions: usize,
}

fn one_run(a: &BenchArgs, model: &Voxtral, load_s: f64) -> anyhow::Result<Run> {
    let schedule = ChunkSchedule::default();
    let start = Instant::now();
    let prompt = model.prompt(&a.voice, &a.text)?;
    let opts = GenerateOptions {
        max_frames: a.frames,
        ..Default::default()
    };
    let mut gen = model.start(&prompt, Box::new(SeededNoise::new(0)), &opts)?;
    let mut dec = StreamingDecoder::new(schedule);
    let mut first_audio = None;
    let mut codec_s = 0.0;
    let mut samples = 0usize;
    while let Some(f) = gen.next_frame()? {
        let t = Instant::now();
        let chunk = dec.push(model.codec(), f.codes)?;
        codec_s += t.elapsed().as_secs_f64();
        if let Some(c) = chunk {
            samples += c.len();
            first_audio.get_or_insert(start.elapsed().as_secs_f64());
        }
    }
    let t = Instant::now();
    samples += dec.flush(model.codec())?.len();
    codec_s += t.elapsed().as_secs_f64();
    let total = start.elapsed().as_secs_f64();
    let frames = gen.frames().max(1);
    let tm = gen.timings;
    Ok(Run {
        load_s,
        prefill_s: tm.prefill.as_secs_f64(),
        first_audio_s: first_audio.unwrap_or(total),
        backbone_ms: tm.backbone.as_secs_f64() * 1e3 / tm.backbone_steps.max(1) as f64,
        flow_ms: tm.flow.as_secs_f64() * 1e3 / frames as f64,
        codec_ms: codec_s * 1e3 / frames as f64,
        rtf: total / (samples as f64 / model.sample_rate() as f64).max(1e-9),
        frames: gen.frames(),
        positions: prompt.ids.len(),
    })
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if !a.streams.is_empty() {
        return run_streams(&a);
    }
    let mut runs = Vec::new();
    let (mut device, mut dtype) = (String::new(), String::new());
    for i in 0..a.runs.max(1) {
        let t = Instant::now();
        let model = a.model.load()?;
        let load_s = t.elapsed().as_secs_f64();
        device = format!("{:?}", model.device());
        dtype = format!("{:?}", model.dtype()).to_lowercase();
        let r = one_run(&a, &model, load_s)?;
        if !a.json {
            eprintln!(
                "run {}: load {:.2} s, prefill {:.3} s, first audio {:.3} s, backbone {:.1} ms/frame, flow {:.1} ms/frame, codec {:.1} ms/frame, RTF {:.2}",
                i + 1, r.load_s, r.prefill_s, r.first_audio_s, r.backbone_ms, r.flow_ms, r.codec_ms, r.rtf
            );
        }
        runs.push(r);
    }
    let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let report = Report {
        device,
        dtype,
        quant: format!("{:?}", a.model.quant).to_lowercase(),
        runs: runs.len(),
        prompt_positions: runs[0].positions,
        frames: runs[0].frames,
        load_s: m(|r| r.load_s),
        prefill_s: m(|r| r.prefill_s),
        first_audio_s: m(|r| r.first_audio_s),
        first_audio_frames: ChunkSchedule::default().first,
        backbone_ms_per_frame: m(|r| r.backbone_ms),
        flow_ms_per_frame: m(|r| r.flow_ms),
        codec_ms_per_frame: m(|r| r.codec_ms),
        rtf: m(|r| r.rtf),
        peak_rss_bytes: peak_rss_bytes(),
    };
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "median of {} runs ({}, {}; {} prompt positions, {} frames):\n  load {:.2} s\n  prefill {:.3} s\n  first audio {:.3} s (after {} frames)\n  backbone {:.1} ms/frame\n  flow head {:.1} ms/frame\n  codec {:.1} ms/frame\n  real-time factor {:.2}\n  peak RSS {:.2} GiB",
            report.runs, report.device, report.dtype, report.prompt_positions, report.frames,
            report.load_s, report.prefill_s, report.first_audio_s, report.first_audio_frames,
            report.backbone_ms_per_frame, report.flow_ms_per_frame, report.codec_ms_per_frame,
            report.rtf, report.peak_rss_bytes as f64 / (1u64 << 30) as f64
        );
    }
    Ok(())
}
