//! `FC` and `FCGradient` on cuBLAS SGEMM (strict FP32, cuBLAS's default math).
//! Row-major products are written as column-major ones of the transposes.

use std::ffi::c_int;

use cudarc::cublas::result::sgemm;
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};

use super::{input, op_gpu, output};
use crate::cuda::args;
use crate::cuda::Gpu;
use crate::error::{Error, Result};
use crate::ops::cpu::linear as cpu_linear;
use crate::ops::{Kernel, OpContext};
use crate::proto::OperatorDef;

/// `FC(X, W[, b]) → Y = X·Wᵀ + b`; X viewed as a matrix split at `axis`.
pub struct Fc {
    axis: usize,
}

/// `FCGradient(X, W, dY) → (dW, db[, dX])`.
pub struct FcGradient {
    axis: usize,
}

impl Fc {
    /// Parses `axis`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(Fc {
            axis: cpu_linear::axis(op)?,
        }))
    }
}

impl FcGradient {
    /// Parses `axis`.
    pub fn create(op: &OperatorDef) -> Result<Box<dyn Kernel>> {
        Ok(Box::new(FcGradient {
            axis: cpu_linear::axis(op)?,
        }))
    }
}

/// (rows M, inputs K, outputs N), as the CPU kernel checks them, and within
/// cuBLAS's 32-bit sizes.
fn dims(ctx: &OpContext<'_>, axis: usize, with_bias: bool) -> Result<(usize, usize, usize)> {
    let (m, k, n) = cpu_linear::dims(ctx, axis, with_bias)?;
    for (what, v) in [("rows", m), ("inputs", k), ("outputs", n)] {
        if c_int::try_from(v).is_err() {
            return Err(Error::value(
                ctx.input_name(0),
                format!("{v} {what} exceed cuBLAS's 32-bit sizes"),
            ));
        }
    }
    Ok((m, k, n))
}

/// Column-major `c (m×n) = op(a) · op(b)`, β = 0.
#[allow(clippy::too_many_arguments)]
fn gemm(
    gpu: &Gpu,
    (ta, tb): (cublasOperation_t, cublasOperation_t),
    (m, n, k): (usize, usize, usize),
    (a, lda): (u64, usize),
    (b, ldb): (u64, usize),
    (c, ldc): (u64, usize),
) -> Result<()> {
    let blas = gpu.blas()?;
    let handle = *blas.as_ref().expect("created by blas()").handle();
    let (alpha, beta) = (1.0f32, 0.0f32);
    // SAFETY: the callers size a, b, c from the checked dims.
    unsafe {
        sgemm(
            handle,
            ta,
            tb,
            m as c_int,
            n as c_int,
            k as c_int,
            &alpha,
            a as *const f32,
            lda as c_int,
            b as *const f32,
            ldb as c_int,
            &beta,
            c as *mut f32,
            ldc as c_int,
        )
    }
    .map_err(|e| gpu.lib_error("cuBLAS", format!("SGEMM {m}×{n}×{k}: {e}")))
}

impl Kernel for Fc {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(2..=3)?;
        ctx.expect_outputs(1..=1)?;
        let gpu = op_gpu(ctx)?;
        let with_bias = ctx.num_inputs() == 3;
        let (m, k, n) = dims(ctx, self.axis, with_bias)?;
        let (x, xp) = input(ctx, 0, &gpu)?;
        let (_, wp) = input(ctx, 1, &gpu)?;
        let bp = if with_bias {
            Some(input(ctx, 2, &gpu)?.1)
        } else {
            None
        };
        let mut out_dims = x.dims()[..self.axis].to_vec();
        out_dims.push(n);
        let yp = output(ctx, 0, &gpu, out_dims)?;
        if m * n == 0 {
            return Ok(());
        }
        // Yᵀ (n×m) = Wᵀᵀ · Xᵀ
        gemm(
            &gpu,
            (CUBLAS_OP_T, CUBLAS_OP_N),
            (n, m, k),
            (wp, k),
            (xp, k),
            (yp, n),
        )?;
        if let Some(bp) = bp {
            gpu.launch_elementwise("bias_rows", m * n, args![yp, bp, (n as u64)])?;
        }
        Ok(())
    }
}

impl Kernel for FcGradient {
    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        ctx.expect_inputs(3..=3)?;
        ctx.expect_outputs(2..=3)?;
        let gpu = op_gpu(ctx)?;
        let (m, k, n) = dims(ctx, self.axis, false)?;
        let (x, xp) = input(ctx, 0, &gpu)?;
        let (w, wp) = input(ctx, 1, &gpu)?;
        let (dy, dyp) = input(ctx, 2, &gpu)?;
        if dy.numel() != m * n {
            return Err(Error::shape(
                ctx.input_name(2),
                format!("{m}×{n} elements"),
                dy.shape(),
            ));
        }
        let dwp = output(ctx, 0, &gpu, w.shape().clone())?;
        let dbp = output(ctx, 1, &gpu, [n])?;
        // dWᵀ (k×n) = Xᵀ · dY
        gemm(
            &gpu,
            (CUBLAS_OP_N, CUBLAS_OP_T),
            (k, n, m),
            (xp, k),
            (dyp, n),
            (dwp, k),
        )?;
        gpu.launch_elementwise("column_sums", n, args![dyp, dbp, (m as u64)])?;
        if ctx.num_outputs() == 3 {
            let dxp = output(ctx, 2, &gpu, x.shape().clone())?;
            // dXᵀ (k×m) = Wᵀ · dYᵀ
            gemm(
                &gpu,
                (CUBLAS_OP_N, CUBLAS_OP_N),
                (k, m, n),
                (wp, k),
                (dyp, n),
                (dxp, k),
            )?;
        }
        Ok(())
    }
}
