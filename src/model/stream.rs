//! Streaming codec decoding: frames go in as they are generated, audio comes out in chunks.
//! The codec keeps its own left context ([`CodecState`]), so each chunk costs only its new
//! frames and the concatenated chunks equal a full decode.

use super::codec::{CodecDecoder, CodecState};
use super::frame::FrameCodes;
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
    pending: Vec<FrameCodes>,
    decoded: usize,
    /// The latest chunk's samples, in a buffer kept from chunk to chunk.
    samples: Vec<f32>,
}

impl StreamingDecoder {
    pub fn new(schedule: ChunkSchedule) -> Self {
        let longest = schedule
            .first
            .max(schedule.ramp)
            .max(schedule.steady)
            .max(1);
        Self {
            schedule,
            state: None,
            pending: Vec::with_capacity(longest),
            decoded: 0,
            samples: Vec::new(),
        }
    }

    /// Adds a frame (its codes with the +2 offset); returns a chunk of samples when the
    /// schedule says one is due. The samples stay in a buffer the decoder reuses for the next
    /// chunk, so that the loop allocates nothing once it has grown.
    pub fn push(&mut self, codec: &CodecDecoder, frame: &[u32]) -> Result<Option<&[f32]>> {
        let codes = FrameCodes::from_slice(frame).ok_or_else(|| {
            crate::Error::InvalidCodes(format!("a frame of {} codes", frame.len()))
        })?;
        self.pending.push(codes);
        if self.pending.len() >= self.schedule.chunk_len(self.decoded) {
            return self.flush(codec).map(Some);
        }
        Ok(None)
    }

    /// Decodes whatever is pending (possibly nothing).
    pub fn flush(&mut self, codec: &CodecDecoder) -> Result<&[f32]> {
        self.samples.clear();
        if self.pending.is_empty() {
            return Ok(&self.samples);
        }
        let state = self.state.get_or_insert_with(|| codec.start());
        codec.decode_chunk_into(state, &self.pending, None, &mut self.samples)?;
        self.decoded += self.pending.len();
        self.pending.clear();
        Ok(&self.samples)
    }
}
