//! Training data: an in-memory image [`Dataset`], the CIFAR-10 binary reader
//! (`cifar.rs`), a learnable synthetic image set (`synthetic.rs`), a
//! prefetching image [`Loader`] that feeds a trainer (`loader.rs`), and
//! [`InMemory`], the general batch source over any samples held in memory
//! (`in_memory.rs`).

mod cifar;
mod in_memory;
mod loader;
mod synthetic;

pub use cifar::{read_cifar10, read_cifar10_file, CIFAR10_RECORD};
pub use in_memory::{InMemory, LastBatch};
pub use loader::{batch_tensors, Loader, LoaderConfig};
pub use synthetic::Synthetic;

/// Images as bytes (`N × C × H × W`, channel planes) with one label each.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Dataset {
    /// Pixel bytes, image after image.
    pub pixels: Vec<u8>,
    /// One class index per image.
    pub labels: Vec<u8>,
    /// Channels, height, width of every image.
    pub shape: [usize; 3],
    /// Number of classes.
    pub classes: usize,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes of one image.
    pub fn image_size(&self) -> usize {
        self.shape.iter().product()
    }

    /// The bytes of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let s = self.image_size();
        &self.pixels[i * s..(i + 1) * s]
    }

    /// Appends another dataset of the same geometry.
    pub fn extend(&mut self, other: Dataset) {
        self.pixels.extend(other.pixels);
        self.labels.extend(other.labels);
        self.shape = other.shape;
        self.classes = self.classes.max(other.classes);
    }
}
