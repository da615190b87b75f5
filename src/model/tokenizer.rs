//! Tekken, Mistral's tiktoken-style byte-level BPE: ids are `rank + num_special`, the first
//! `num_special` ids are control tokens, and special-looking strings in text are plain text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use fancy_regex::Regex;
use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Deserialize)]
struct TekkenFile {
    config: TekkenConfig,
    vocab: Vec<VocabEntry>,
    #[serde(default)]
    special_tokens: Vec<SpecialEntry>,
    #[serde(default)]
    audio: Option<AudioSection>,
}

#[derive(Deserialize)]
struct TekkenConfig {
    pattern: String,
    default_vocab_size: usize,
    default_num_special_tokens: usize,
}

#[derive(Deserialize)]
struct VocabEntry {
    rank: usize,
    token_bytes: String,
}

#[derive(Deserialize)]
struct SpecialEntry {
    rank: u32,
    token_str: String,
}

#[derive(Deserialize)]
struct AudioSection {
    #[serde(default)]
    voice_num_audio_tokens: HashMap<String, usize>,
}

pub struct Tekken {
    path: PathBuf,
    split: Regex,
    ranks: HashMap<Vec<u8>, u32>,
    bytes_of: Vec<Vec<u8>>,
    num_special: u32,
    specials: HashMap<String, u32>,
    voice_rows: HashMap<String, usize>,
}

impl Tekken {
    pub fn from_file(path: &Path) -> Result<Self> {
        let bad = |reason: String| Error::Tokenizer {
            path: path.into(),
            reason,
        };
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let file: TekkenFile = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        let split = Regex::new(&file.config.pattern)
            .map_err(|e| bad(format!("config.pattern does not compile: {e}")))?;
        let num_special = file.config.default_num_special_tokens;
        let usable = file
            .config
            .default_vocab_size
            .checked_sub(num_special)
            .ok_or_else(|| bad("default_vocab_size < default_num_special_tokens".into()))?;
        let n = usable.min(file.vocab.len());
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut bytes_of = Vec::with_capacity(n);
        let mut ranks = HashMap::with_capacity(n);
        for (i, entry) in file.vocab.iter().take(n).enumerate() {
            if entry.rank != i {
                return Err(bad(format!("vocab[{i}] has rank {}", entry.rank)));
            }
            let bytes = b64
                .decode(&entry.token_bytes)
                .map_err(|e| bad(format!("vocab[{i}].token_bytes: {e}")))?;
            ranks.insert(bytes.clone(), i as u32);
            bytes_of.push(bytes);
        }
        for b in 0..=255u8 {
            if !ranks.contains_key(&vec![b]) {
                return Err(bad(format!("vocab lacks the single byte {b:#04x}")));
            }
        }
        let specials = file
            .special_tokens
            .into_iter()
            .map(|s| (s.token_str, s.rank))
            .collect();
        Ok(Tekken {
            path: path.into(),
            split,
            ranks,
            bytes_of,
            num_special: num_special as u32,
            specials,
            voice_rows: file
                .audio
                .map(|a| a.voice_num_audio_tokens)
                .unwrap_or_default(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Id of a control token such as `[BEGIN_AUDIO]`.
    pub fn special(&self, name: &str) -> Result<u32> {
        self.specials
            .get(name)
            .copied()
            .ok_or_else(|| Error::Tokenizer {
                path: self.path.clone(),
                reason: format!("no special token {name}"),
            })
    }

    /// `audio.voice_num_audio_tokens`: placeholder rows per preset voice.
    pub fn voice_rows(&self) -> &HashMap<String, usize> {
        &self.voice_rows
    }

    /// Text to ids, without BOS/EOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < text.len() {
            // The pattern covers any input; a backtracking-limit failure falls back to one
            // character so encoding never fails or stalls.
            let piece = match self.split.find_from_pos(text, pos) {
                Ok(Some(m)) if m.start() == pos && m.end() > pos => m.as_str(),
                _ => {
                    let ch = text[pos..].chars().next().map_or(1, char::len_utf8);
                    &text[pos..pos + ch]
                }
            };
            pos += piece.len();
            self.encode_piece(piece.as_bytes(), &mut out);
        }
        out
    }

    fn encode_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        if let Some(&r) = self.ranks.get(piece) {
            out.push(r + self.num_special);
            return;
        }
        for r in byte_pair_merge(&self.ranks, piece) {
            out.push(r + self.num_special);
        }
    }

    /// Ids to text: control tokens are skipped, invalid UTF-8 replaced.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if id < self.num_special {
                continue;
            }
            if let Some(b) = self.bytes_of.get((id - self.num_special) as usize) {
                bytes.extend_from_slice(b);
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// tiktoken's merge rule: repeatedly join the adjacent pair whose concatenation has the lowest
/// rank (leftmost on ties) until no adjacent pair is in the vocabulary.
fn byte_pair_merge(ranks: &HashMap<Vec<u8>, u32>, piece: &[u8]) -> Vec<u32> {
    // parts[i] = start offset of part i; a sentinel end at piece.len().
    let mut parts: Vec<usize> = (0..=piece.len()).collect();
    let pair_rank = |parts: &[usize], i: usize| -> Option<u32> {
        if i + 2 < parts.len() {
            ranks.get(&piece[parts[i]..parts[i + 2]]).copied()
        } else {
            None
        }
    };
    let mut pr: Vec<Option<u32>> = (0..parts.len()).map(|i| pair_rank(&parts, i)).collect();
    loop {
        let mut best: Option<(u32, usize)> = None;
        for (i, r) in pr.iter().enumerate().take(parts.len().saturating_sub(2)) {
            if let Some(r) = *r {
                if best.is_none_or(|(b, _)| r < b) {
                    best = Some((r, i));
                }
            }
        }
        let Some((_, i)) = best else { break };
        parts.remove(i + 1);
        pr.remove(i + 1);
        pr[i] = pair_rank(&parts, i);
        if i > 0 {
            pr[i - 1] = pair_rank(&parts, i - 1);
        }
    }
    parts
        .windows(2)
        .map(|w| ranks[&piece[w[0]..w[1]]])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_lowest_rank_first() {
        let mut ranks = HashMap::new();
        for b in 0..=255u8 {
            ranks.insert(vec![b], b as u32);
        }
        // "bc" ranks below "ab": "abc" must become a + bc, not ab + c.
        ranks.insert(b"bc".to_vec(), 300);
        ranks.insert(b"ab".to_vec(), 301);
        assert_eq!(byte_pair_merge(&ranks, b"abc"), vec![b'a' as u32, 300]);
        ranks.insert(b"abc".to_vec(), 302);
        assert_eq!(byte_pair_merge(&ranks, b"abc"), vec![302]);
    }
}
