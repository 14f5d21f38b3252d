// dpm's CUDA C kernels, compiled at run time by NVRTC (see kernels.rs).
// Each mirrors a CPU kernel of ops/cpu and keeps its order of operations, so a
// CUDA replica computes what a CPU replica computes, to rounding.
//
// Conventions: element counts are 64-bit; elementwise kernels take the count
// first and loop grid-stride, so any grid size covers any tensor.

typedef unsigned long long u64;

#define EACH(i, n) for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < (n); i += (u64)blockDim.x * gridDim.x)

// Threads per block of the reduction kernels (a power of two).
#define BLOCK 256

// ---- elementwise -------------------------------------------------------------

// Relu: y = max(x, 0), NaN propagated (fmaxf would hide it).
extern "C" __global__ void relu(u64 n, const float* x, float* y) {
    EACH(i, n) { y[i] = (x[i] > 0.0f || isnan(x[i])) ? x[i] : 0.0f; }
}

// ReluGradient: dx = y > 0 ? dy : 0.
extern "C" __global__ void relu_grad(u64 n, const float* y, const float* dy, float* dx) {
    EACH(i, n) { dx[i] = y[i] > 0.0f ? dy[i] : 0.0f; }
}

// Sum / Add, one more term: y += x.
extern "C" __global__ void add_into(u64 n, float* y, const float* x) {
    EACH(i, n) { y[i] += x[i]; }
}

// Scale, in place: y *= s.
extern "C" __global__ void scale_in_place(u64 n, float* y, float s) {
    EACH(i, n) { y[i] *= s; }
}

// WeightedSum, one more term: y += w * x.
extern "C" __global__ void axpy(u64 n, float* y, const float* x, float w) {
    EACH(i, n) { y[i] += w * x[i]; }
}

// MomentumSGDUpdate, in place: g += wd p; m = mu m + lr g; p -= step, g = step.
extern "C" __global__ void momentum_sgd(u64 n, float* g, float* m, float* p, float lr, float mu, float wd, int nesterov) {
    EACH(i, n) {
        float grad = g[i] + wd * p[i];
        float m_old = m[i];
        float m_new = mu * m_old + lr * grad;
        float step = nesterov ? (1.0f + mu) * m_new - mu * m_old : m_new;
        m[i] = m_new;
        g[i] = step;
        p[i] -= step;
    }
}

// FC bias: y[r, c] += b[c] for a row-major y of `cols` columns.
extern "C" __global__ void bias_rows(u64 n, float* y, const float* b, u64 cols) {
    EACH(i, n) { y[i] += b[i % cols]; }
}

// FCGradient's db: db[c] = sum over rows of dy[r, c] (one thread a column, rows in order).
extern "C" __global__ void column_sums(u64 cols, const float* dy, float* db, u64 rows) {
    EACH(c, cols) {
        float s = 0.0f;
        for (u64 r = 0; r < rows; ++r) s += dy[r * cols + c];
        db[c] = s;
    }
}

// SpatialBN running statistics from the batch's mean and 1/sqrt(var + eps):
// r = momentum r + (1 - momentum) batch, the variance unbiased by `unbias` =
// n / (n - 1) (as the CPU kernel).
extern "C" __global__ void bn_running(u64 c, float* running_mean, float* running_var, const float* mean,
                                      const float* inv_std, float momentum, float eps, double unbias) {
    EACH(i, c) {
        double inv = inv_std[i];
        double var = fmax(1.0 / (inv * inv) - (double)eps, 0.0) * unbias;
        double mom = momentum;
        running_mean[i] = (float)(mom * running_mean[i] + (1.0 - mom) * mean[i]);
        running_var[i] = (float)(mom * running_var[i] + (1.0 - mom) * var);
    }
}

// ---- reductions (fixed order: the same bits on every run) --------------------

// Sums `v` across a block; the result is valid in thread 0.
__device__ double block_sum(double v, double* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
        __syncthreads();
    }
    double r = shared[0];
    __syncthreads();
    return r;
}

__device__ float block_max(float v, float* shared) {
    shared[threadIdx.x] = v;
    __syncthreads();
    for (unsigned s = BLOCK / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) shared[threadIdx.x] = fmaxf(shared[threadIdx.x], shared[threadIdx.x + s]);
        __syncthreads();
    }
    float r = shared[0];
    __syncthreads();
    return r;
}

// SoftmaxWithLoss, one block per row (grid-stride over rows): p = softmax(x),
// row_loss = log(sum exp(x - max)) - (x[label] - max).
extern "C" __global__ void softmax_xent(u64 rows, const float* x, const int* labels, float* p, float* row_loss, u64 d) {
    __shared__ double dsum[BLOCK];
    __shared__ float fmax_[BLOCK];
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const float* xr = x + r * d;
        float* pr = p + r * d;
        float m = __int_as_float(0xff800000);  // -inf
        for (u64 j = threadIdx.x; j < d; j += BLOCK) m = fmaxf(m, xr[j]);
        m = block_max(m, fmax_);
        double s = 0.0;
        for (u64 j = threadIdx.x; j < d; j += BLOCK) {
            float e = expf(xr[j] - m);
            pr[j] = e;
            s += e;
        }
        float sum = (float)block_sum(s, dsum);
        float inv = 1.0f / sum;
        for (u64 j = threadIdx.x; j < d; j += BLOCK) pr[j] *= inv;
        if (threadIdx.x == 0) row_loss[r] = logf(sum) - (xr[labels[r]] - m);
    }
}

// out[0] = scale * sum(v), one block.
extern "C" __global__ void scaled_sum(u64 n, const float* v, float* out, float scale) {
    __shared__ double shared[BLOCK];
    double s = 0.0;
    for (u64 i = threadIdx.x; i < n; i += BLOCK) s += v[i];
    s = block_sum(s, shared);
    if (threadIdx.x == 0) out[0] = (float)(s * scale);
}

// SoftmaxWithLossGradient: dx = (p - onehot(label)) * dloss / rows.
extern "C" __global__ void softmax_xent_grad(u64 n, const float* p, const int* labels, const float* dloss, float* dx,
                                             u64 d, u64 rows) {
    float g = dloss[0] / (float)rows;
    EACH(i, n) {
        u64 r = i / d;
        float v = p[i] * g;
        if ((int)(i - r * d) == labels[r]) v -= g;
        dx[i] = v;
    }
}

// Accuracy, one block: the share of rows whose label's score has fewer than
// top_k scores above it.
extern "C" __global__ void accuracy(u64 rows, const float* x, const int* labels, float* out, u64 d, int top_k) {
    __shared__ double shared[BLOCK];
    double correct = 0.0;
    for (u64 r = threadIdx.x; r < rows; r += BLOCK) {
        const float* xr = x + r * d;
        float target = xr[labels[r]];
        int above = 0, nan = 0;
        for (u64 j = 0; j < d; ++j) {
            above += xr[j] > target;
            nan |= isnan(xr[j]);
        }
        // A row with a NaN score has no ranking: it counts as wrong.
        correct += (!nan && above < top_k) ? 1.0 : 0.0;
    }
    correct = block_sum(correct, shared);
    if (threadIdx.x == 0) out[0] = rows > 0 ? (float)(correct / (double)rows) : 0.0f;
}
