//! `voxtrald bench`: where the time goes, as medians over several runs in one process.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use clap::Args;
use serde::Serialize;

use super::ModelArgs;
use crate::engine::{Destination, Engine, EngineConfig, Event, SpeechRequest};
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
    /// Concurrent utterances, spoken by the engine as the daemon's clients' jobs are (shared
    /// backbone steps and flow passes), e.g. `1,4,16`: reports each count's real-time factor
    /// per stream and throughput, one model load for all.
    #[arg(long, value_delimiter = ',')]
    streams: Vec<usize>,
}

#[derive(Serialize)]
struct StreamsRun {
    streams: usize,
    frames_per_stream: usize,
    wall_s: f64,
    /// When the last of the streams had its first audio, from submission.
    first_audio_max_s: f64,
    /// The most streams that shared one decoding step (this engine's run so far).
    widest_step: usize,
    /// The most prompts prefilled in one pass (this engine's run so far).
    widest_prefill: usize,
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

/// `n` utterances (same text, other seeds) spoken by the engine as client jobs, each read by
/// its own consumer thread as a client would: the daemon's path, prefills and codec included.
fn streams_run(a: &BenchArgs, engine: &Engine, n: usize) -> anyhow::Result<StreamsRun> {
    let start = Instant::now();
    let jobs = (0..n)
        .map(|i| {
            let mut r = SpeechRequest::new(a.text.clone(), a.voice.clone());
            r.max_frames = a.frames;
            r.seed = i as u64;
            r.destination = Destination::Client;
            engine.submit(r)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let outcomes: Vec<anyhow::Result<(f64, usize, usize)>> = std::thread::scope(|s| {
        let readers: Vec<_> = jobs
            .into_iter()
            .map(|mut job| {
                s.spawn(move || {
                    let (mut first, mut samples) = (None, 0);
                    while let Some(ev) = job.recv() {
                        match ev {
                            Event::Audio { samples: x, .. } => {
                                first.get_or_insert(start.elapsed().as_secs_f64());
                                samples += x.len();
                            }
                            Event::Finished { frames, .. } => {
                                return Ok((first.unwrap_or(f64::NAN), samples, frames))
                            }
                            Event::Failed { reason } | Event::Cancelled { reason } => {
                                anyhow::bail!("a stream ended early: {reason}")
                            }
                            Event::Started
                            | Event::Sentence { .. }
                            | Event::Word { .. }
                            | Event::Mark { .. } => {}
                        }
                    }
                    anyhow::bail!("a stream ended without finishing")
                })
            })
            .collect();
        readers
            .into_iter()
            .map(|r| {
                r.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("reader panicked")))
            })
            .collect()
    });
    let outcomes = outcomes.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let wall_s = start.elapsed().as_secs_f64();
    let rate = engine.model().sample_rate() as f64;
    let shortest = outcomes
        .iter()
        .map(|o| o.1 as f64 / rate)
        .fold(f64::INFINITY, f64::min)
        .max(1e-9);
    Ok(StreamsRun {
        streams: n,
        frames_per_stream: outcomes.iter().map(|o| o.2).min().unwrap_or(0),
        wall_s,
        first_audio_max_s: outcomes.iter().map(|o| o.0).fold(0.0, f64::max),
        widest_step: engine.widest_step(),
        widest_prefill: engine.widest_prefill(),
        rtf_per_stream: wall_s / shortest,
        audio_s_per_s: outcomes.iter().map(|o| o.1 as f64 / rate).sum::<f64>() / wall_s,
    })
}

fn run_streams(a: &BenchArgs) -> anyhow::Result<()> {
    let model = Arc::new(a.model.load()?);
    let mut results = Vec::new();
    for &n in &a.streams {
        // A fresh engine per count, so its widest step is this count's.
        let engine = Engine::new(
            model.clone(),
            EngineConfig {
                max_streams: n.max(1),
                ..Default::default()
            },
        );
        // Timed from a ready engine, as a daemon's clients find it.
        engine.wait_ready();
        let runs = (0..a.runs.max(1))
            .map(|_| streams_run(a, &engine, n.max(1)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let wall = median(runs.iter().map(|r| r.wall_s).collect());
        let r = runs
            .into_iter()
            .min_by(|x, y| (x.wall_s - wall).abs().total_cmp(&(y.wall_s - wall).abs()))
            .expect("at least one run");
        if !a.json {
            eprintln!(
                "{} streams x {} frames: {:.2} s, RTF per stream {:.3}, {:.2} s of audio per second, \
                 last first audio {:.2} s, widest step {}, widest prefill {}",
                r.streams,
                r.frames_per_stream,
                r.wall_s,
                r.rtf_per_stream,
                r.audio_s_per_s,
                r.first_audio_max_s,
                r.widest_step,
                r.widest_prefill
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
    /// The first run's first audio: the process's first utterance, before any warm-up (on a
    /// GPU: kernel modules loaded and cuBLAS set up on first use).
    cold_first_audio_s: f64,
    first_audio_frames: usize,
    backbone_ms_per_frame: f64,
    flow_ms_per_frame: f64,
    codec_ms_per_frame: f64,
    rtf: f64,
    peak_rss_bytes: u64,
    /// Memory bandwidth of the model's device, measured here (one thread's copy on the CPU, a
    /// device copy on a GPU; bytes read and written).
    copy_gb_per_s: f64,
    /// Weights read per frame by the backbone step and the flow head's Euler steps.
    backbone_bytes_per_frame: u64,
    flow_bytes_per_frame: u64,
    /// Those bytes at the measured bandwidth: the floor of each stage, and the stage's time
    /// over it.
    backbone_floor_ms: f64,
    flow_floor_ms: f64,
    backbone_over_floor: f64,
    flow_over_floor: f64,
    /// Heap allocations and their megabytes per generated frame (the frame loop and the
    /// codec; the prefill excluded), by the binary's counted allocator; null without it.
    allocations_per_frame: Option<f64>,
    allocated_mb_per_frame: Option<f64>,
    /// Allocations per frame over the second half of the frames, once the loop's buffers
    /// have grown (a chunk's decode among them).
    steady_allocations_per_frame: Option<f64>,
}

/// Memory bandwidth in GB/s of the device the model is on: the best of five copies of 256 MiB
/// (1 GiB on a GPU, whose caches are larger), bytes read plus written.
fn copy_bandwidth(device: &candle_core::Device) -> anyhow::Result<f64> {
    if device.is_cpu() {
        return Ok(host_copy_bandwidth());
    }
    let n = 256 << 20; // f32 elements
    let src = candle_core::Tensor::zeros(n, candle_core::DType::F32, device)?;
    // Into one buffer allocated beforehand: candle has no caching allocator, and timing a fresh
    // 1 GiB allocation with each copy gave 1.1 to 3.9 TB/s on one H200.
    let dst = candle_core::Tensor::zeros(n, candle_core::DType::F32, device)?;
    let mut best = f64::INFINITY;
    for _ in 0..6 {
        device.synchronize()?;
        let t = Instant::now();
        dst.slice_set(&src, 0, 0)?;
        device.synchronize()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n * 4) as f64 / best / 1e9)
}

fn host_copy_bandwidth() -> f64 {
    let n = 256 << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    2.0 * n as f64 / best / 1e9
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

struct Run {
    load_s: f64,
    prefill_s: f64,
    first_audio_s: f64,
    backbone_ms: f64,
    flow_ms: f64,
    codec_ms: f64,
    rtf: f64,
    /// Allocations and bytes per frame, where counted.
    heap: Option<Heap>,
    frames: usize,
    positions: usize,
}

/// What the frame loop allocated.
#[derive(Clone, Copy)]
struct Heap {
    per_frame: f64,
    mb_per_frame: f64,
    steady_per_frame: f64,
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
    // The heap counts after each frame, in room kept before counting starts.
    let mut after_frame = Vec::with_capacity(a.frames + 1);
    crate::heap::start_counting();
    let heap_before = crate::heap::counts();
    while let Some(f) = gen.next_frame()? {
        let t = Instant::now();
        let chunk = dec.push(model.codec(), &f.codes)?;
        codec_s += t.elapsed().as_secs_f64();
        if let Some(c) = chunk {
            samples += c.len();
            first_audio.get_or_insert(start.elapsed().as_secs_f64());
        }
        if after_frame.len() < after_frame.capacity() {
            after_frame.push(crate::heap::counts());
        }
    }
    let t = Instant::now();
    samples += dec.flush(model.codec())?.len();
    codec_s += t.elapsed().as_secs_f64();
    let heap = heap_before
        .zip(crate::heap::counts())
        .map(|((n0, b0), (n1, b1))| {
            let per = gen.frames().max(1) as f64;
            // From the count after the first half's last frame to the count after the last.
            let half = after_frame.len() / 2;
            let steady = match (half.checked_sub(1), after_frame.last()) {
                (Some(h), Some(&Some((end, _)))) => after_frame[h].map_or(f64::NAN, |(at, _)| {
                    (end - at) as f64 / (after_frame.len() - half) as f64
                }),
                _ => f64::NAN,
            };
            Heap {
                per_frame: (n1 - n0) as f64 / per,
                mb_per_frame: (b1 - b0) as f64 / per / 1e6,
                steady_per_frame: steady,
            }
        });
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
        heap,
        frames: gen.frames(),
        positions: prompt.ids.len(),
    })
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    if !a.streams.is_empty() {
        return run_streams(&a);
    }
    let mut runs = Vec::new();
    let mut dtype = String::new();
    let mut reads = None;
    let mut on = None;
    for i in 0..a.runs.max(1) {
        let t = Instant::now();
        let model = a.model.load()?;
        let load_s = t.elapsed().as_secs_f64();
        on = Some(model.device().clone());
        dtype = format!("{:?}", model.dtype()).to_lowercase();
        reads = Some(crate::model::memory::frame_reads(
            model.config(),
            model.dtype(),
            a.model.quant,
        )?);
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
    let reads = reads.context("no run")?;
    let on = on.context("no run")?;
    let bw = copy_bandwidth(&on)?;
    let floor_ms = |bytes: u64| bytes as f64 / (bw * 1e9) * 1e3;
    let (backbone_ms, flow_ms) = (m(|r| r.backbone_ms), m(|r| r.flow_ms));
    let report = Report {
        device: format!("{on:?}"),
        dtype,
        quant: format!("{:?}", a.model.quant).to_lowercase(),
        runs: runs.len(),
        prompt_positions: runs[0].positions,
        frames: runs[0].frames,
        load_s: m(|r| r.load_s),
        prefill_s: m(|r| r.prefill_s),
        first_audio_s: m(|r| r.first_audio_s),
        cold_first_audio_s: runs[0].first_audio_s,
        first_audio_frames: ChunkSchedule::default().first,
        backbone_ms_per_frame: m(|r| r.backbone_ms),
        flow_ms_per_frame: m(|r| r.flow_ms),
        codec_ms_per_frame: m(|r| r.codec_ms),
        rtf: m(|r| r.rtf),
        peak_rss_bytes: crate::service::peak_rss_bytes(),
        copy_gb_per_s: bw,
        backbone_bytes_per_frame: reads.backbone,
        flow_bytes_per_frame: reads.flow,
        backbone_floor_ms: floor_ms(reads.backbone),
        flow_floor_ms: floor_ms(reads.flow),
        backbone_over_floor: backbone_ms / floor_ms(reads.backbone),
        flow_over_floor: flow_ms / floor_ms(reads.flow),
        allocations_per_frame: runs[0]
            .heap
            .map(|_| m(|r| r.heap.map_or(f64::NAN, |h| h.per_frame))),
        allocated_mb_per_frame: runs[0]
            .heap
            .map(|_| m(|r| r.heap.map_or(f64::NAN, |h| h.mb_per_frame))),
        steady_allocations_per_frame: runs[0]
            .heap
            .map(|_| m(|r| r.heap.map_or(f64::NAN, |h| h.steady_per_frame))),
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
        println!(
            "  copy bandwidth {:.1} GB/s: backbone floor {:.1} ms ({:.2}x), flow head floor {:.1} ms ({:.2}x)",
            report.copy_gb_per_s,
            report.backbone_floor_ms,
            report.backbone_over_floor,
            report.flow_floor_ms,
            report.flow_over_floor
        );
        if let (Some(n), Some(mb), Some(steady)) = (
            report.allocations_per_frame,
            report.allocated_mb_per_frame,
            report.steady_allocations_per_frame,
        ) {
            println!("  heap: {n:.1} allocations, {mb:.2} MB a frame; {steady:.2} a frame in the second half");
        }
    }
    Ok(())
}
