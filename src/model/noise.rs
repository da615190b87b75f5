//! The flow-matching start noise: the only randomness in generation. Replaceable so tests can
//! inject the reference's arrays and users can fix a seed.

use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

pub trait NoiseSource: Send {
    /// Standard-normal values for frame `frame` (before scaling by `sigma_max`).
    fn frame(&mut self, frame: usize, n: usize) -> crate::Result<Vec<f32>>;
}

/// Seeded standard-normal noise.
pub struct SeededNoise(StdRng);

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }
}

impl NoiseSource for SeededNoise {
    fn frame(&mut self, _frame: usize, n: usize) -> crate::Result<Vec<f32>> {
        Ok((0..n).map(|_| StandardNormal.sample(&mut self.0)).collect())
    }
}

/// Fixed rows, row `i` for frame `i`; running past the last row is an error.
pub struct InjectedNoise {
    rows: Vec<Vec<f32>>,
}

impl InjectedNoise {
    pub fn new(rows: Vec<Vec<f32>>) -> Self {
        Self { rows }
    }
}

impl NoiseSource for InjectedNoise {
    fn frame(&mut self, frame: usize, n: usize) -> crate::Result<Vec<f32>> {
        let row = self.rows.get(frame).ok_or_else(|| {
            crate::Error::InvalidInput(format!(
                "injected noise has {} rows; frame {frame} needs another",
                self.rows.len()
            ))
        })?;
        if row.len() != n {
            return Err(crate::Error::InvalidInput(format!(
                "injected noise rows have {} values, expected {n}",
                row.len()
            )));
        }
        Ok(row.clone())
    }
}
