//! Preset voices: `voice_embedding/<name>.pt`, a `torch.save`d bare tensor `[rows, dim]` whose
//! rows replace the `[AUDIO]` placeholders of the prompt.

use std::io::{BufReader, Read};
use std::path::Path;

use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// Reads the single tensor stored in a torch zip archive as f32 `[rows, cols]`. A damaged
/// file is an error naming it, also where candle's pickle reader would panic on it (an
/// overflowing integer opcode, say).
pub fn read_voice_file(path: &Path, voice: &str, dim: usize) -> Result<Tensor> {
    std::panic::catch_unwind(|| read(path, voice, dim)).unwrap_or_else(|payload| {
        Err(Error::Voice {
            path: path.into(),
            voice: voice.into(),
            reason: format!(
                "damaged file (the reader failed: {})",
                crate::error::panic_message(payload.as_ref())
            ),
        })
    })
}

fn read(path: &Path, voice: &str, dim: usize) -> Result<Tensor> {
    let bad = |reason: String| Error::Voice {
        path: path.into(),
        voice: voice.into(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .map_err(|e| bad(format!("not a torch zip archive: {e}")))?;
    let names: Vec<String> = zip
        .file_names()
        .map(|n| n.map(|n| n.into_owned()))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| bad(format!("unreadable archive directory: {e}")))?;
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| bad("archive has no data.pkl".into()))?
        .clone();
    let dir = pkl.strip_suffix(".pkl").unwrap_or(&pkl).to_owned();
    let obj = {
        let member = zip
            .by_name(&pkl)
            .map_err(|e| bad(format!("cannot read {pkl}: {e}")))?;
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut BufReader::new(member))
            .map_err(|e| bad(format!("cannot parse {pkl}: {e}")))?;
        stack
            .finalize()
            .map_err(|e| bad(format!("cannot parse {pkl}: {e}")))?
    };
    let info = obj
        .into_tensor_info(Object::Unicode("voice".into()), Path::new(&dir))
        .map_err(|e| bad(format!("{pkl} does not describe a tensor: {e}")))?
        .ok_or_else(|| bad(format!("{pkl} does not hold a bare tensor")))?;
    let dims = info.layout.shape().dims().to_vec();
    if dims.len() != 2 || dims[1] != dim {
        return Err(bad(format!(
            "tensor has shape {dims:?}, expected [rows, {dim}]"
        )));
    }
    if !info.layout.is_contiguous() {
        return Err(bad("tensor is not contiguous".into()));
    }
    if !matches!(info.dtype, DType::BF16 | DType::F16 | DType::F32) {
        return Err(bad(format!(
            "tensor dtype {:?} is not a float type",
            info.dtype
        )));
    }
    let mut raw = Vec::new();
    zip.by_name(&info.path)
        .map_err(|e| bad(format!("archive lacks the tensor data {}: {e}", info.path)))?
        .read_to_end(&mut raw)
        .map_err(|e| bad(format!("cannot read {}: {e}", info.path)))?;
    let elem = info.dtype.size_in_bytes();
    let start = info.layout.start_offset() * elem;
    let len = dims[0] * dims[1] * elem;
    if raw.len() < start + len {
        return Err(bad(format!(
            "tensor data is {} bytes, shape {dims:?} needs {}",
            raw.len(),
            start + len
        )));
    }
    let t = Tensor::from_raw_buffer(&raw[start..start + len], info.dtype, &dims, &Device::Cpu)?;
    Ok(t.to_dtype(DType::F32)?)
}
