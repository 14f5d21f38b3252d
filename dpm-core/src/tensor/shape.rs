//! Tensor shapes: small inline vectors of dimensions, no heap for rank ≤ 6.

use std::fmt;

use smallvec::SmallVec;

/// Dimensions of a tensor, outermost first (NCHW for images).
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(SmallVec<[usize; 6]>);

impl Shape {
    /// The dimensions.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }

    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }

    /// Number of elements (1 for rank 0); `usize::MAX` when the product overflows,
    /// so an impossible shape never looks small (see [`Shape::checked_numel`]).
    pub fn numel(&self) -> usize {
        self.checked_numel().unwrap_or(usize::MAX)
    }

    /// Number of elements, or `None` when the product overflows `usize`.
    pub fn checked_numel(&self) -> Option<usize> {
        self.0.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }

    /// Product of the dimensions before `axis` and from `axis` on: how Caffe2 views a
    /// tensor as a matrix (`FC`'s `axis` argument). Saturates like [`Shape::numel`].
    pub fn split_at(&self, axis: usize) -> (usize, usize) {
        let axis = axis.min(self.rank());
        let prod = |d: &[usize]| {
            d.iter()
                .try_fold(1usize, |n, &x| n.checked_mul(x))
                .unwrap_or(usize::MAX)
        };
        (prod(&self.0[..axis]), prod(&self.0[axis..]))
    }
}

impl fmt::Debug for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{d}")?;
        }
        write!(f, "]")
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(SmallVec::from_slice(d))
    }
}

impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(SmallVec::from_vec(d))
    }
}

impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(SmallVec::from_slice(&d))
    }
}

impl From<&Shape> for Shape {
    fn from(s: &Shape) -> Self {
        s.clone()
    }
}
