//! Data-parallel ResNet training, out of the box:
//!
//! ```sh
//! cargo run --release --example resnet                    # ResNet-20, 2 CPU devices, synthetic data
//! cargo run --release --features cuda --example resnet -- --devices cuda:0   # on a GPU
//! cargo run --release --example resnet -- --help          # every flag
//! cargo run --release --example resnet -- --data cifar-10-batches-bin --iters 2000
//! ```
//!
//! The model is one `#[data_parallel]` function; dpm replicates it per device,
//! all-reduces the gradients and keeps the replicas identical.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use dpm::data::{batch_tensors, read_cifar10, Dataset, Loader, LoaderConfig, Synthetic};
use dpm::prelude::*;

/// Train a ResNet data-parallel with dpm.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "resnet",
    about = "Data-parallel ResNet training with dpm",
    args_override_self = true
)]
pub struct Args {
    /// Depth: 20, 32, 44, 56, 110 (CIFAR-style, any 6n+2 ≥ 8) or 18, 34, 50 (ImageNet-style).
    #[arg(long, default_value_t = 20)]
    pub depth: usize,
    /// Classes of the synthetic data and the last layer, 2 to 256 (CIFAR-10: 10).
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Side of the (square) input images.
    #[arg(long, default_value_t = 32)]
    pub image_size: usize,
    /// Devices, comma-separated: cpu:0,cpu:1, or cuda:0 (build with --features cuda).
    #[arg(long, default_value = "cpu:0,cpu:1")]
    pub devices: String,
    /// Images per device per step.
    #[arg(long, default_value_t = 32)]
    pub batch_per_device: usize,
    /// Total training iterations (a resumed run continues up to this count).
    #[arg(long, default_value_t = 300)]
    pub iters: u64,
    /// Base learning rate.
    #[arg(long, default_value_t = 0.1)]
    pub lr: f32,
    /// Iteration after which the learning rate is divided by 10 (default: 75% of --iters).
    #[arg(long)]
    pub lr_decay_at: Option<u64>,
    /// Seed of initialisation, data and augmentation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Executor: dag or simple.
    #[arg(long, default_value = "dag")]
    pub net_type: String,
    /// CIFAR-10 binary directory (data_batch_1.bin … test_batch.bin); synthetic data if absent.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Random crop and horizontal flip of training images.
    #[arg(long, default_value_t = false)]
    pub augment: bool,
    /// Synthetic training images.
    #[arg(long, default_value_t = 10_000)]
    pub train_images: usize,
    /// Held-out images to report accuracy on.
    #[arg(long, default_value_t = 1_000)]
    pub heldout_images: usize,
    /// Save a checkpoint here at the end.
    #[arg(long)]
    pub save: Option<PathBuf>,
    /// Resume from this checkpoint.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Write a JSON summary here.
    #[arg(long)]
    pub summary_json: Option<PathBuf>,
    /// Write the trained model for deployment as Caffe2's init_net.pb and
    /// predict_net.pb in this folder (see dpm::deploy::Predictor).
    #[arg(long)]
    pub export_caffe2: Option<PathBuf>,
    /// Write the trained model as an ONNX file (opset 17) here.
    #[arg(long)]
    pub export_onnx: Option<PathBuf>,
    /// Write a Chrome trace (JSON for Perfetto or chrome://tracing) of 3
    /// steps after the warm-up here, and print how much of the all-reduce
    /// time the backward pass hid.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Emit the data-parallel collectives even on one device (NCCL on a one-GPU
    /// machine): what the multi-GPU path costs, with the same results.
    #[arg(long, default_value_t = false)]
    pub collectives_on_one_device: bool,
    /// Print the model's layers, parameters and FLOPs per sample before training.
    #[arg(long, default_value_t = false)]
    pub summary: bool,
    /// Worker threads of the DAG executor (default: 4 per device for GPUs and
    /// across hosts; on CPUs as many as the cores hold, one per device at least).
    #[arg(long)]
    pub num_workers: Option<usize>,
    /// Threads per CPU kernel (default: cores / devices).
    #[arg(long)]
    pub kernel_threads: Option<usize>,
    /// Run every op alone, as Caffe2 does (by default batch norm, the residual
    /// sum and the relu after them run as fused kernels, forward and backward,
    /// same results).
    #[arg(long, default_value_t = false)]
    pub no_fuse: bool,
    /// Give every gradient blob a buffer of its own (by default gradients
    /// whose lifetimes in the net do not overlap share one, Caffe2's
    /// `optimize_gradient_memory`: same results, a smaller working set).
    #[arg(long, default_value_t = false)]
    pub no_gradient_sharing: bool,
    /// Gradients all-reduced together, at most this many bytes per bucket; 0:
    /// one all-reduce per gradient (default: 16 KiB on CPUs, 1 MiB across
    /// hosts, one per gradient for GPUs in one process).
    #[arg(long)]
    pub bucket_bytes: Option<usize>,
    /// No progress bar (logs and tests).
    #[arg(long, default_value_t = false)]
    pub quiet: bool,
    /// Only convolution algorithms that give the same bits every run, so that a
    /// rerun or a resumed run reproduces this one exactly (on a GPU; some shapes
    /// are slower).
    #[arg(long, default_value_t = false)]
    pub deterministic: bool,
    /// Time every op after the warm-up and print the costliest op types (GPU ops
    /// are then waited for one by one, so throughput drops).
    #[arg(long, default_value_t = false)]
    pub profile: bool,
}

/// The network, as one `#[data_parallel]` forward function's configuration.
#[derive(Clone, Copy, Debug)]
pub struct ResNetConfig {
    /// Depth (see `--depth`).
    pub depth: usize,
    /// Classes.
    pub classes: usize,
    /// Per-sample input shape `[C, H, W]`.
    pub image: [usize; 3],
}

impl ResNetConfig {
    fn check(&self) -> Result<()> {
        let cifar = self.depth >= 8 && (self.depth - 2).is_multiple_of(6);
        let imagenet = matches!(self.depth, 18 | 34 | 50);
        if !cifar && !imagenet {
            return Err(Error::Config(format!(
                "--depth {} is not a ResNet: use 20, 32, 44, 56, 110 (6n+2) or 18, 34, 50",
                self.depth
            )));
        }
        if self.image[1] < 8 {
            return Err(Error::Config(format!(
                "--image-size {} is too small (≥ 8)",
                self.image[1]
            )));
        }
        Ok(())
    }
}

/// conv → batch norm (→ relu).
fn conv_bn<'d>(
    m: &mut DeviceModel<'d>,
    name: &str,
    x: Blob<'d>,
    out: usize,
    k: usize,
    stride: usize,
    relu: bool,
) -> Result<Blob<'d>> {
    let y = m
        .conv(&format!("{name}_conv"), x, out, k)
        .stride(stride)
        .pad(k / 2)
        .no_bias()
        .build()?;
    let y = m.spatial_bn(&format!("{name}_bn"), y)?;
    if relu {
        m.relu(y)
    } else {
        Ok(y)
    }
}

/// `relu(y + shortcut(x))`, the shortcut being the identity, or a strided 1×1
/// projection when the shape changes: how every residual block ends.
fn residual<'d>(
    m: &mut DeviceModel<'d>,
    name: &str,
    y: Blob<'d>,
    x: Blob<'d>,
    stride: usize,
) -> Result<Blob<'d>> {
    let out = m.sample_shape(y).map_or(0, |s| s.dims()[0]);
    let cin = m.sample_shape(x).map_or(0, |s| s.dims()[0]);
    let s = if stride == 1 && cin == out {
        x
    } else {
        conv_bn(m, &format!("{name}_proj"), x, out, 1, stride, false)?
    };
    let sum = m.add(&format!("{name}_sum"), y, s)?;
    m.relu(sum)
}

/// Two 3×3 convolutions plus the shortcut.
fn basic_block<'d>(
    m: &mut DeviceModel<'d>,
    name: &str,
    x: Blob<'d>,
    out: usize,
    stride: usize,
) -> Result<Blob<'d>> {
    let y = conv_bn(m, &format!("{name}_a"), x, out, 3, stride, true)?;
    let y = conv_bn(m, &format!("{name}_b"), y, out, 3, 1, false)?;
    residual(m, name, y, x, stride)
}

/// 1×1 → 3×3 → 1×1 (×4 channels) plus the shortcut (ResNet-50).
fn bottleneck<'d>(
    m: &mut DeviceModel<'d>,
    name: &str,
    x: Blob<'d>,
    width: usize,
    stride: usize,
) -> Result<Blob<'d>> {
    let y = conv_bn(m, &format!("{name}_a"), x, width, 1, 1, true)?;
    let y = conv_bn(m, &format!("{name}_b"), y, width, 3, stride, true)?;
    let y = conv_bn(m, &format!("{name}_c"), y, 4 * width, 1, 1, false)?;
    residual(m, name, y, x, stride)
}

/// ResNet for CIFAR (depth 6n+2: 3 stages of n basic blocks, 16/32/64 channels)
/// or ImageNet-style (18/34: basic blocks, 50: bottlenecks; 64…512 channels).
#[data_parallel]
pub fn resnet(m: &mut DeviceModel<'_>, cfg: &ResNetConfig) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", cfg.image);
    let label = m.input("label");
    let mut x;
    if matches!(cfg.depth, 18 | 34 | 50) {
        x = conv_bn(m, "stem", data, 64, 7, 2, true)?;
        x = m.max_pool(x, 3, 2, 1)?;
        let blocks = match cfg.depth {
            18 => [2, 2, 2, 2],
            _ => [3, 4, 6, 3],
        };
        for (stage, (&n, width)) in blocks.iter().zip([64, 128, 256, 512]).enumerate() {
            for b in 0..n {
                let stride = if b == 0 && stage > 0 { 2 } else { 1 };
                let name = format!("s{stage}_b{b}");
                x = if cfg.depth == 50 {
                    bottleneck(m, &name, x, width, stride)?
                } else {
                    basic_block(m, &name, x, width, stride)?
                };
            }
        }
    } else {
        let n = (cfg.depth - 2) / 6;
        x = conv_bn(m, "stem", data, 16, 3, 1, true)?;
        for (stage, width) in [16, 32, 64].into_iter().enumerate() {
            for b in 0..n {
                let stride = if b == 0 && stage > 0 { 2 } else { 1 };
                x = basic_block(m, &format!("s{stage}_b{b}"), x, width, stride)?;
            }
        }
    }
    let pooled = m.global_average_pool(x)?;
    let logits = m.fc("pred", pooled, cfg.classes)?;
    let (softmax, loss) = m.softmax_with_loss("loss", logits, label)?;
    m.accuracy("accuracy", softmax, label);
    Ok(loss.into())
}

/// What a run reports.
#[derive(Clone, Debug, Default)]
pub struct Summary {
    /// Depth trained.
    pub depth: usize,
    /// Devices used.
    pub devices: Vec<String>,
    /// Images per device per step.
    pub batch_per_device: usize,
    /// Iteration reached.
    pub iters: u64,
    /// The first iteration this run executed (non-zero when resumed).
    pub first_iter: u64,
    /// Loss of every step this run executed.
    pub losses: Vec<f32>,
    /// Loss of the last step.
    pub final_loss: f32,
    /// Accuracy on held-out images.
    pub heldout_accuracy: f32,
    /// Training throughput over the steady-state steps (after warm-up), all ranks.
    pub images_per_sec: f64,
    /// The median time of one steady-state step (`Trainer::step` alone: feeding
    /// the batch, the step, its commit), the statistic the PyTorch baselines
    /// quote; `None` for a run too short to have a steady state.
    pub median_step_seconds: Option<f64>,
    /// This process's rank and the number of ranks (MPI; 0 and 1 otherwise).
    pub rank: (usize, usize),
    /// Seconds this process spent in cross-rank collectives (MPI).
    pub comm_seconds: f64,
}

impl Summary {
    /// The JSON the `--summary-json` flag writes (a non-finite loss is `null`).
    pub fn to_json(&self) -> String {
        let json = serde_json::json!({
            "depth": self.depth,
            "devices": self.devices,
            "ranks": self.rank.1,
            "batch_per_device": self.batch_per_device,
            "iters": self.iters,
            "final_loss": self.final_loss,
            "heldout_accuracy": self.heldout_accuracy,
            "images_per_sec": self.images_per_sec,
            "median_step_seconds": self.median_step_seconds,
            "comm_seconds": self.comm_seconds,
            "losses": self.losses,
        });
        format!("{json:#}\n")
    }
}

/// The median of `times`, `None` if empty.
fn median(mut times: Vec<f64>) -> Option<f64> {
    times.sort_by(f64::total_cmp);
    times.get(times.len() / 2).copied()
}

/// Refuses sizes that cannot be held before anything is built: the synthetic
/// images (bytes), their class templates and one global batch (f32), with
/// checked arithmetic and a trial reservation, so a typo in a flag is an error
/// rather than an aborted process.
fn check_sizes(args: &Args, devices: usize) -> Result<()> {
    let pixels = 3usize
        .checked_mul(args.image_size)
        .and_then(|p| p.checked_mul(args.image_size));
    let needs = [
        (
            "--train-images",
            pixels.and_then(|p| p.checked_mul(args.train_images)),
        ),
        (
            "--heldout-images",
            pixels.and_then(|p| p.checked_mul(args.heldout_images)),
        ),
        (
            "--image-size",
            pixels.and_then(|p| p.checked_mul(4 * args.classes)),
        ),
        (
            "--batch-per-device",
            pixels.and_then(|p| {
                p.checked_mul(4)?
                    .checked_mul(args.batch_per_device)?
                    .checked_mul(devices)
            }),
        ),
    ];
    for (flag, bytes) in needs {
        let fits =
            bytes.is_some_and(|b| b <= isize::MAX as usize && Vec::<u8>::new().try_reserve_exact(b).is_ok());
        if !fits {
            return Err(Error::Config(format!(
                "{flag}: cannot allocate {} for the images; use a smaller value",
                bytes.map_or_else(
                    || "more bytes than an address space holds".into(),
                    |b| format!("{b} bytes")
                )
            )));
        }
    }
    Ok(())
}

/// Checks before training that the files it writes at the end can be written.
fn check_output_paths(args: &Args) -> Result<()> {
    if let Some(dir) = &args.export_caffe2 {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.display().to_string(),
            source,
        })?;
    }
    let in_dir = args.export_caffe2.as_ref().map(|d| d.join("predict_net.pb"));
    let outputs = [
        &args.save,
        &args.summary_json,
        &args.export_onnx,
        &in_dir,
        &args.trace,
    ];
    for path in outputs.into_iter().flatten() {
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        let probe = dir.join(format!(".dpm-write-test-{}", std::process::id()));
        std::fs::write(&probe, b"")
            .and_then(|()| std::fs::remove_file(&probe))
            .map_err(|source| Error::Io {
                path: path.display().to_string(),
                source,
            })?;
    }
    Ok(())
}

/// The job's ranks when started by `mpirun -np N` (N > 1), none otherwise.
fn rendezvous() -> Result<Option<Rendezvous>> {
    if !dpm::comm::mpi_launched() {
        return Ok(None);
    }
    #[cfg(feature = "mpi")]
    return Rendezvous::from_mpi().map(Some);
    #[cfg(not(feature = "mpi"))]
    Err(Error::Config(
        "started by an MPI launcher with several processes, but this build has no MPI support: \
         rebuild with `--features mpi`"
            .into(),
    ))
}

/// Parses `--devices`; whether a CUDA device exists (and this build can use it)
/// is `Parallelize::build`'s to say.
fn parse_devices(s: &str) -> Result<Vec<Device>> {
    s.split(',').map(|d| d.trim().parse::<Device>()).collect()
}

fn datasets(args: &Args) -> Result<(Dataset, Dataset)> {
    match &args.data {
        Some(dir) => {
            if args.image_size != 32 || args.classes != 10 {
                return Err(Error::Config(
                    "CIFAR-10 is 10 classes of 32×32 images: drop --image-size and --classes".into(),
                ));
            }
            read_cifar10(dir)
        }
        None => {
            let gen = Synthetic::new(args.classes, args.image_size, args.seed);
            Ok((
                gen.generate(args.train_images, args.seed + 1),
                gen.generate(args.heldout_images, args.seed + 2),
            ))
        }
    }
}

/// Steps `--trace` records, after the warm-up.
const TRACED_STEPS: u64 = 3;

/// Trains as `args` says and returns the summary.
pub fn run(args: &Args) -> Result<Summary> {
    let devices = parse_devices(&args.devices)?;
    let cfg = ResNetConfig {
        depth: args.depth,
        classes: args.classes,
        image: [3, args.image_size, args.image_size],
    };
    cfg.check()?;
    if !matches!(args.net_type.as_str(), "dag" | "simple") {
        return Err(Error::Config(format!(
            "--net-type {} is unknown: use dag or simple",
            args.net_type
        )));
    }
    if !(2..=256).contains(&args.classes) {
        return Err(Error::Config(format!(
            "--classes {} must be 2 to 256 (labels are stored as bytes)",
            args.classes
        )));
    }
    if args.batch_per_device == 0 || args.iters == 0 {
        return Err(Error::Config(
            "--batch-per-device and --iters must be at least 1".into(),
        ));
    }
    check_sizes(args, devices.len())?;
    check_output_paths(args)?;
    let (train, heldout) = datasets(args)?;
    let train = Arc::new(train);
    let rendezvous = rendezvous()?;
    let ranks = rendezvous.as_ref().map_or(1, |r| r.num_shards);
    let global_batch = args.batch_per_device * devices.len() * ranks;

    let mut model = ModelHelper::new("resnet");
    model.set_seed(args.seed).set_deterministic(args.deterministic);
    let stepsize = args.lr_decay_at.unwrap_or(args.iters * 3 / 4).max(1);
    let mut builder = Parallelize::new(model);
    if let Some(b) = args.bucket_bytes {
        builder = builder.bucket_bytes(b);
    }
    if let Some(t) = args.kernel_threads {
        builder = builder.kernel_threads(t);
    }
    if let Some(n) = args.num_workers {
        builder = builder.num_workers(n);
    }
    if let Some(r) = rendezvous.clone() {
        builder = builder.rendezvous(r);
    }
    let mut trainer = builder
        .devices(devices.clone())
        .forward(resnet(cfg))
        .update(
            Sgd::new(args.lr)
                .momentum(0.9)
                .weight_decay(1e-4)
                .step_schedule(stepsize, 0.1),
        )
        .net_type(&args.net_type)
        .collectives_on_one_device(args.collectives_on_one_device)
        .fuse_ops(!args.no_fuse)
        .optimize_gradient_memory(!args.no_gradient_sharing)
        .build()?;
    trainer.run_init()?;
    if args.summary && trainer.shard_id() == 0 {
        println!("{}", trainer.summary()?);
    }
    let mut first_iter = 0;
    if let Some(path) = &args.resume {
        trainer.load(path)?;
        first_iter = trainer
            .fetch("ITER", devices[0])?
            .data::<i64>()
            .map_or(0, |d| d[0].max(0) as u64);
        if first_iter >= args.iters {
            return Err(Error::Config(format!(
                "{} is at iteration {first_iter}, not below --iters {}: nothing to train; raise --iters",
                path.display(),
                args.iters
            )));
        }
    }
    trainer.set_finite_check(dpm::parallel::FiniteCheck::Loss);
    let loader_cfg = LoaderConfig {
        batch: global_batch,
        seed: args.seed,
        augment: args.augment,
        start_step: first_iter,
        prefetch: 3,
    };
    trainer.set_input(Loader::new(train, loader_cfg)?);

    let todo = args.iters.saturating_sub(first_iter);
    let rank = (trainer.shard_id(), trainer.num_shards());
    let bar = if args.quiet || rank.0 != 0 {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new(todo)
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .expect("static template")
            .progress_chars("=> "),
    );
    let warmup = (todo / 10).clamp(1, 10);
    let mut losses = Vec::with_capacity(todo as usize);
    let mut steady_start = None;
    let mut step_times = Vec::with_capacity(todo as usize);
    let start = Instant::now();
    // After the warm-up, or from the start of a run too short for one.
    let first_traced = if todo > warmup { warmup } else { 0 };
    let traced = (first_traced, (first_traced + TRACED_STEPS).min(todo));
    for i in 0..todo {
        if i == warmup {
            steady_start = Some(Instant::now());
            trainer.workspace().set_profiling(args.profile);
        }
        if args.trace.is_some() && i == traced.0 {
            trainer.workspace().start_trace();
        }
        let step_start = Instant::now();
        let stepped = trainer.step();
        if steady_start.is_some() {
            step_times.push(step_start.elapsed().as_secs_f64());
        }
        stepped.map_err(|e| match e {
            Error::NonFinite { what } => Error::Config(format!(
                "the loss diverged ({what} at iteration {}); lower --lr",
                first_iter + i + 1
            )),
            e => e,
        })?;
        let loss = trainer.loss()?;
        losses.push(loss);
        let acc = trainer.mean_scalar("accuracy")?;
        let ips = (i + 1) as f64 * global_batch as f64 / start.elapsed().as_secs_f64();
        bar.set_message(format!("loss {loss:.3}  acc {:.1}%  {ips:.0} img/s", 100.0 * acc));
        bar.inc(1);
        if let (Some(path), true) = (&args.trace, i + 1 == traced.1) {
            let trace = trainer.workspace().take_trace((traced.1 - traced.0) as usize);
            if rank.0 == 0 {
                trace.write_chrome(path)?;
                bar.suspend(|| {
                    eprintln!(
                        "trace of {} steps in {}: {}",
                        trace.steps,
                        path.display(),
                        trace.overlap()
                    )
                });
            }
        }
    }
    bar.finish_and_clear();
    let steady = steady_start.map(|t| t.elapsed());
    let images_per_sec = match steady {
        Some(t) => (todo - warmup) as f64 * global_batch as f64 / t.as_secs_f64(),
        None => todo as f64 * global_batch as f64 / start.elapsed().as_secs_f64().max(1e-9),
    };
    if let (true, Some(t)) = (args.profile, steady) {
        trainer.workspace().set_profiling(false);
        print_profile(&trainer.workspace().op_times(), todo - warmup, t);
    }
    if let Some(path) = &args.save {
        trainer.save(path)?;
    }

    // Held-out accuracy, on the master device in inference mode.
    trainer.add_test_net(resnet(cfg))?;
    let mut correct = 0.0f64;
    let ids: Vec<usize> = (0..heldout.len()).collect();
    for chunk in ids.chunks(100) {
        trainer.run_test(batch_tensors(&heldout, chunk, None))?;
        correct += f64::from(
            trainer
                .fetch("accuracy", devices[0])?
                .data::<f32>()
                .map_or(0.0, |d| d[0]),
        ) * chunk.len() as f64;
    }
    let heldout_accuracy = if heldout.is_empty() {
        0.0
    } else {
        (correct / heldout.len() as f64) as f32
    };

    if rank.0 == 0 {
        if let Some(dir) = &args.export_caffe2 {
            trainer.export_caffe2(dir)?;
        }
        if let Some(path) = &args.export_onnx {
            trainer.export_onnx(path)?;
        }
    }

    let summary = Summary {
        depth: args.depth,
        devices: devices.iter().map(ToString::to_string).collect(),
        batch_per_device: args.batch_per_device,
        iters: first_iter + todo,
        first_iter,
        final_loss: losses.last().copied().unwrap_or(f32::NAN),
        losses,
        heldout_accuracy,
        images_per_sec,
        median_step_seconds: median(step_times),
        rank,
        comm_seconds: comm_seconds(),
    };
    if let (Some(path), 0) = (&args.summary_json, rank.0) {
        std::fs::write(path, summary.to_json()).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
    }
    Ok(summary)
}

/// Seconds spent in cross-rank collectives so far (0 without MPI).
fn comm_seconds() -> f64 {
    #[cfg(feature = "mpi")]
    if let Some(w) = dpm::comm::mpi::started() {
        return w.busy().as_secs_f64();
    }
    0.0
}

#[allow(dead_code)] // the tests include this file as a module and call `run`
/// The op types that took the most time per step, and what ran outside ops.
fn print_profile(times: &[(String, dpm::exec::OpTime)], steps: u64, wall: std::time::Duration) {
    let per_step = |d: std::time::Duration| 1e3 * d.as_secs_f64() / steps.max(1) as f64;
    let total: std::time::Duration = times.iter().map(|(_, t)| t.total).sum();
    eprintln!(
        "per step over {steps} profiled steps: {:.2} ms, {:.2} ms of it in ops",
        per_step(wall),
        per_step(total)
    );
    let host: std::time::Duration = times.iter().map(|(_, t)| t.host).sum();
    eprintln!(
        "host time in ops (for GPU ops: enqueueing): {:.2} ms",
        per_step(host)
    );
    eprintln!(
        "{:<28} {:>6} {:>10} {:>7} {:>10}",
        "op type", "runs", "ms", "share", "host ms"
    );
    for (op, t) in times.iter().take(20) {
        eprintln!(
            "{op:<28} {:>6} {:>10.3} {:>6.1}% {:>10.3}",
            t.runs / steps.max(1),
            per_step(t.total),
            100.0 * t.total.as_secs_f64() / total.as_secs_f64().max(1e-12),
            per_step(t.host)
        );
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let t = Instant::now();
    match run(&args) {
        Ok(s) if s.rank.0 != 0 => {
            dpm::comm::finalize();
            std::process::ExitCode::SUCCESS
        }
        Ok(s) => {
            dpm::comm::finalize();
            println!(
                "ResNet-{} on {}{} × {} images: {} iterations in {:.0} s, final loss {:.3}, held-out accuracy {:.1}%, {:.0} images/s",
                s.depth,
                s.devices.join(", "),
                if s.rank.1 > 1 { format!(" on each of {} ranks", s.rank.1) } else { String::new() },
                s.batch_per_device,
                s.iters,
                t.elapsed().as_secs_f64(),
                s.final_loss,
                100.0 * s.heldout_accuracy,
                s.images_per_sec
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            // No MPI_Finalize: mpirun then ends the other ranks too.
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
