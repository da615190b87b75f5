//! One backbone layer's keys and values for one sequence. On the CPU in f32 they are host
//! rows that a step appends to in place, one position at a time without a tensor per
//! position; elsewhere they are candle's `KvCache`. A clone shares the buffers and keeps its
//! own length: a mark taken before a step (`StepMark`) reads only the positions before its
//! length, and the step writes only past it. A clone is a mark to go back to, not a fork:
//! two clones that both went on would write over each other's positions.

use std::sync::{Arc, RwLock, RwLockReadGuard};

use candle_core::{Device, Result, Tensor};
use candle_nn::kv_cache::KvCache;

/// The buffers grow by this many positions at a time.
pub const GROW: usize = 256;

#[derive(Clone)]
pub enum LayerCache {
    /// Candle's cache `[1, KV, capacity, hd]` (any device and dtype).
    Tensors(KvCache),
    Host(HostRows),
}

/// Keys and values as host rows, position-major: position `p`, kv head `h` at
/// `(p · KV + h) · hd`.
#[derive(Clone)]
pub struct HostRows {
    rows: Arc<RwLock<KeysValues>>,
    len: usize,
    /// Values per position: `KV · hd`.
    width: usize,
}

#[derive(Default)]
struct KeysValues {
    keys: Vec<f32>,
    values: Vec<f32>,
}

impl LayerCache {
    /// A cache in candle's tensors, for `append`.
    pub fn tensors() -> Self {
        Self::Tensors(KvCache::new(2, GROW))
    }

    /// A cache in host rows of `width` (`KV · hd`) values a position.
    pub fn host(width: usize) -> Self {
        Self::Host(HostRows {
            rows: Arc::default(),
            len: 0,
            width,
        })
    }

    /// Positions in the cache.
    pub fn len(&self) -> usize {
        match self {
            Self::Tensors(kv) => kv.current_seq_len(),
            Self::Host(h) => h.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `k` and `v` `[1, KV, s, hd]`; returns all the keys and values so far, in the
    /// same layout.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = match self {
            Self::Tensors(kv) => return kv.append(k, v),
            Self::Host(h) => h,
        };
        let (_, kv, s, hd) = k.dims4()?;
        if kv * hd != h.width || v.dims4()? != (1, kv, s, hd) {
            candle_core::bail!(
                "keys {:?} and values {:?} for a cache of {} values a position",
                k.dims(),
                v.dims(),
                h.width
            );
        }
        let rows = |t: &Tensor| t.transpose(1, 2)?.flatten_all()?.to_vec1::<f32>();
        h.push(&rows(k)?, &rows(v)?)?;
        let len = h.len;
        let all = |t: &[f32]| {
            Tensor::from_slice(&t[..len * h.width], (1, len, kv, hd), &Device::Cpu)?
                .to_dtype(k.dtype())?
                .transpose(1, 2)?
                .contiguous()
        };
        let rows = h.guard();
        Ok((all(&rows.keys)?, all(&rows.values)?))
    }

    /// The host rows, for [`HostRows::push`] and [`HostRows::read`]; `None` for a cache in
    /// tensors.
    pub fn host_rows(&mut self) -> Option<&mut HostRows> {
        match self {
            Self::Host(h) => Some(h),
            Self::Tensors(_) => None,
        }
    }
}

impl HostRows {
    /// Appends whole positions: `k` and `v` hold `KV · hd` values for each. Allocates only
    /// when the buffers grow (every [`GROW`] positions).
    pub fn push(&mut self, k: &[f32], v: &[f32]) -> Result<()> {
        if k.len() != v.len() || self.width == 0 || !k.len().is_multiple_of(self.width) {
            candle_core::bail!(
                "{} keys and {} values for a cache of {} values a position",
                k.len(),
                v.len(),
                self.width
            );
        }
        let at = self.len * self.width;
        let mut guard = self.rows.write().unwrap_or_else(|e| e.into_inner());
        let KeysValues { keys, values } = &mut *guard;
        for (buf, new) in [(keys, k), (values, v)] {
            // Past this cache's length lies only what a step that was rolled back wrote.
            buf.truncate(at);
            let want = at + new.len();
            if want > buf.capacity() {
                let grow = GROW * self.width;
                buf.reserve_exact(want.div_ceil(grow) * grow - buf.len());
            }
            buf.extend_from_slice(new);
        }
        drop(guard);
        self.len += k.len() / self.width;
        Ok(())
    }

    /// `f` on the keys and values of this cache's positions and their count.
    pub fn read<T>(&self, f: impl FnOnce(&[f32], &[f32], usize) -> T) -> T {
        let rows = self.guard();
        let n = self.len * self.width;
        f(&rows.keys[..n], &rows.values[..n], self.len)
    }

    fn guard(&self) -> RwLockReadGuard<'_, KeysValues> {
        // The rows are plain floats: a panic elsewhere leaves nothing inconsistent in them.
        self.rows.read().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, width: usize, base: f32) -> Vec<f32> {
        (0..n * width).map(|i| base + i as f32).collect()
    }

    /// Host rows and candle's cache hold the same keys and values after the same appends,
    /// a prefill's several positions and single steps alike, across a growth.
    #[test]
    fn host_rows_hold_what_candles_cache_holds() -> Result<()> {
        let (kv, hd) = (2, 3);
        let (mut host, mut tensors) = (LayerCache::host(kv * hd), LayerCache::tensors());
        let mut step = |s: usize, base: f32| -> Result<()> {
            let t = |b: f32| Tensor::from_vec(rows(s, kv * hd, b), (1, kv, s, hd), &Device::Cpu);
            let (k, v) = (t(base)?, t(-base)?);
            let (hk, hv) = host.append(&k, &v)?;
            let (tk, tv) = tensors.append(&k, &v)?;
            for (a, b) in [(hk, tk), (hv, tv)] {
                assert_eq!(a.dims(), b.dims());
                let flat = |t: Tensor| t.flatten_all()?.to_vec1::<f32>();
                assert_eq!(flat(a)?, flat(b)?);
            }
            Ok(())
        };
        step(5, 0.0)?;
        for i in 0..GROW {
            step(1, 100.0 * i as f32)?;
        }
        assert_eq!(host.len(), 5 + GROW);
        assert_eq!(tensors.len(), 5 + GROW);
        Ok(())
    }

    /// A clone taken before a step keeps seeing its own positions while the original writes
    /// past them; going back to it and stepping again overwrites the abandoned step.
    #[test]
    fn a_mark_keeps_its_positions() -> Result<()> {
        let width = 4;
        let mut cache = LayerCache::host(width);
        let rows_of = |c: &mut LayerCache| {
            c.host_rows()
                .expect("host")
                .read(|k, v, n| (k.to_vec(), v.to_vec(), n))
        };
        cache
            .host_rows()
            .expect("host")
            .push(&rows(3, width, 0.0), &rows(3, width, 50.0))?;
        let mut mark = cache.clone();
        let before = rows_of(&mut mark);
        cache
            .host_rows()
            .expect("host")
            .push(&rows(1, width, 7.0), &rows(1, width, 8.0))?;
        assert_eq!(rows_of(&mut cache).2, 4);
        assert_eq!(rows_of(&mut mark), before);
        // Back to the mark: the next step lands where the abandoned one did.
        let mut cache = mark;
        cache
            .host_rows()
            .expect("host")
            .push(&rows(1, width, 9.0), &rows(1, width, 10.0))?;
        let (k, v, n) = rows_of(&mut cache);
        assert_eq!(n, 4);
        assert_eq!(&k[..3 * width], &before.0[..]);
        assert_eq!(&k[3 * width..], &rows(1, width, 9.0)[..]);
        assert_eq!(&v[3 * width..], &rows(1, width, 10.0)[..]);
        // Wrong widths are errors, not panics.
        assert!(cache
            .host_rows()
            .expect("host")
            .push(&[1.0; 3], &[1.0; 3])
            .is_err());
        assert!(LayerCache::tensors().host_rows().is_none());
        Ok(())
    }
}
