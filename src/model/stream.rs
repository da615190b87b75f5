//! Streaming codec decoding: frames go in as they are generated, audio comes out in chunks.
//! Each chunk is decoded together with up to [`LEFT_CONTEXT_FRAMES`] earlier frames whose
//! samples are dropped, so the concatenated chunks equal a full decode.

use super::codec::{CodecDecoder, LEFT_CONTEXT_FRAMES};
use crate::error::Result;

/// How many frames each chunk holds: a short first chunk for fast first audio, then longer
/// ones that amortize the codec.
#[derive(Debug, Clone, Copy)]
pub struct ChunkSchedule {
    pub first: usize,
    pub ramp: usize,
    /// Decoded frames before chunks grow from `ramp` to `steady`.
    pub ramp_until: usize,
    pub steady: usize,
}

impl Default for ChunkSchedule {
    fn default() -> Self {
        Self {
            first: 2,
            ramp: 5,
            ramp_until: 25,
            steady: 25,
        }
    }
}

impl ChunkSchedule {
    /// Frames in the next chunk once `decoded` frames have been emitted.
    pub fn chunk_len(&self, decoded: usize) -> usize {
        if decoded == 0 {
            self.first
        } else if decoded < self.ramp_until {
            self.ramp
        } else {
            self.steady
        }
        .max(1)
    }
}

pub struct StreamingDecoder {
    schedule: ChunkSchedule,
    context: usize,
    /// Up to `context` already-decoded frames, then the pending ones.
    window: Vec<Vec<u32>>,
    pending: usize,
    decoded: usize,
}

impl StreamingDecoder {
    pub fn new(schedule: ChunkSchedule) -> Self {
        Self::with_context(schedule, LEFT_CONTEXT_FRAMES)
    }

    pub fn with_context(schedule: ChunkSchedule, context: usize) -> Self {
        Self {
            schedule,
            context,
            window: Vec::new(),
            pending: 0,
            decoded: 0,
        }
    }

    /// Frames decoded so far.
    pub fn decoded_frames(&self) -> usize {
        self.decoded
    }

    /// Adds a frame; returns a chunk of samples when the schedule says one is due.
    pub fn push(&mut self, codec: &CodecDecoder, frame: Vec<u32>) -> Result<Option<Vec<f32>>> {
        self.window.push(frame);
        self.pending += 1;
        if self.pending >= self.schedule.chunk_len(self.decoded) {
            return self.flush(codec).map(Some);
        }
        Ok(None)
    }

    /// Decodes whatever is pending (possibly nothing).
    pub fn flush(&mut self, codec: &CodecDecoder) -> Result<Vec<f32>> {
        if self.pending == 0 {
            return Ok(Vec::new());
        }
        let ctx = self.window.len() - self.pending;
        let samples = codec.decode_frames(&self.window, None)?;
        let skip = ctx * codec.samples_per_frame();
        let out = samples.get(skip..).unwrap_or_default().to_vec();
        self.decoded += self.pending;
        self.pending = 0;
        let keep = self.context.min(self.window.len());
        self.window.drain(..self.window.len() - keep);
        Ok(out)
    }
}
