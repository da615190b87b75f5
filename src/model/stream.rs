//! Streaming codec decoding: frames go in as they are generated, audio comes out in chunks.
//! The codec keeps its own left context ([`CodecState`]), so each chunk costs only its new
//! frames and the concatenated chunks equal a full decode.

use super::codec::{CodecDecoder, CodecState};
use crate::error::Result;

/// How many frames each chunk holds: a short first chunk for fast first audio, then longer
/// ones that amortize per-call overhead.
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
            ramp: 8,
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
    state: Option<CodecState>,
    pending: Vec<Vec<u32>>,
    decoded: usize,
}

impl StreamingDecoder {
    pub fn new(schedule: ChunkSchedule) -> Self {
        Self {
            schedule,
            state: None,
            pending: Vec::new(),
            decoded: 0,
        }
    }

    /// Adds a frame; returns a chunk of samples when the schedule says one is due.
    pub fn push(&mut self, codec: &CodecDecoder, frame: Vec<u32>) -> Result<Option<Vec<f32>>> {
        self.pending.push(frame);
        if self.pending.len() >= self.schedule.chunk_len(self.decoded) {
            return self.flush(codec).map(Some);
        }
        Ok(None)
    }

    /// Decodes whatever is pending (possibly nothing).
    pub fn flush(&mut self, codec: &CodecDecoder) -> Result<Vec<f32>> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let state = self.state.get_or_insert_with(|| codec.start());
        let out = codec.decode_chunk(state, &self.pending, None)?;
        self.decoded += self.pending.len();
        self.pending.clear();
        Ok(out)
    }
}
