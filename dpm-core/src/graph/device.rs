//! Devices and their mapping to Caffe2's `DeviceOption`.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::proto::DeviceOption;

/// Kind of device; the key, with the op type, of the kernel registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DeviceType {
    /// Host CPU.
    Cpu,
    /// NVIDIA GPU.
    Cuda,
}

impl DeviceType {
    /// The Caffe2 enum value (`CPU = 0`, `CUDA = 1`).
    pub fn proto_value(self) -> i32 {
        match self {
            DeviceType::Cpu => 0,
            DeviceType::Cuda => 1,
        }
    }
}

impl fmt::Display for DeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceType::Cpu => "CPU",
            DeviceType::Cuda => "CUDA",
        })
    }
}

/// One device a replica of the model runs on. Several CPU "devices" on one host are
/// independent replicas sharing the host's cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Device {
    /// CPU device `n`.
    Cpu(u32),
    /// CUDA GPU `n`.
    Cuda(u32),
}

impl Device {
    /// CPU device `n`.
    pub fn cpu(n: u32) -> Self {
        Device::Cpu(n)
    }

    /// CUDA GPU `n`.
    pub fn cuda(n: u32) -> Self {
        Device::Cuda(n)
    }

    /// The device type.
    pub fn device_type(self) -> DeviceType {
        match self {
            Device::Cpu(_) => DeviceType::Cpu,
            Device::Cuda(_) => DeviceType::Cuda,
        }
    }

    /// The ordinal.
    pub fn ordinal(self) -> u32 {
        match self {
            Device::Cpu(n) | Device::Cuda(n) => n,
        }
    }

    /// The name scope of this device's replica: `cpu_N` or `gpu_N`, as in Caffe2.
    pub fn namescope(self) -> String {
        match self {
            Device::Cpu(n) => format!("cpu_{n}"),
            Device::Cuda(n) => format!("gpu_{n}"),
        }
    }

    /// The Caffe2 `DeviceOption` of this device.
    pub fn to_proto(self) -> DeviceOption {
        DeviceOption {
            device_type: Some(self.device_type().proto_value()),
            cuda_gpu_id: match self {
                Device::Cpu(_) => None,
                Device::Cuda(n) => Some(n as i32),
            },
            random_seed: None,
        }
    }

    /// The device a `DeviceOption` names. CPU options carry no ordinal in Caffe2, so
    /// they map to `Cpu(0)`; dpm tells CPU replicas apart by name scope.
    pub fn from_proto(d: &DeviceOption) -> Result<Self> {
        match d.device_type.unwrap_or(0) {
            0 => Ok(Device::Cpu(0)),
            1 => Ok(Device::Cuda(d.cuda_gpu_id.unwrap_or(0).max(0) as u32)),
            t => Err(Error::arg(
                "device_option.device_type",
                format!("{t} is not a known device type (0 = CPU, 1 = CUDA)"),
            )),
        }
    }
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu(n) => write!(f, "cpu:{n}"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = Error;

    /// Parses `cpu:N` or `cuda:N` (also `gpu:N`).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::arg("device", format!("`{s}` is not a device; write cpu:N or cuda:N"));
        let (kind, n) = s.trim().split_once(':').ok_or_else(bad)?;
        let n: u32 = n.parse().map_err(|_| bad())?;
        match kind {
            "cpu" => Ok(Device::Cpu(n)),
            "cuda" | "gpu" => Ok(Device::Cuda(n)),
            _ => Err(bad()),
        }
    }
}
