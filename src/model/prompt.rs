//! The speech prompt for a preset voice, as mistral-common's `encode_speech_request` builds it:
//! `<s> [BEGIN_AUDIO] [AUDIO]*rows [NEXT_AUDIO_TEXT] text [REPEAT_AUDIO_TEXT] [BEGIN_AUDIO]`.

use crate::error::Result;
use crate::model::tokenizer::Tekken;

/// Control-token ids the prompt uses, resolved by name from `tekken.json`.
#[derive(Debug, Clone, Copy)]
pub struct PromptTokens {
    pub bos: u32,
    pub audio: u32,
    pub begin_audio: u32,
    pub next_audio_text: u32,
    pub repeat_audio_text: u32,
}

impl PromptTokens {
    pub fn from_tokenizer(tok: &Tekken) -> Result<Self> {
        Ok(Self {
            bos: tok.special("<s>")?,
            audio: tok.special("[AUDIO]")?,
            begin_audio: tok.special("[BEGIN_AUDIO]")?,
            next_audio_text: tok.special("[NEXT_AUDIO_TEXT]")?,
            repeat_audio_text: tok.special("[REPEAT_AUDIO_TEXT]")?,
        })
    }

    /// Positions the prompt takes around the voice rows and text.
    pub const OVERHEAD: usize = 5;

    pub fn build(&self, voice_rows: usize, text_ids: &[u32]) -> Vec<u32> {
        let mut ids = Vec::with_capacity(voice_rows + text_ids.len() + Self::OVERHEAD);
        ids.push(self.bos);
        ids.push(self.begin_audio);
        ids.extend(std::iter::repeat_n(self.audio, voice_rows));
        ids.push(self.next_audio_text);
        ids.extend_from_slice(text_ids);
        ids.push(self.repeat_audio_text);
        ids.push(self.begin_audio);
        ids
    }
}
