//! What the convolution benches share: ResNet-20's convolutions on CIFAR.

/// Images per batch.
pub const BATCH: usize = 32;

/// Every distinct convolution of ResNet-20 on CIFAR: (name, in channels, out
/// channels, kernel, stride, input side). Padding is `kernel / 2`.
pub const SHAPES: [(&str, usize, usize, usize, usize, usize); 8] = [
    ("conv1_3x3_3to16_32px", 3, 16, 3, 1, 32),
    ("3x3_16to16_32px", 16, 16, 3, 1, 32),
    ("3x3s2_16to32_32px", 16, 32, 3, 2, 32),
    ("1x1s2_16to32_32px", 16, 32, 1, 2, 32),
    ("3x3_32to32_16px", 32, 32, 3, 1, 16),
    ("3x3s2_32to64_16px", 32, 64, 3, 2, 16),
    ("1x1s2_32to64_16px", 32, 64, 1, 2, 16),
    ("3x3_64to64_8px", 64, 64, 3, 1, 8),
];
