//! Checkpoint files: named tensors in the safetensors format (readable by PyTorch,
//! JAX, candle, …), written atomically so a crash never leaves a torn file.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Dtype, SafeTensors, TensorView, View};

use crate::error::{Error, Result};
use crate::tensor::{DataType, Tensor};

/// The contents of a checkpoint file: named tensors (sorted by name) and metadata.
#[derive(Clone, Debug, Default)]
pub struct Contents {
    /// `(name, tensor)` pairs.
    pub tensors: Vec<(String, Tensor)>,
    /// String metadata stored in the header.
    pub metadata: HashMap<String, String>,
}

/// Metadata key naming the writer.
const FORMAT_KEY: &str = "format";
const FORMAT: &str = "dpm-checkpoint-1";

struct AsView<'a>(&'a Tensor);

impl View for AsView<'_> {
    fn dtype(&self) -> Dtype {
        match self.0.dtype() {
            DataType::F32 => Dtype::F32,
            DataType::I32 => Dtype::I32,
            DataType::I64 => Dtype::I64,
        }
    }

    fn shape(&self) -> &[usize] {
        self.0.dims()
    }

    fn data(&self) -> Cow<'_, [u8]> {
        // Little-endian element bytes, as safetensors specifies.
        fn le<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            v.iter().flat_map(|&x| f(x)).collect()
        }
        Cow::Owned(match self.0.dtype() {
            DataType::F32 => le(self.0.data::<f32>().unwrap_or_default(), f32::to_le_bytes),
            DataType::I32 => le(self.0.data::<i32>().unwrap_or_default(), i32::to_le_bytes),
            DataType::I64 => le(self.0.data::<i64>().unwrap_or_default(), i64::to_le_bytes),
        })
    }

    fn data_len(&self) -> usize {
        self.0.nbytes()
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `tensors` to `path`: to a temporary file beside it, flushed to disk,
/// then renamed over `path`, so readers see the old file or the new one, never
/// a part.
pub fn save(path: &Path, tensors: &[(String, Tensor)], metadata: HashMap<String, String>) -> Result<()> {
    let mut metadata = metadata;
    metadata.insert(FORMAT_KEY.into(), FORMAT.into());
    let bytes = safetensors::serialize(
        tensors.iter().map(|(n, t)| (n.as_str(), AsView(t))),
        Some(metadata),
    )
    .map_err(|e| Error::Checkpoint {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    write_atomically(path, &bytes)
}

/// Writes `bytes` to `path` atomically: to a temporary file of its own beside
/// it, flushed to disk, then renamed over `path`, so readers see the old file or
/// the new one, never a part; on an error the temporary file is removed.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| Error::Checkpoint {
        path: path.display().to_string(),
        reason: "not a file path".into(),
    })?;
    let name = name.to_string_lossy();
    clean_stale_temps(dir, &name);
    // One temporary file per save (create-new): two saves to one path, from two
    // threads or processes, never write into the same file; the last rename wins.
    static SAVES: AtomicU64 = AtomicU64::new(0);
    let seq = SAVES.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp.{}.{seq}", std::process::id()));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, path).map_err(io(path))?;
        // Make the rename itself durable.
        if let Ok(d) = fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes temporary files that saves of `name` left in `dir` when their process
/// died mid-save (its pid no longer runs). Linux only: elsewhere they stay, and
/// are harmless, since every save writes a file of its own.
fn clean_stale_temps(dir: &Path, name: &str) {
    let proc = Path::new("/proc");
    if !proc.is_dir() {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let prefix = format!(".{name}.tmp");
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(rest) = file.to_str().and_then(|f| f.strip_prefix(&prefix)) else {
            continue;
        };
        // `.NAME.tmp.PID.SEQ`, or `.NAME.tmpPID` from earlier versions.
        let pid = rest
            .trim_start_matches('.')
            .split('.')
            .next()
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !proc.join(pid.to_string()).exists() {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Reads a checkpoint written by [`save`] (or any safetensors file of f32, i32
/// and i64 tensors). A truncated or corrupted file is an [`Error::Checkpoint`].
pub fn load(path: &Path) -> Result<Contents> {
    let bytes = fs::read(path).map_err(io(path))?;
    let bad = |reason: String| Error::Checkpoint {
        path: path.display().to_string(),
        reason,
    };
    let (_, meta) =
        SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a valid checkpoint: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a valid checkpoint: {e}")))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let mut out = Vec::new();
    let mut names = st.names();
    names.sort_unstable();
    for name in names {
        let view = st.tensor(name).map_err(|e| bad(e.to_string()))?;
        out.push((
            name.to_owned(),
            from_view(&view).map_err(|r| bad(format!("tensor `{name}`: {r}")))?,
        ));
    }
    Ok(Contents {
        tensors: out,
        metadata,
    })
}

fn from_view(v: &TensorView<'_>) -> std::result::Result<Tensor, String> {
    fn parse<T: crate::tensor::Element, const N: usize>(
        shape: &[usize],
        data: &[u8],
        f: fn([u8; N]) -> T,
    ) -> std::result::Result<Tensor, String> {
        let v: Vec<T> = data
            .chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunks_exact")))
            .collect();
        Tensor::from_vec(shape.to_vec(), v).ok_or_else(|| "data do not fill the shape".to_owned())
    }
    match v.dtype() {
        Dtype::F32 => parse(v.shape(), v.data(), f32::from_le_bytes),
        Dtype::I32 => parse(v.shape(), v.data(), i32::from_le_bytes),
        Dtype::I64 => parse(v.shape(), v.data(), i64::from_le_bytes),
        d => Err(format!("element type {d:?} is not supported (F32, I32, I64 are)")),
    }
}
