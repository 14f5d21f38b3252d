//! [`DeviceModel`] helpers for the layers beyond ResNet's: each adds the op of
//! Caffe2's name and arguments and works out the per-sample shape of what it
//! returns (axes here count per-sample dimensions: the batch is not one).

use super::device_model::DeviceModel;
use super::Blob;
use crate::error::{Error, Result};
use crate::graph::BlobRef;
use crate::model::Init;
use crate::tensor::Shape;

impl<'d> DeviceModel<'d> {
    /// Spatial batch normalisation `name` with its running-statistics `momentum`
    /// and `epsilon` (Caffe2's arguments; [`DeviceModel::spatial_bn`] uses 0.9
    /// and 1e-5).
    pub fn spatial_bn_with(
        &mut self,
        name: &str,
        x: Blob<'d>,
        momentum: f32,
        epsilon: f32,
    ) -> Result<Blob<'d>> {
        if !(0.0..=1.0).contains(&momentum) || epsilon.is_nan() || epsilon <= 0.0 {
            return Err(Error::Config(format!(
                "spatial_bn `{name}`: momentum {momentum} must be in [0, 1] and epsilon {epsilon} above 0"
            )));
        }
        let shape = self.known_shape(x, name)?;
        let c = shape.dims().first().copied().unwrap_or(0);
        let input = self.name(x).clone();
        let y = self.model().spatial_bn(name, &input, c, momentum, epsilon)?;
        Ok(self.push_blob(y, Some(shape)))
    }

    /// Average pooling over `kernel × kernel` windows (padding not counted),
    /// into `<x>_avgpool`.
    pub fn average_pool(
        &mut self,
        x: Blob<'d>,
        kernel: usize,
        stride: usize,
        pad: usize,
    ) -> Result<Blob<'d>> {
        let (c, h, w) = self.planes(x, "average_pool")?;
        let input = self.name(x).clone();
        let out = self.fresh_name(&format!("{}_avgpool", input.short_name()));
        let y = self
            .model()
            .net_mut()
            .op("AveragePool")
            .input(&input)
            .output(out)
            .arg("kernel", kernel)
            .arg("stride", stride)
            .arg("pad", pad)
            .arg("order", "NCHW")
            .build_one();
        let side = |n: usize| (n + 2 * pad).saturating_sub(kernel) / stride.max(1) + 1;
        Ok(self.push_blob(y, Some(Shape::from([c, side(h), side(w)]))))
    }

    /// Each sample's values as one vector, into `<x>_flat`.
    pub fn flatten(&mut self, x: Blob<'d>) -> Blob<'d> {
        let input = self.name(x).clone();
        let out = self.fresh_name(&format!("{}_flat", input.short_name()));
        let y = self.model().flatten(&input, &out);
        let shape = self.sample_shape(x).map(|s| Shape::from([s.numel()]));
        self.push_blob(y, shape)
    }

    /// `op(a)·op(b)` for each sample's matrices (`BatchMatMul`), into `name`.
    pub fn batch_matmul(
        &mut self,
        name: &str,
        a: Blob<'d>,
        b: Blob<'d>,
        trans_a: bool,
        trans_b: bool,
    ) -> Result<Blob<'d>> {
        let (sa, sb) = (self.known_shape(a, name)?, self.known_shape(b, name)?);
        let (&[ar, ac], &[br, bc]) = (sa.dims(), sb.dims()) else {
            return Err(Error::Config(format!(
                "batch_matmul `{name}`: each sample must hold a matrix, not {sa} and {sb}"
            )));
        };
        let (m, k) = if trans_a { (ac, ar) } else { (ar, ac) };
        let (kb, n) = if trans_b { (bc, br) } else { (br, bc) };
        if k != kb {
            return Err(Error::Config(format!(
                "batch_matmul `{name}`: {sa} and {sb} do not multiply (inner sizes {k} and {kb})"
            )));
        }
        let (na, nb) = (self.name(a).clone(), self.name(b).clone());
        let out = self.model().blob(name);
        self.model()
            .net_mut()
            .op("BatchMatMul")
            .inputs([&na, &nb])
            .output(&out)
            .arg("trans_a", i64::from(trans_a))
            .arg("trans_b", i64::from(trans_b))
            .build();
        Ok(self.push_blob(out, Some(Shape::from([m, n]))))
    }

    /// Each sample's dimensions permuted by `axes`, into `name`.
    pub fn transpose(&mut self, name: &str, x: Blob<'d>, axes: &[usize]) -> Result<Blob<'d>> {
        let shape = self.known_shape(x, name)?;
        let mut seen = vec![false; shape.rank()];
        for &a in axes {
            match seen.get_mut(a) {
                Some(s) if !*s => *s = true,
                _ => {
                    return Err(Error::Config(format!(
                        "transpose `{name}`: axes {axes:?} are not a permutation of {shape}'s {} dimensions",
                        shape.rank()
                    )))
                }
            }
        }
        if axes.len() != shape.rank() {
            return Err(Error::Config(format!(
                "transpose `{name}`: {} axes for {shape}",
                axes.len()
            )));
        }
        let input = self.name(x).clone();
        let out = self.model().blob(name);
        let full: Vec<i64> = std::iter::once(0)
            .chain(axes.iter().map(|&a| a as i64 + 1))
            .collect();
        self.model()
            .net_mut()
            .op("Transpose")
            .input(&input)
            .output(&out)
            .arg("axes", full)
            .build();
        let dims: Vec<usize> = axes.iter().map(|&a| shape.dims()[a]).collect();
        Ok(self.push_blob(out, Some(Shape::from(dims))))
    }

    /// `xs` joined along per-sample `axis` into `name` (sizes into
    /// `<name>_split_info`, which its gradient reads).
    pub fn concat(&mut self, name: &str, xs: &[Blob<'d>], axis: usize) -> Result<Blob<'d>> {
        let shapes = xs
            .iter()
            .map(|&x| self.known_shape(x, name))
            .collect::<Result<Vec<_>>>()?;
        let Some(first) = shapes.first() else {
            return Err(Error::Config(format!("concat `{name}`: nothing to join")));
        };
        let mut dims = first.dims().to_vec();
        if axis >= dims.len() {
            return Err(Error::Config(format!(
                "concat `{name}`: no axis {axis} in {first}"
            )));
        }
        for s in &shapes[1..] {
            let same = s.rank() == dims.len() && (0..dims.len()).all(|d| d == axis || s.dims()[d] == dims[d]);
            if !same {
                return Err(Error::Config(format!(
                    "concat `{name}`: {s} and {first} differ off axis {axis}"
                )));
            }
            dims[axis] += s.dims()[axis];
        }
        let inputs: Vec<BlobRef> = xs.iter().map(|&x| self.name(x).clone()).collect();
        let (out, info) = (
            self.model().blob(name),
            self.model().blob(&format!("{name}_split_info")),
        );
        self.model()
            .net_mut()
            .op("Concat")
            .inputs(&inputs)
            .outputs([&out, &info])
            .arg("axis", axis + 1)
            .build();
        Ok(self.push_blob(out, Some(Shape::from(dims))))
    }

    /// `x` cut along per-sample `axis` into parts of `sizes`, named `<name>_0`,
    /// `<name>_1`, ….
    pub fn split(&mut self, name: &str, x: Blob<'d>, axis: usize, sizes: &[usize]) -> Result<Vec<Blob<'d>>> {
        let shape = self.known_shape(x, name)?;
        let Some(&along) = shape.dims().get(axis) else {
            return Err(Error::Config(format!(
                "split `{name}`: no axis {axis} in {shape}"
            )));
        };
        if sizes.iter().sum::<usize>() != along {
            return Err(Error::Config(format!(
                "split `{name}`: sizes {sizes:?} do not add up to {along}, axis {axis} of {shape}"
            )));
        }
        let input = self.name(x).clone();
        let outs: Vec<BlobRef> = (0..sizes.len())
            .map(|i| self.model().blob(&format!("{name}_{i}")))
            .collect();
        self.model()
            .net_mut()
            .op("Split")
            .input(&input)
            .outputs(&outs)
            .arg("axis", axis + 1)
            .arg("split", sizes.iter().map(|&s| s as i64).collect::<Vec<_>>())
            .build();
        Ok(outs
            .into_iter()
            .zip(sizes)
            .map(|(o, &s)| {
                let mut d = shape.dims().to_vec();
                d[axis] = s;
                self.push_blob(o, Some(Shape::from(d)))
            })
            .collect())
    }

    /// Layer normalisation of each sample's values (mean 0, variance 1, with
    /// `epsilon`) into `name`; the statistics into `<name>_mean`, `<name>_std`.
    pub fn layer_norm(&mut self, name: &str, x: Blob<'d>, epsilon: f32) -> Result<Blob<'d>> {
        if epsilon.is_nan() || epsilon <= 0.0 {
            return Err(Error::Config(format!(
                "layer_norm `{name}`: epsilon {epsilon} must be above 0"
            )));
        }
        let input = self.name(x).clone();
        let outs =
            [name.to_owned(), format!("{name}_mean"), format!("{name}_std")].map(|n| self.model().blob(&n));
        self.model()
            .net_mut()
            .op("LayerNorm")
            .input(&input)
            .outputs(&outs)
            .arg("axis", 1i64)
            .arg("epsilon", epsilon)
            .build();
        let shape = self.sample_shape(x).cloned();
        let [y, ..] = outs;
        Ok(self.push_blob(y, shape))
    }

    /// An embedding: parameter `<name>_w` of `vocab` rows of `dim` (Normal(0,
    /// 1/√dim)) looked up by the integer ids in `ids` (`Gather`), into `name`;
    /// each id gives a row, so each sample's shape gains a last dimension `dim`.
    pub fn embedding(&mut self, name: &str, ids: Blob<'d>, vocab: usize, dim: usize) -> Result<Blob<'d>> {
        let init = Init::Gaussian {
            mean: 0.0,
            std: 1.0 / (dim.max(1) as f32).sqrt(),
        };
        let w = self
            .model()
            .create_param(&format!("{name}_w"), [vocab, dim], init)?;
        let idx = self.name(ids).clone();
        let out = self.model().blob(name);
        self.model()
            .net_mut()
            .op("Gather")
            .inputs([&w, &idx])
            .output(&out)
            .build();
        let shape = self.sample_shape(ids).map(|s| {
            let mut d = s.dims().to_vec();
            d.push(dim);
            Shape::from(d)
        });
        Ok(self.push_blob(out, shape))
    }

    /// Per sample, `½‖x − y‖²` (`SquaredL2Distance`), into `name`.
    pub fn squared_l2_distance(&mut self, name: &str, x: Blob<'d>, y: Blob<'d>) -> Blob<'d> {
        self.per_sample("SquaredL2Distance", name, x, y)
    }

    /// Per sample, `‖x − y‖₁` (`L1Distance`), into `name`.
    pub fn l1_distance(&mut self, name: &str, x: Blob<'d>, y: Blob<'d>) -> Blob<'d> {
        self.per_sample("L1Distance", name, x, y)
    }

    /// Per sample, `−log p[label]` of probabilities `p` (`LabelCrossEntropy`),
    /// into `name`.
    pub fn label_cross_entropy(&mut self, name: &str, p: Blob<'d>, label: Blob<'d>) -> Blob<'d> {
        self.per_sample("LabelCrossEntropy", name, p, label)
    }

    /// The mean of `x` over the batch and every value (`AveragedLoss`), into
    /// `name`: per-sample losses into the one number a loss is.
    pub fn averaged_loss(&mut self, name: &str, x: Blob<'d>) -> Blob<'d> {
        let input = self.name(x).clone();
        let out = self.model().blob(name);
        self.model()
            .net_mut()
            .op("AveragedLoss")
            .input(&input)
            .output(&out)
            .build();
        self.push_blob(out, Some(Shape::from([])))
    }

    fn per_sample(&mut self, op_type: &str, name: &str, a: Blob<'d>, b: Blob<'d>) -> Blob<'d> {
        let (na, nb) = (self.name(a).clone(), self.name(b).clone());
        let out = self.model().blob(name);
        self.model()
            .net_mut()
            .op(op_type)
            .inputs([&na, &nb])
            .output(&out)
            .build();
        self.push_blob(out, Some(Shape::from([])))
    }

    /// (C, H, W) of a per-sample image shape.
    fn planes(&self, x: Blob<'d>, layer: &str) -> Result<(usize, usize, usize)> {
        let shape = self.known_shape(x, layer)?;
        match *shape.dims() {
            [c, h, w] => Ok((c, h, w)),
            _ => Err(Error::Config(format!(
                "{layer}: `{}` is not [C, H, W] per sample",
                self.name(x)
            ))),
        }
    }
}
