//! One generated frame's codes, held inline: a frame goes from the flow head to the backbone's
//! next step and to the codec each 80 ms, and a vector for it would be one more allocation in
//! every frame of every stream.

use std::fmt;
use std::ops::Deref;

/// Most codes a frame may have: one semantic code and up to 63 acoustic ones (Voxtral TTS has
/// 36). A checkpoint with more is refused at load (`ModelConfig::validate`).
pub const MAX_FRAME_CODES: usize = 64;

/// A frame's codes with the model's +2 offset: the semantic code, then the acoustic ones.
/// Reads as a `[u32]`.
#[derive(Clone, Copy)]
pub struct FrameCodes {
    len: u8,
    codes: [u32; MAX_FRAME_CODES],
}

impl FrameCodes {
    /// No codes yet.
    pub const fn new() -> Self {
        Self {
            len: 0,
            codes: [0; MAX_FRAME_CODES],
        }
    }

    /// The codes of `codes`, or `None` when there are more than [`MAX_FRAME_CODES`].
    pub fn from_slice(codes: &[u32]) -> Option<Self> {
        let mut f = Self::new();
        f.codes.get_mut(..codes.len())?.copy_from_slice(codes);
        f.len = codes.len() as u8;
        Some(f)
    }

    /// Appends `code`; `false` (and nothing appended) when the frame is full.
    pub fn push(&mut self, code: u32) -> bool {
        let Some(slot) = self.codes.get_mut(self.len as usize) else {
            return false;
        };
        *slot = code;
        self.len += 1;
        true
    }
}

impl Default for FrameCodes {
    fn default() -> Self {
        Self::new()
    }
}

impl Deref for FrameCodes {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.codes[..self.len as usize]
    }
}

impl AsRef<[u32]> for FrameCodes {
    fn as_ref(&self) -> &[u32] {
        self
    }
}

impl PartialEq for FrameCodes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for FrameCodes {}

impl PartialEq<[u32]> for FrameCodes {
    fn eq(&self, other: &[u32]) -> bool {
        **self == *other
    }
}

impl PartialEq<Vec<u32>> for FrameCodes {
    fn eq(&self, other: &Vec<u32>) -> bool {
        **self == **other
    }
}

impl fmt::Debug for FrameCodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl Extend<u32> for FrameCodes {
    /// Appends codes until the frame is full; the rest are dropped (the caller sizes what it
    /// extends by the checked codebook count).
    fn extend<I: IntoIterator<Item = u32>>(&mut self, codes: I) {
        for c in codes {
            if !self.push(c) {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_as_the_slice_they_were_built_from() {
        let v: Vec<u32> = (0..37).map(|i| i * 3 + 1).collect();
        let f = FrameCodes::from_slice(&v).expect("37 fit");
        assert_eq!(&*f, v.as_slice());
        assert_eq!(f, v);
        let mut g = FrameCodes::new();
        g.push(v[0]);
        g.extend(v[1..].iter().copied());
        assert_eq!(f, g);
        g = FrameCodes::from_slice(&v[..36]).expect("36 fit");
        assert_ne!(f, g, "a shorter frame differs");
        assert_eq!(
            format!("{:?}", FrameCodes::from_slice(&[2, 5]).unwrap()),
            "[2, 5]"
        );
    }

    #[test]
    fn a_frame_holds_at_most_its_capacity() {
        let full: Vec<u32> = (0..MAX_FRAME_CODES as u32).collect();
        let mut f = FrameCodes::from_slice(&full).expect("exactly full");
        assert!(!f.push(7));
        assert_eq!(f.len(), MAX_FRAME_CODES);
        assert!(FrameCodes::from_slice(&[0; MAX_FRAME_CODES + 1]).is_none());
        f.extend([1, 2, 3]);
        assert_eq!(&*f, full.as_slice());
    }
}
