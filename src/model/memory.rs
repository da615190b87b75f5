//! The memory a model needs on its device, worked out from `params.json` before any weight is
//! read, so that a device that is too small is refused with a clear message up front instead
//! of failing (or being OOM-killed) halfway through loading.

use candle_core::{DType, Device};

use super::checkpoint::{manifest, Expect};
use super::config::ModelConfig;
use super::nn::{block_format, Quant};
use crate::error::{Error, Result};

/// Room for what is not a weight or the KV cache: prefill activations, the codec's chunk,
/// cuBLAS workspaces and allocator slack on a GPU.
const WORKING_CPU: u64 = 512 << 20;
const WORKING_GPU: u64 = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub weights: u64,
    /// The KV cache filled to the context limit.
    pub kv_cache: u64,
    pub working: u64,
}

impl MemoryPlan {
    pub fn total(&self) -> u64 {
        self.weights + self.kv_cache + self.working
    }
}

/// Bytes in GiB, or MiB below one GiB, with two decimals, for messages.
pub fn gib(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// How the loaders store a tensor of `elems` values in rows of `row` (the last dimension):
/// ggml blocks for the backbone's and flow head's projections under `--quant` (the format
/// `nn::block_format` picks), f32 for norms and the semantic head, the compute dtype
/// otherwise. Weight-norm pairs fold into one conv weight; the codebook's usage counts fold
/// into its embeddings.
fn stored_bytes(name: &str, elems: u64, row: usize, dtype: DType, quant: Quant) -> u64 {
    let is_projection = !name.starts_with("audio_tokenizer.")
        && (name.contains(".attention.w") || name.contains(".feed_forward.w"))
        || name == "acoustic_transformer.llm_projection.weight";
    if name.ends_with(".original0") || name.ends_with(".cluster_usage") {
        0
    } else if let Some(format) = is_projection
        .then(|| block_format(quant, name.trim_end_matches(".weight"), row))
        .flatten()
    {
        elems / format.block_size() as u64 * format.type_size() as u64
    } else if name.starts_with("mm_audio_embeddings.") {
        // Kept in the file's dtype when narrower: bf16 in the official checkpoint, which this
        // plan assumes (a file with f32 tables loaded in f32 takes up to 0.75 GiB more).
        elems * dtype.size_in_bytes().min(2) as u64
    } else if name.ends_with("norm.weight")
        || name.ends_with("semantic_codebook_output.weight")
        || name.ends_with(".embedding_sum")
    {
        elems * 4
    } else {
        elems * dtype.size_in_bytes() as u64
    }
}

/// What loading `cfg` with these options takes on `device`.
pub fn plan(
    cfg: &ModelConfig,
    dtype: DType,
    quant: Quant,
    max_positions: usize,
    device: &Device,
) -> Result<MemoryPlan> {
    let weights = manifest(cfg)?
        .iter()
        .map(|(name, expect)| {
            let (elems, row): (usize, usize) = match expect {
                Expect::Exact(shape) => {
                    (shape.iter().product(), shape.last().copied().unwrap_or(1))
                }
                Expect::RowsAtLeast { min_rows, cols } => (min_rows * cols, *cols),
            };
            stored_bytes(name, elems as u64, row, dtype, quant)
        })
        .sum();
    let kv_cache = (max_positions * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim) as u64
        * dtype.size_in_bytes() as u64;
    let working = if device.is_cpu() {
        WORKING_CPU
    } else {
        WORKING_GPU
    };
    Ok(MemoryPlan {
        weights,
        kv_cache,
        working,
    })
}

/// Bytes of weights one frame reads: the backbone's layers once (one step) and the flow head's
/// layers once per Euler step; what a frame costs at least when the weights stream from
/// memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameReads {
    pub backbone: u64,
    pub flow: u64,
}

pub fn frame_reads(cfg: &ModelConfig, dtype: DType, quant: Quant) -> Result<FrameReads> {
    let mut reads = FrameReads {
        backbone: 0,
        flow: 0,
    };
    for (name, expect) in manifest(cfg)? {
        let Expect::Exact(shape) = &expect else {
            continue;
        };
        let elems = shape.iter().product::<usize>() as u64;
        let row = shape.last().copied().unwrap_or(1);
        let bytes = stored_bytes(&name, elems, row, dtype, quant);
        if name.starts_with("layers.") {
            reads.backbone += bytes;
        } else if name.starts_with("acoustic_transformer.layers.") {
            reads.flow += bytes;
        }
    }
    reads.flow *= cfg.flow().n_decoding_steps as u64;
    Ok(reads)
}

/// Memory free for a new model on `device`: free GPU memory, or the kernel's `MemAvailable`
/// on the CPU. `None` when it cannot be told.
pub fn available(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => d
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _total)| free as u64),
        #[allow(unreachable_patterns)]
        _ => None,
    }
}

/// Refuses a load that would not fit: `limit` (a user's cap) or the device's free memory,
/// whichever is smaller.
pub fn check(plan: &MemoryPlan, device: &Device, limit: Option<u64>) -> Result<()> {
    let free = available(device);
    let budget = match (free, limit) {
        (Some(f), Some(l)) => Some(f.min(l)),
        (f, l) => f.or(l),
    };
    let Some(budget) = budget else {
        return Ok(());
    };
    if plan.total() <= budget {
        return Ok(());
    }
    let source = match (free, limit) {
        (_, Some(l)) if l == budget => "the --max-memory limit".to_string(),
        _ => "free on the device".to_string(),
    };
    Err(Error::InsufficientMemory {
        device: format!("{device:?}"),
        need: format!(
            "{} ({} weights, {} KV cache, {} working)",
            gib(plan.total()),
            gib(plan.weights),
            gib(plan.kv_cache),
            gib(plan.working)
        ),
        have: format!("{} {source}", gib(budget)),
    })
}

/// Refuses one more stream when its KV cache would not fit: under `limit`, the weights, the
/// working room and a full cache for each of the `live` streams and the new one; on the device,
/// a full cache in what is free now (the live caches already hold theirs).
pub fn check_stream(
    plan: &MemoryPlan,
    live: usize,
    device: &Device,
    limit: Option<u64>,
) -> Result<()> {
    let refuse = |have: String| Error::StreamMemory {
        device: format!("{device:?}"),
        streams: live,
        cache: gib(plan.kv_cache),
        have,
    };
    if let Some(l) = limit {
        let need = plan.weights + plan.working + (live as u64 + 1) * plan.kv_cache;
        if need > l {
            return Err(refuse(format!(
                "{} would be needed and the --max-memory limit is {}",
                gib(need),
                gib(l)
            )));
        }
    }
    match available(device) {
        Some(free) if free < plan.kv_cache => Err(refuse(format!("{} is free", gib(free)))),
        _ => Ok(()),
    }
}

/// How many streams' KV caches fit beside the model under `limit`; `None` without a limit.
pub fn streams_that_fit(plan: &MemoryPlan, limit: Option<u64>) -> Option<usize> {
    let room = limit?.checked_sub(plan.weights + plan.working)?;
    Some((room / plan.kv_cache.max(1)) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::{params_json, Preset};

    fn full() -> ModelConfig {
        serde_json::from_value(params_json(Preset::Full)).unwrap()
    }

    #[test]
    fn full_model_fits_the_issue_budgets() {
        let cfg = full();
        // Two minutes of audio: 1500 frames plus a long prompt.
        let positions = 2048;
        let cuda = Device::Cpu; // the weights' sizes do not depend on the device
        let bf16 = plan(&cfg, DType::BF16, Quant::None, positions, &cuda).unwrap();
        let q8 = plan(&cfg, DType::BF16, Quant::Q8, positions, &cuda).unwrap();
        let f32 = plan(&cfg, DType::F32, Quant::None, positions, &cuda).unwrap();
        let q4 = plan(&cfg, DType::BF16, Quant::Q4, positions, &cuda).unwrap();
        let g = |b: u64| b as f64 / (1u64 << 30) as f64;
        eprintln!("full preset, 2048 positions: bf16 {bf16:?}, q8 {q8:?}, f32 {f32:?}");
        // ~4.0 B parameters: about 7.5 GiB in bf16, twice that in f32.
        assert!((7.0..8.5).contains(&g(bf16.weights)), "{}", g(bf16.weights));
        // f32 doubles everything but the embedding tables, which stay in the file's bf16.
        assert!((1.8..2.0).contains(&(g(f32.weights) / g(bf16.weights))));
        assert!(g(q8.weights) < 5.0, "{}", g(q8.weights));
        assert!(
            // Half of the projections in 5 bits instead of 8.5; tables and codec unchanged.
            g(q4.weights) < g(q8.weights) * 0.9,
            "{} {}",
            g(q4.weights),
            g(q8.weights)
        );
        eprintln!("full preset q4 weights {:.2} GiB", g(q4.weights));
        assert!(g(bf16.kv_cache) < 0.5);
        assert!(g(bf16.total()) < 10.0);
    }

    #[test]
    fn refuses_when_the_limit_is_below_the_plan() {
        let p = MemoryPlan {
            weights: 3 << 30,
            kv_cache: 1 << 28,
            working: 1 << 29,
        };
        let err = check(&p, &Device::Cpu, Some(1 << 30))
            .unwrap_err()
            .to_string();
        assert!(err.contains("3.75 GiB"), "{err}");
        assert!(err.contains("1.00 GiB the --max-memory limit"), "{err}");
        if available(&Device::Cpu).is_some_and(|free| free > p.total()) {
            assert!(check(&p, &Device::Cpu, Some(8 << 30)).is_ok());
        }
    }

    #[test]
    fn each_live_stream_counts_one_full_cache() {
        let p = MemoryPlan {
            weights: 1 << 30,
            kv_cache: 1 << 26,
            working: 1 << 29,
        };
        let limit = Some(p.weights + p.working + 3 * p.kv_cache);
        assert_eq!(streams_that_fit(&p, limit), Some(3));
        assert_eq!(streams_that_fit(&p, None), None);
        for live in 0..3 {
            assert!(
                check_stream(&p, live, &Device::Cpu, limit).is_ok(),
                "{live}"
            );
        }
        let err = check_stream(&p, 3, &Device::Cpu, limit)
            .unwrap_err()
            .to_string();
        assert!(err.contains("another stream"), "{err}");
        assert!(err.contains("3 running"), "{err}");
        assert!(err.contains("64.00 MiB"), "{err}");
        assert!(err.contains("max_streams"), "{err}");
    }
}
