//! Where the model runs and in which dtype, as a user names them (`auto`, `cpu`, `cuda:1`;
//! `auto`, `f32`, `bf16`), and opening that device.

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// A device by name: `auto` is the first CUDA device in a CUDA build that has one, else the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum DeviceChoice {
    #[default]
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Cuda(n)),
                _ => Err(format!(
                    "unknown device {s:?} (expected auto, cpu, cuda or cuda:N)"
                )),
            },
        }
    }
}

impl TryFrom<String> for DeviceChoice {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl DeviceChoice {
    /// Opens the device. `auto` falls back to the CPU with a warning when no CUDA device can
    /// be opened; an explicit `cuda` fails with what is missing.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Auto if candle_core::utils::cuda_is_available() => Ok(open_cuda(0)
                .unwrap_or_else(|e| {
                    tracing::warn!("no usable CUDA device, using the CPU: {e}");
                    Device::Cpu
                })),
            Self::Auto => Ok(Device::Cpu),
            Self::Cuda(n) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::Device(format!(
                        "device cuda:{n}: this voxtrald was built without CUDA support (build \
                         with --features cuda)"
                    )));
                }
                open_cuda(n)
            }
        }
    }
}

/// Opens CUDA device `n`. CUDA builds load libcuda, cuBLAS and cuRAND at run time, and cudarc
/// panics when one of them cannot be loaded; that becomes an error here instead.
fn open_cuda(n: usize) -> Result<Device> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| Device::new_cuda(n));
    std::panic::set_hook(hook);
    match opened {
        Ok(dev) => dev.map_err(|e| Error::Device(format!("cannot open CUDA device {n}: {e}"))),
        Err(panic) => {
            let msg = crate::error::panic_message(panic.as_ref());
            // cudarc appends every file name it tried; the first sentence says what is missing.
            let msg = msg.split(" - searched for").next().unwrap_or(&msg);
            Err(Error::Device(format!(
                "cannot open CUDA device {n}: {msg} (needs the NVIDIA driver and the CUDA 13 \
                 libraries on the loader path, e.g. LD_LIBRARY_PATH)"
            )))
        }
    }
}

/// The compute dtype as a user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeChoice {
    /// bf16 on a GPU, f32 on the CPU (where candle's bf16 matmul is slow).
    #[default]
    Auto,
    F32,
    Bf16,
}

impl DtypeChoice {
    pub fn resolve(self, device: &Device) -> DType {
        match self {
            Self::Auto if device.is_cpu() => DType::F32,
            Self::Auto | Self::Bf16 => DType::BF16,
            Self::F32 => DType::F32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_names_parse() {
        assert_eq!("cuda".parse(), Ok(DeviceChoice::Cuda(0)));
        assert_eq!("cuda:2".parse(), Ok(DeviceChoice::Cuda(2)));
        assert_eq!("cpu".parse(), Ok(DeviceChoice::Cpu));
        assert!("tpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
        assert_eq!(DeviceChoice::Cuda(1).to_string(), "cuda:1");
    }
}
