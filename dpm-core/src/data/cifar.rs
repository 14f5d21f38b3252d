//! The CIFAR-10 binary format: `data_batch_1.bin` … `data_batch_5.bin` and
//! `test_batch.bin`, each a run of 3073-byte records: one label byte, then the
//! 32×32 red, green and blue planes.

use std::path::Path;

use super::Dataset;
use crate::error::{Error, Result};

/// Bytes of one record.
pub const CIFAR10_RECORD: usize = 1 + 3 * 32 * 32;

fn bad(path: &Path, reason: String) -> Error {
    Error::Data {
        path: path.display().to_string(),
        reason,
    }
}

/// Reads one CIFAR-10 batch file. A file that is not a whole number of records,
/// or holds a label above 9, is an error naming it.
pub fn read_cifar10_file(path: &Path) -> Result<Dataset> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    if bytes.is_empty() || bytes.len() % CIFAR10_RECORD != 0 {
        return Err(bad(
            path,
            format!(
                "{} bytes is not a whole number of {CIFAR10_RECORD}-byte CIFAR-10 records (truncated or not CIFAR-10)",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / CIFAR10_RECORD;
    let mut ds = Dataset {
        pixels: Vec::with_capacity(n * (CIFAR10_RECORD - 1)),
        labels: Vec::with_capacity(n),
        shape: [3, 32, 32],
        classes: 10,
    };
    for (i, rec) in bytes.chunks_exact(CIFAR10_RECORD).enumerate() {
        if rec[0] > 9 {
            return Err(bad(
                path,
                format!("record {i} has label {}, CIFAR-10 labels are 0–9", rec[0]),
            ));
        }
        ds.labels.push(rec[0]);
        ds.pixels.extend_from_slice(&rec[1..]);
    }
    Ok(ds)
}

/// Reads a CIFAR-10 directory: `(training set, test set)`.
pub fn read_cifar10(dir: &Path) -> Result<(Dataset, Dataset)> {
    if !dir.is_dir() {
        return Err(bad(
            dir,
            "not a directory; expected CIFAR-10 binary files (data_batch_1.bin … test_batch.bin)".into(),
        ));
    }
    let mut train = Dataset::default();
    for i in 1..=5 {
        train.extend(read_cifar10_file(&dir.join(format!("data_batch_{i}.bin")))?);
    }
    let test = read_cifar10_file(&dir.join("test_batch.bin"))?;
    Ok((train, test))
}
