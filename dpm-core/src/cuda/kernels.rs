//! dpm's own CUDA C kernels (`kernels.cu`): compiled with NVRTC once per process
//! and architecture, then loaded once per GPU.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

/// The CUDA C source of every small kernel dpm launches.
pub const SOURCE: &str = include_str!("kernels.cu");

/// Every kernel name [`SOURCE`] defines (`extern "C" __global__`), in order.
pub fn names() -> Vec<&'static str> {
    SOURCE
        .split("__global__ void ")
        .skip(1)
        .filter_map(|s| s.split('(').next())
        .map(str::trim)
        .collect()
}

/// Whether the NVRTC library can be loaded on this machine.
pub fn nvrtc_available() -> bool {
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Compiles [`SOURCE`] to PTX for `compute_{major}{minor}`; cached per process.
/// Errors carry NVRTC's log (the line of a typo).
pub fn ptx(major: i32, minor: i32) -> Result<String, String> {
    static CACHE: OnceLock<Mutex<HashMap<(i32, i32), String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    if let Some(p) = cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(major, minor))
    {
        return Ok(p.clone());
    }
    if !nvrtc_available() {
        return Err(
            "libnvrtc could not be loaded; install the CUDA NVRTC library (CUDA 13) \
                    or add its folder to LD_LIBRARY_PATH"
                .into(),
        );
    }
    // CompileOptions takes a &'static str; one leak per architecture, ever.
    let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
    let opts = CompileOptions {
        arch: Some(arch),
        // IEEE division and square root, no flush to zero: the CPU kernels' results.
        prec_div: Some(true),
        prec_sqrt: Some(true),
        ftz: Some(false),
        ..Default::default()
    };
    let ptx = super::gpu::guarded(|| {
        compile_ptx_with_opts(SOURCE, opts)
            .map_err(|e| crate::Error::Config(format!("compiling kernels.cu: {e}")))
    })?
    .to_src();
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert((major, minor), ptx.clone());
    Ok(ptx)
}
