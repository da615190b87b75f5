//! Voxtral TTS: the checkpoint, the three networks, and the frame-by-frame generation loop.

pub mod backbone;
pub mod checkpoint;
pub mod codec;
mod codec_host;
pub mod config;
pub mod device;
pub mod few_rows;
pub mod flow;
pub mod frame;
mod generation;
pub mod host;
pub mod int4;
pub mod int8;
pub mod kv_cache;
pub mod memory;
pub mod nn;
pub mod noise;
pub mod panels;
pub mod prompt;
pub mod random;
pub mod stream;
pub mod tokenizer;
pub mod voice;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::tokenizer::Tekken;
use backbone::{Backbone, BackboneCache};
use checkpoint::{Weights, PARAMS_FILE, TOKENIZER_FILE, VOICE_DIR, WEIGHTS_FILE};
use codec::CodecDecoder;
use config::{ModelConfig, END_AUDIO};
use flow::AcousticHead;
use noise::NoiseSource;
use prompt::PromptTokens;

pub use frame::FrameCodes;
pub use generation::{
    Frame, GenerateOptions, Generation, Prefill, StepMark, StepTimings, StopReason, Streams,
};

/// Official serving limits: 4096 positions (prompt plus frames), 2048 frames.
pub const DEFAULT_MAX_POSITIONS: usize = 4096;
pub const DEFAULT_MAX_FRAMES: usize = 2048;
pub const DEFAULT_CFG_ALPHA: f32 = 1.2;
/// The strongest classifier-free guidance a request may ask for.
pub const MAX_CFG_ALPHA: f32 = 10.0;

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype: F32 (exact, default on CPU) or BF16.
    pub dtype: DType,
    pub max_positions: usize,
    /// Weight storage of the backbone and flow head (the codec stays dense).
    pub quant: nn::Quant,
    /// Refuse to load when the model would need more than this many bytes (the device's
    /// free memory is always a limit).
    pub max_memory: Option<u64>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            max_positions: DEFAULT_MAX_POSITIONS,
            quant: nn::Quant::None,
            max_memory: None,
        }
    }
}

/// One preset voice as the checkpoint describes it.
#[derive(Debug, Clone)]
pub struct VoiceInfo {
    pub name: String,
    /// ISO 639-1, from the preset catalogue (`voices/presets.toml`).
    pub language: String,
    /// `[AUDIO]` rows from `tekken.json`, if listed there.
    pub rows: Option<usize>,
    pub path: PathBuf,
}

/// How long each part of loading took, for benchmarks.
#[derive(Debug, Clone, Default)]
pub struct LoadTimings {
    pub total_s: f64,
}

pub struct Voxtral {
    dir: PathBuf,
    config: ModelConfig,
    tokenizer: Tekken,
    prompt_tokens: PromptTokens,
    backbone: Backbone,
    head: AcousticHead,
    codec: CodecDecoder,
    voices: BTreeMap<String, VoiceInfo>,
    voice_cache: Mutex<BTreeMap<String, Arc<Tensor>>>,
    /// Voices added at run time (the user's library), by name: their rows `[T + 1, dim]`.
    user_voices: std::sync::RwLock<BTreeMap<String, Arc<Tensor>>>,
    device: Device,
    dtype: DType,
    /// What the load was planned at, and the user's cap: each new stream's cache is checked
    /// against them.
    memory: memory::MemoryPlan,
    max_memory: Option<u64>,
    pub load_timings: LoadTimings,
    /// The frame step's bookkeeping, reused from frame to frame.
    frame_scratch: Mutex<generation::FrameScratch>,
}

/// A tokenized prompt and its input embeddings `[P, dim]`.
pub struct Prompt {
    pub ids: Vec<u32>,
    pub embeddings: Tensor,
}

impl Voxtral {
    /// Loads a checkpoint directory in the official layout. Every file and tensor is checked
    /// before any weight is converted.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let start = Instant::now();
        let params = dir.join(PARAMS_FILE);
        let config = ModelConfig::from_file(&params)?;
        let stages = config.codec_stages(&params)?;
        let need = memory::plan(
            &config,
            opts.dtype,
            opts.quant,
            opts.max_positions,
            &opts.device,
        )?;
        memory::check(&need, &opts.device, opts.max_memory)?;
        let weights = Weights::open(&dir.join(WEIGHTS_FILE), &config)?;
        let tokenizer = Tekken::from_file(&dir.join(TOKENIZER_FILE))?;
        let prompt_tokens = PromptTokens::from_tokenizer(&tokenizer)?;
        let a = config.audio();
        if prompt_tokens.audio != a.audio_token_id
            || prompt_tokens.begin_audio != a.begin_audio_token_id
            || prompt_tokens.bos != config.multimodal.bos_token_id
        {
            return Err(Error::Tokenizer {
                path: tokenizer.path().into(),
                reason: "special token ids disagree with params.json (audio_token_id, begin_audio_token_id, bos_token_id)".into(),
            });
        }
        let mut voices = BTreeMap::new();
        let names = config
            .codec()
            .voice
            .keys()
            .chain(tokenizer.voice_rows().keys());
        for name in names {
            voices.entry(name.clone()).or_insert_with(|| VoiceInfo {
                name: name.clone(),
                language: crate::library::catalogue().language_of(name),
                rows: tokenizer.voice_rows().get(name).copied(),
                path: dir.join(VOICE_DIR).join(format!("{name}.pt")),
            });
        }
        tracing::info!(
            dir = %dir.display(),
            layers = config.n_layers,
            dim = config.dim,
            dtype = ?opts.dtype,
            device = ?opts.device,
            "loading model"
        );
        // The embedding tables stay in the file's dtype when it is narrower than the compute
        // dtype: the rows a step gathers convert exactly as the whole table would, and the
        // 131k-row token table takes half the memory (0.75 GiB less in f32).
        let table_dtype = |name: &str| {
            weights
                .stored_dtype(name)
                .filter(|t| t.size_in_bytes() < opts.dtype.size_in_bytes())
                .unwrap_or(opts.dtype)
        };
        let table_dtypes = [
            table_dtype(backbone::TOKEN_TABLE),
            table_dtype(backbone::AUDIO_TABLE),
        ];
        let vb = weights.into_var_builder(opts.dtype, &opts.device);
        let t = Instant::now();
        let backbone = Backbone::load(
            vb.clone(),
            &config,
            opts.max_positions,
            opts.quant,
            table_dtypes,
        )?;
        tracing::info!(secs = t.elapsed().as_secs_f64(), "backbone loaded");
        let t = Instant::now();
        let head = AcousticHead::load(vb.pp("acoustic_transformer"), &config, opts.quant)?;
        tracing::info!(secs = t.elapsed().as_secs_f64(), "acoustic head loaded");
        let t = Instant::now();
        let codec = CodecDecoder::load(vb.pp("audio_tokenizer"), &config, &stages)?;
        tracing::info!(secs = t.elapsed().as_secs_f64(), "codec decoder loaded");
        Ok(Self {
            dir: dir.into(),
            config,
            tokenizer,
            prompt_tokens,
            backbone,
            head,
            codec,
            voices,
            voice_cache: Mutex::new(BTreeMap::new()),
            user_voices: Default::default(),
            device: opts.device.clone(),
            dtype: opts.dtype,
            memory: need,
            max_memory: opts.max_memory,
            load_timings: LoadTimings {
                total_s: start.elapsed().as_secs_f64(),
            },
            frame_scratch: Default::default(),
        })
    }

    /// Only the codec decoder of a checkpoint (f32 on `device`) and its sample rate: what
    /// cloning searches through, without the 3.4B backbone's memory.
    pub fn load_codec(dir: &Path, device: &Device) -> Result<(CodecDecoder, u32)> {
        let params = dir.join(PARAMS_FILE);
        let config = ModelConfig::from_file(&params)?;
        let stages = config.codec_stages(&params)?;
        let weights = Weights::open(&dir.join(WEIGHTS_FILE), &config)?;
        let vb = weights.into_var_builder(DType::F32, device);
        let codec = CodecDecoder::load(vb.pp("audio_tokenizer"), &config, &stages)?;
        Ok((codec, config.codec().sampling_rate))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }
    pub fn tokenizer(&self) -> &Tekken {
        &self.tokenizer
    }
    pub fn backbone(&self) -> &Backbone {
        &self.backbone
    }
    pub fn head(&self) -> &AcousticHead {
        &self.head
    }
    pub fn codec(&self) -> &CodecDecoder {
        &self.codec
    }
    /// Refuses one more stream beside `live` ones when its KV cache would not fit.
    pub fn room_for_stream(&self, live: usize) -> Result<()> {
        memory::check_stream(&self.memory, live, &self.device, self.max_memory)
    }

    /// How many streams fit under `--max-memory` (`None` without one).
    pub fn streams_that_fit(&self) -> Option<usize> {
        memory::streams_that_fit(&self.memory, self.max_memory)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn sample_rate(&self) -> u32 {
        self.config.codec().sampling_rate
    }
    pub fn samples_per_frame(&self) -> usize {
        self.codec.samples_per_frame()
    }
    pub fn voices(&self) -> impl Iterator<Item = &VoiceInfo> {
        self.voices.values()
    }

    /// A voice's prompt rows from its frame codes (model-side, +2 offset), as the official
    /// cloning path builds them: per frame the sum of its 37 code embeddings, then one
    /// end-of-audio frame `[1, 0, ..., 0]`. Returns f32 `[T + 1, dim]` on the model's device.
    pub fn voice_rows_from_codes(&self, frames: &[Vec<u32>]) -> Result<Tensor> {
        self.codec.valid_frames(frames).and_then(|n| {
            if n == frames.len() && n > 0 {
                Ok(())
            } else {
                Err(Error::InvalidCodes(
                    "voice codes must be whole frames with no end frame".into(),
                ))
            }
        })?;
        let mut end = vec![config::EMPTY_AUDIO; self.codec.codes_per_frame()];
        end[0] = END_AUDIO;
        let mut rows = Vec::with_capacity(frames.len() + 1);
        for f in frames.iter().chain(std::iter::once(&end)) {
            rows.push(self.backbone.embed_frame(f)?.to_dtype(DType::F32)?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// Adds or replaces a run-time voice (a user voice); a preset of the same name wins.
    pub fn set_user_voice(&self, name: &str, rows: Tensor) -> Result<()> {
        if rows.dims2()?.1 != self.config.dim {
            return Err(Error::InvalidCodes(format!(
                "voice rows have width {}, the model {}",
                rows.dim(1)?,
                self.config.dim
            )));
        }
        self.user_voices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), Arc::new(rows.to_device(&self.device)?));
        Ok(())
    }

    pub fn remove_user_voice(&self, name: &str) -> bool {
        self.user_voices
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .is_some()
    }

    /// Names of the run-time voices.
    pub fn user_voice_names(&self) -> Vec<String> {
        self.user_voices
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The voice's rows `[rows, dim]` (f32): a preset read once and checked against
    /// `tekken.json`, or a run-time voice.
    pub fn voice(&self, name: &str) -> Result<Arc<Tensor>> {
        if !self.voices.contains_key(name) {
            if let Some(t) = self
                .user_voices
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(name)
            {
                return Ok(t.clone());
            }
        }
        if let Some(t) = self
            .voice_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(t.clone());
        }
        let info = self.voices.get(name).ok_or_else(|| Error::UnknownVoice {
            voice: name.into(),
            available: self
                .voices
                .keys()
                .cloned()
                .chain(self.user_voice_names())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        let rows = voice::read_voice_file(&info.path, name, self.config.dim)?;
        let n = rows.dim(0)?;
        let expected = info.rows.ok_or_else(|| Error::Voice {
            path: self.tokenizer.path().into(),
            voice: name.into(),
            reason: "not listed in audio.voice_num_audio_tokens".into(),
        })?;
        if n != expected {
            return Err(Error::VoiceRows {
                path: info.path.clone(),
                voice: name.into(),
                rows: n,
                expected,
            });
        }
        let t = Arc::new(rows.to_device(&self.device)?);
        self.voice_cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.into(), t.clone());
        Ok(t)
    }

    /// Tokenizes `text` alone.
    pub fn encode_text(&self, text: &str) -> Vec<u32> {
        self.tokenizer.encode(text)
    }

    /// The full speech prompt ids for `voice` and `text`.
    pub fn prompt_ids(&self, voice: &str, text: &str) -> Result<Vec<u32>> {
        if text.trim().is_empty() {
            return Err(Error::EmptyText);
        }
        let rows = self.voice(voice)?.dim(0)?;
        Ok(self.prompt_tokens.build(rows, &self.encode_text(text)))
    }

    /// Prompt ids and embeddings, the voice rows placed at the `[AUDIO]` positions in order.
    pub fn prompt(&self, voice: &str, text: &str) -> Result<Prompt> {
        let ids = self.prompt_ids(voice, text)?;
        let needed = ids.len() + 1;
        if needed > self.backbone.max_positions() {
            return Err(Error::ContextOverflow {
                needed,
                limit: self.backbone.max_positions(),
            });
        }
        let rows = self.voice(voice)?;
        let ids_t = Tensor::new(ids.as_slice(), &self.device)?;
        let tok = self.backbone.embed_tokens(&ids_t)?.to_dtype(DType::F32)?;
        // Splice: text rows before the first [AUDIO], voice rows, then the rest.
        let first = ids
            .iter()
            .position(|&i| i == self.prompt_tokens.audio)
            .unwrap_or(ids.len());
        let n = rows.dim(0)?;
        let mut parts = vec![tok.narrow(0, 0, first)?];
        if n > 0 {
            parts.push((*rows).clone());
        }
        parts.push(tok.narrow(0, first + n, ids.len() - first - n)?);
        let embeddings = Tensor::cat(&parts, 0)?;
        Ok(Prompt { ids, embeddings })
    }

    /// Starts generating speech for a prompt: runs the prefill and returns the frame stepper.
    pub fn start<'m>(
        &'m self,
        prompt: &Prompt,
        noise: Box<dyn NoiseSource + 'm>,
        opts: &GenerateOptions,
    ) -> Result<Generation<'m>> {
        let prefill = self.prefill(&[prompt])?.remove(0);
        Ok(self.generation(prefill, noise, opts))
    }

    /// The prefills of several prompts in one pass over the weights (see
    /// `Backbone::prefill_batch`), each into its own cache.
    pub fn prefill(&self, prompts: &[&Prompt]) -> Result<Vec<Prefill>> {
        let t = Instant::now();
        let mut caches: Vec<BackboneCache> =
            prompts.iter().map(|_| self.backbone.new_cache()).collect();
        let embeds: Vec<Tensor> = prompts.iter().map(|p| p.embeddings.clone()).collect();
        let hidden = {
            let mut refs: Vec<&mut BackboneCache> = caches.iter_mut().collect();
            self.backbone.prefill_batch(&mut refs, &embeds)?
        };
        // A GPU runs the pass after the call returns: wait, so `took` is the pass's own time.
        self.device.synchronize()?;
        let took = t.elapsed();
        caches
            .into_iter()
            .zip(hidden)
            .map(|(cache, hidden)| {
                let p = hidden.dim(0)?;
                Ok(Prefill {
                    cache,
                    h: hidden.get(p - 1)?,
                    took,
                })
            })
            .collect()
    }

    /// Speaks one short sentence and throws it away. On a GPU the first utterance after a
    /// load pays for loading kernel modules and setting up cuBLAS (0.18 s of a 0.23 s first
    /// audio on an H200, against 0.055 s warm), which a server should pay before its first
    /// client rather than during it. Returns how long it took.
    pub fn warm_up(&self) -> Result<std::time::Duration> {
        let start = Instant::now();
        let voice = self
            .voices
            .keys()
            .next()
            .cloned()
            .or_else(|| self.user_voice_names().into_iter().next())
            .ok_or_else(|| Error::InvalidInput("the model has no voice to warm up with".into()))?;
        let prompt = self.prompt(&voice, "Hello.")?;
        let opts = GenerateOptions {
            max_frames: 2,
            ..Default::default()
        };
        let mut gen = self.start(&prompt, Box::new(noise::SeededNoise::new(0)), &opts)?;
        let mut dec = stream::StreamingDecoder::new(stream::ChunkSchedule::default());
        loop {
            match gen.next_frame() {
                Ok(Some(f)) => {
                    dec.push(&self.codec, &f.codes)?;
                }
                // A checkpoint whose first frame ends the audio has warmed all but the flow
                // head and the codec; that is all it can do.
                Ok(None) | Err(Error::NoAudio) => break,
                Err(e) => return Err(e),
            }
        }
        dec.flush(&self.codec)?;
        Ok(start.elapsed())
    }

    /// Decodes model-side frames (with the +2 offset) in one pass.
    pub fn decode<F: AsRef<[u32]> + Sync>(&self, frames: &[F]) -> Result<Vec<f32>> {
        self.codec.decode_frames(frames, None)
    }
}
