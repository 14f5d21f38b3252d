//! What dpm guarantees whatever the input: no panic, abort or crash on sizes,
//! degenerate shapes or mutated nets (a bounded fuzz loop); a failed step
//! changes nothing, with faults injected into every phase on both executors;
//! NaN is never hidden; checkpoint files never mix.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use common::random;
use dpm::graph::DeviceType;
use dpm::ops::{Kernel, OpContext, Registry};
use dpm::parallel::FiniteCheck;
use dpm::prelude::*;
use prost::Message;

/// The tests of this file one at a time: the fault injection is process-wide.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn run_one(build: impl FnOnce(&mut Net), feeds: Vec<(&str, Tensor)>) -> Result<Workspace> {
    let mut net = Net::new("one");
    build(&mut net);
    let ws = Workspace::new();
    for (n, t) in feeds {
        ws.feed(n, t);
    }
    ws.run_net_once(net.proto())?;
    Ok(ws)
}

// ---- never crash --------------------------------------------------------------

#[test]
fn impossible_sizes_are_errors_naming_the_blob() {
    let _serial = serial();
    // The element count overflows: it must not wrap to a small number.
    assert!(Tensor::from_vec::<f32>([1 << 62, 4], vec![]).is_none());
    assert_eq!(Shape::from([1usize << 62, 4]).checked_numel(), None);
    assert_eq!(Shape::from([1usize << 62, 4]).numel(), usize::MAX);
    for shape in [
        vec![1i64 << 62, 4],
        vec![1 << 40],
        vec![1 << 21, 1 << 21, 1 << 21],
    ] {
        let e = run_one(
            |n| {
                n.op("ConstantFill")
                    .output("big")
                    .arg("shape", shape.clone())
                    .build();
            },
            vec![],
        )
        .err()
        .expect("cannot be allocated");
        let text = e.to_string();
        assert!(
            matches!(e.root(), Error::Allocation { blob, .. } if blob == "big"),
            "{shape:?}: {e:?}"
        );
        assert!(
            text.contains("cannot allocate") && text.contains("`big`"),
            "{text}"
        );
    }
    // A refused size leaves the tensor as it was.
    let mut t = Tensor::from_vec([2], vec![1.0f32, 2.0]).unwrap();
    assert!(t.resize::<f32>([1usize << 62, 8]).is_err());
    assert_eq!(t.data::<f32>().unwrap(), &[1.0, 2.0]);
}

#[test]
fn degenerate_shapes_are_errors_or_empty_results() {
    let _serial = serial();
    // Zero rows through FC and the softmax loss: empty outputs, a zero loss.
    let ws = run_one(
        |n| {
            n.op("FC").inputs(["x", "w", "b"]).output("y").build();
            n.op("SoftmaxWithLoss")
                .inputs(["y", "label"])
                .outputs(["p", "loss"])
                .build();
        },
        vec![
            ("x", Tensor::zeros::<f32>([0, 3])),
            ("w", random(&[4, 3], 1, -1.0, 1.0, 0.0)),
            ("b", Tensor::zeros::<f32>([4])),
            ("label", Tensor::zeros::<i32>([0])),
        ],
    )
    .unwrap();
    assert_eq!(ws.fetch("y").unwrap().dims(), &[0, 4]);
    assert_eq!(ws.fetch("loss").unwrap().data::<f32>().unwrap(), &[0.0]);
    let x = || random(&[1, 1, 4, 4], 2, -1.0, 1.0, 0.0);
    // Pool padding as large as the window: an error, as in Caffe2.
    let e = run_one(
        |n| {
            n.op("MaxPool")
                .input("x")
                .output("y")
                .arg("kernel", 2i64)
                .arg("pad", 2i64)
                .build();
        },
        vec![("x", x())],
    )
    .err()
    .unwrap();
    assert!(
        e.to_string().contains("must be smaller than the pooling window"),
        "{e}"
    );
    // A window that does not fit, and padding that makes planes too large to lay out.
    for (k, s, p) in [(9i64, 1i64, 0i64), (3, 1i64 << 40, (1 << 40) - 1)] {
        let e = run_one(
            |n| {
                n.op("Conv")
                    .inputs(["x", "w"])
                    .output("y")
                    .arg("kernel", k)
                    .arg("stride", s)
                    .arg("pad", p)
                    .build();
            },
            vec![
                ("x", x()),
                ("w", Tensor::zeros::<f32>([1, 1, k as usize, k as usize])),
            ],
        )
        .err()
        .unwrap();
        assert!(
            matches!(e.root(), Error::ShapeMismatch { .. } | Error::Allocation { .. }),
            "{e:?}"
        );
    }
}

#[test]
fn a_net_name_with_a_nul_byte_runs_on_the_dag_executor() {
    let _serial = serial();
    let mut net = Net::new("bad\0name");
    net.op("ConstantFill")
        .output("x")
        .arg("shape", vec![2i64])
        .arg("value", 1.0f32)
        .build();
    net.op("Relu").input("x").output("y").build();
    let mut p = net.into_proto();
    p.r#type = Some("dag".into());
    let ws = Workspace::new();
    ws.run_net_once(&p).unwrap();
    assert_eq!(ws.fetch("y").unwrap().data::<f32>().unwrap(), &[1.0, 1.0]);
}

// ---- NaN is never hidden ---------------------------------------------------------

#[test]
fn nan_propagates_through_relu_and_makes_accuracy_count_the_row_wrong() {
    let _serial = serial();
    let ws = run_one(
        |n| {
            n.op("Relu").input("x").output("y").build();
            n.op("Accuracy").inputs(["scores", "label"]).output("acc").build();
        },
        vec![
            ("x", Tensor::from_vec([3], vec![f32::NAN, -1.0, 2.0]).unwrap()),
            (
                "scores",
                Tensor::from_vec([2, 2], vec![f32::NAN, 0.0, 1.0, 0.0]).unwrap(),
            ),
            ("label", Tensor::from_vec([2], vec![0i32, 0]).unwrap()),
        ],
    )
    .unwrap();
    let y = ws.fetch("y").unwrap();
    let y = y.data::<f32>().unwrap();
    assert!(y[0].is_nan() && y[1] == 0.0 && y[2] == 2.0, "{y:?}");
    // Row 0's label score is NaN: wrong, not right; row 1 is right.
    assert_eq!(ws.fetch("acc").unwrap().data::<f32>().unwrap(), &[0.5]);
}

// ---- a small conv + batch-norm model, 2 devices ---------------------------------

#[data_parallel]
fn convnet(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [2, 6, 6]);
    let label = m.input("label");
    let x = m.conv("conv", data, 4, 3).pad(1).build()?;
    let x = m.spatial_bn("bn", x)?;
    let x = m.relu(x)?;
    let x = m.global_average_pool(x)?;
    let logits = m.fc("fc", x, 3)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

fn images() -> impl FnMut() -> Result<Vec<(String, Tensor)>> {
    let mut step = 0u64;
    move || {
        step += 1;
        let x = random(&[8, 2, 6, 6], step, -1.0, 3.0, 0.0);
        let y: Vec<i32> = (0..8).map(|i| ((i as u64 + step) % 3) as i32).collect();
        Ok(vec![
            ("data".to_owned(), x),
            ("label".to_owned(), Tensor::from_vec([8], y).unwrap()),
        ])
    }
}

fn trainer(net_type: &str, lr: f32) -> Trainer {
    accumulating_trainer(net_type, lr, 1)
}

/// [`trainer`], each step accumulating the gradients of `k` batches.
fn accumulating_trainer(net_type: &str, lr: f32, k: usize) -> Trainer {
    let mut model = ModelHelper::new("convnet");
    model.set_seed(3);
    let mut t = Parallelize::new(model)
        .devices([Device::cpu(0), Device::cpu(1)])
        .input(images())
        .forward(convnet)
        .update(Sgd::new(lr).momentum(0.9).weight_decay(1e-4))
        .net_type(net_type)
        // Small gradient buckets: several all-reduces, some of several tensors.
        .bucket_bytes(64)
        .gradient_accumulation(k)
        .build()
        .unwrap();
    t.run_init().unwrap();
    t
}

/// Every parameter, momentum, running statistic and `ITER`, on every device.
fn state(t: &Trainer) -> Vec<(String, Tensor)> {
    let mut names: Vec<String> = t.workspace().blob_names();
    names.retain(|n| {
        n.ends_with("_w")
            || n.ends_with("_b")
            || n.ends_with("_s")
            || n.ends_with("_momentum")
            || n.ends_with("ITER")
            || n.ends_with("_rm")
            || n.ends_with("_riv")
    });
    assert!(names.len() >= 20, "{names:?}");
    names
        .into_iter()
        .map(|n| (n.clone(), t.workspace().fetch(&n).unwrap()))
        .collect()
}

fn same(a: &[(String, Tensor)], b: &[(String, Tensor)], what: &str) {
    assert_eq!(a.len(), b.len());
    for ((n, x), (_, y)) in a.iter().zip(b) {
        assert!(x.bitwise_eq(y), "{what}: `{n}` differs");
    }
}

// ---- a failed step changes nothing ----------------------------------------------

/// (op type, calls left before it fails); `None` = every kernel runs normally.
static FAULT: Mutex<Option<(&'static str, usize)>> = Mutex::new(None);
static INJECTED: AtomicUsize = AtomicUsize::new(0);

/// A kernel that fails when armed for its op type, else runs the real one.
struct Faulty {
    op: &'static str,
    inner: Box<dyn Kernel>,
}

impl Kernel for Faulty {
    fn in_place(&self) -> &[(usize, usize)] {
        self.inner.in_place()
    }

    fn run(&self, ctx: &mut OpContext<'_>) -> Result<()> {
        {
            let mut f = FAULT.lock().unwrap();
            if let Some((op, left)) = f.as_mut() {
                if *op == self.op {
                    if *left == 0 {
                        *f = None;
                        INJECTED.fetch_add(1, Ordering::Relaxed);
                        return Err(Error::value(ctx.output_name(0), "injected fault"));
                    }
                    *left -= 1;
                }
            }
        }
        self.inner.run(ctx)
    }
}

fn real(op: &dpm::proto::OperatorDef) -> Result<Box<dyn Kernel>> {
    static CPU: OnceLock<Registry> = OnceLock::new();
    CPU.get_or_init(|| {
        let mut r = Registry::default();
        dpm::ops::cpu::register(&mut r);
        dpm::comm::register(&mut r);
        r
    })
    .create(op, DeviceType::Cpu)
}

macro_rules! faulty {
    ($($op:literal),*) => {
        fn install_faults() {
            static ONCE: OnceLock<()> = OnceLock::new();
            ONCE.get_or_init(|| {
                $(Registry::register_global($op, DeviceType::Cpu, |op| {
                    Ok(Box::new(Faulty { op: $op, inner: real(op)? }))
                });)*
            });
        }
    };
}
// One op of each phase: forward, backward, all-reduce, update (batch norm and
// relu run fused, and so do the weight decay and the update, see `exec::fuse`).
faulty!(
    "SpatialBN+Relu",
    "ReluGradient+SpatialBNGradient",
    "Allreduce",
    "WeightedSum+MomentumSGDUpdate"
);

/// Fails `t`'s next step at call `fault.1` of op type `fault.0`, checks the
/// step failed with the injected fault and changed no state, then runs
/// `steps` more (the retried step takes the same batch) and checks the run
/// ends with state `want`, as if nothing had happened.
fn fail_once_then_finish(
    t: &mut Trainer,
    fault: (&'static str, usize),
    steps: usize,
    want: &[(String, Tensor)],
    what: &str,
) {
    let (op, nth) = fault;
    let before = state(t);
    *FAULT.lock().unwrap() = Some(fault);
    let injected = INJECTED.load(Ordering::Relaxed);
    let e = t.step().expect_err("the fault must fail the step");
    assert!(
        INJECTED.load(Ordering::Relaxed) > injected,
        "{op} #{nth} never ran"
    );
    assert!(e.to_string().contains("injected fault"), "{e}");
    same(&state(t), &before, &format!("{what}: after the failed step"));
    t.run(steps).unwrap();
    same(&state(t), want, &format!("{what}: at the end"));
}

#[test]
fn a_step_that_fails_in_any_phase_changes_nothing_and_the_run_continues_exactly() {
    let _serial = serial();
    install_faults();
    const STEPS: usize = 5;
    // The DAG executor three times: its order varies from run to run.
    for net_type in ["dag", "dag", "dag", "simple"] {
        let mut reference = trainer(net_type, 0.05);
        reference.run(STEPS).unwrap();
        let want = state(&reference);
        let buckets = reference
            .model()
            .net()
            .ops()
            .iter()
            .filter(|o| o.op_type() == "Allreduce")
            .count();
        assert!(buckets >= 3, "{buckets} all-reduces");
        // Which call of the op in the step fails: each op runs once per device
        // (batch norm + relu, its gradient, the 12 updates) or per gradient bucket.
        for (op, calls) in [
            ("SpatialBN+Relu", &[0, 1][..]),
            ("ReluGradient+SpatialBNGradient", &[0, 1]),
            ("Allreduce", &[0, buckets / 2, buckets - 1]),
            ("WeightedSum+MomentumSGDUpdate", &[0, 5, 11]),
        ] {
            for &nth in calls {
                let mut t = trainer(net_type, 0.05);
                t.run(2).unwrap();
                let what = format!("{net_type}, {op} #{nth}");
                fail_once_then_finish(&mut t, (op, nth), STEPS - 2, &want, &what);
            }
        }
    }
}

#[test]
fn with_gradient_accumulation_a_failed_step_changes_nothing_either() {
    // A step runs several nets (a forward and backward per batch, then the
    // all-reduce and update): state the first batch changed (batch-norm
    // running statistics) is put back when a later net fails.
    let _serial = serial();
    install_faults();
    const STEPS: usize = 4;
    for net_type in ["dag", "simple"] {
        let mut reference = accumulating_trainer(net_type, 0.05, 2);
        reference.run(STEPS).unwrap();
        let want = state(&reference);
        // Batch norm + relu runs once per device and batch: calls 2 and 3 are
        // the second batch's.
        for (op, nth) in [
            ("SpatialBN+Relu", 2),
            ("SpatialBN+Relu", 3),
            ("ReluGradient+SpatialBNGradient", 3),
            ("WeightedSum+MomentumSGDUpdate", 0),
            ("WeightedSum+MomentumSGDUpdate", 11),
        ] {
            let mut t = accumulating_trainer(net_type, 0.05, 2);
            t.run(1).unwrap();
            let what = format!("{net_type}, accumulating, {op} #{nth}");
            fail_once_then_finish(&mut t, (op, nth), STEPS - 1, &want, &what);
        }
    }
}

#[test]
fn a_diverged_step_is_refused_and_changes_nothing() {
    let _serial = serial();
    let mut t = trainer("dag", 1e30);
    t.set_finite_check(FiniteCheck::LossAndGradients);
    t.run(1).unwrap();
    let mut diverged = None;
    for _ in 0..20 {
        let before = state(&t);
        match t.step() {
            Ok(()) => continue,
            Err(e) => {
                same(&state(&t), &before, "after the refused step");
                diverged = Some(e);
                break;
            }
        }
    }
    let e = diverged.expect("a learning rate of 1e30 diverges");
    assert!(matches!(e, Error::NonFinite { .. }), "{e:?}");
    assert!(e.to_string().contains("not finite"), "{e}");
}

// ---- checkpoints ------------------------------------------------------------------

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dpm-rel-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn a_checkpoint_with_nan_or_a_negative_iteration_is_refused_naming_the_tensor() {
    let _serial = serial();
    let dir = scratch("bad-values");
    let t = trainer("simple", 0.05);
    let path = dir.join("c.safetensors");
    t.save(&path).unwrap();
    let mut contents = dpm::checkpoint::load(&path).unwrap();
    for (key, bad) in [
        ("fc_w", Tensor::from_vec([3, 4], vec![f32::NAN; 12]).unwrap()),
        ("ITER", Tensor::from_vec([1], vec![-5i64]).unwrap()),
    ] {
        let saved = contents.tensors.clone();
        for (k, v) in contents.tensors.iter_mut() {
            if k == key {
                *v = bad.clone();
            }
        }
        let bad_path = dir.join(format!("{key}.safetensors"));
        dpm::checkpoint::save(&bad_path, &contents.tensors, Default::default()).unwrap();
        contents.tensors = saved;
        let mut fresh = trainer("simple", 0.05);
        let before = state(&fresh);
        let e = fresh.load(&bad_path).unwrap_err().to_string();
        assert!(e.contains(&format!("`{key}`")), "{e}");
        same(&state(&fresh), &before, "after a refused checkpoint");
    }
}

#[test]
fn two_saves_to_one_path_never_mix_and_dead_saves_are_cleaned() {
    let _serial = serial();
    let dir = scratch("saves");
    let path = dir.join("c.safetensors");
    // A temporary file of a save whose process died (no such pid).
    std::fs::write(dir.join(".c.safetensors.tmp.4000000000.0"), b"partial").unwrap();
    let big = |v: f32| {
        vec![(
            "w".to_owned(),
            Tensor::from_vec([1 << 18], vec![v; 1 << 18]).unwrap(),
        )]
    };
    std::thread::scope(|s| {
        for v in [1.0f32, 2.0] {
            let path = &path;
            s.spawn(move || {
                for _ in 0..10 {
                    dpm::checkpoint::save(path, &big(v), Default::default()).unwrap();
                }
            });
        }
    });
    let c = dpm::checkpoint::load(&path).unwrap();
    let w = c.tensors[0].1.data::<f32>().unwrap();
    assert!(
        w.iter().all(|&x| x == w[0]) && (w[0] == 1.0 || w[0] == 2.0),
        "a mixed file"
    );
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["c.safetensors"], "temporary files were left behind");
}

// ---- fuzz -------------------------------------------------------------------------

/// A small xorshift generator: the loop is reproducible from its seed.
struct Fuzz(u64);

impl Fuzz {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Integers that find edges: small ones, and ones too large for any tensor.
    fn int(&mut self) -> i64 {
        const EDGES: [i64; 9] = [0, 1, -1, 2, 3, 7, 1 << 40, 1 << 62, i64::MAX];
        EDGES[self.below(EDGES.len())]
    }
}

/// Mutates the decoded net: op types swapped, blobs renamed or dropped, ops
/// duplicated or removed, arguments set to edge values.
fn mutate(net: &mut NetDef, f: &mut Fuzz) {
    const TYPES: [&str; 10] = [
        "FC",
        "Conv",
        "Relu",
        "Sum",
        "MaxPool",
        "SpatialBN",
        "SoftmaxWithLoss",
        "Reshape",
        "Allreduce",
        "NoSuchOp",
    ];
    for _ in 0..1 + f.below(3) {
        if net.op.is_empty() {
            return;
        }
        let i = f.below(net.op.len());
        match f.below(7) {
            0 => net.op[i].r#type = Some(TYPES[f.below(TYPES.len())].into()),
            1 if !net.op[i].input.is_empty() => {
                let j = f.below(net.op[i].input.len());
                net.op[i].input.remove(j);
            }
            2 if !net.op[i].input.is_empty() => {
                let j = f.below(net.op[i].input.len());
                let other = net.op[f.below(net.op.len())]
                    .output
                    .first()
                    .cloned()
                    .unwrap_or_default();
                net.op[i].input[j] = other;
            }
            3 => {
                let op = net.op[i].clone();
                net.op.insert(f.below(net.op.len()), op);
            }
            4 => {
                net.op.remove(i);
            }
            5 if !net.op[i].arg.is_empty() => {
                let j = f.below(net.op[i].arg.len());
                let v = f.int();
                let a = &mut net.op[i].arg[j];
                if a.i.is_some() {
                    a.i = Some(v);
                }
                if !a.ints.is_empty() {
                    let k = f.below(a.ints.len());
                    a.ints[k] = v;
                }
                if a.f.is_some() {
                    a.f = Some(f32::from_bits(f.next() as u32));
                }
            }
            _ => net.op[i].output.push(format!("extra{}", f.below(3))),
        }
    }
}

#[test]
fn mutated_training_nets_are_errors_never_crashes() {
    let _serial = serial();
    install_faults(); // the overrides delegate to the real kernels when disarmed
    let t = trainer("dag", 0.05);
    let init = t.model().init_net().proto().clone();
    let train = t.model().net().proto().clone();
    let feeds = images()().unwrap();
    let (x, y) = (feeds[0].1.clone(), feeds[1].1.clone());
    let bytes = train.encode_to_vec();
    // DPM_FUZZ_SEED explores further (the default is what CI runs).
    let seed = std::env::var("DPM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x9e37_79b9_7f4a_7c15u64);
    let mut f = Fuzz(seed.max(1));
    let (mut ran, mut refused) = (0, 0);
    for round in 0..4000 {
        // Half the rounds flip raw bytes, half mutate the structure.
        let net = if round % 2 == 0 {
            let mut b = bytes.clone();
            for _ in 0..1 + f.below(4) {
                let i = f.below(b.len());
                b[i] ^= 1 << f.below(8);
            }
            if f.below(4) == 0 {
                b.truncate(f.below(b.len()));
            }
            match NetDef::decode(b.as_slice()) {
                Ok(n) => n,
                Err(_) => {
                    refused += 1;
                    continue;
                }
            }
        } else {
            let mut n = train.clone();
            mutate(&mut n, &mut f);
            n
        };
        let ws = Workspace::new();
        ws.run_net_once(&init).unwrap();
        for d in 0..2 {
            ws.feed(format!("cpu_{d}/data"), x.clone());
            ws.feed(format!("cpu_{d}/label"), y.clone());
        }
        if std::env::var_os("DPM_FUZZ_TRACE").is_some() {
            use std::io::Write;
            for (i, op) in net.op.iter().enumerate() {
                if !train.op.contains(op) {
                    let _ = writeln!(std::io::stderr(), "round {round}: op {i} {op:?}");
                }
            }
        }
        // Any result but a crash: the executor turns kernel panics into errors,
        // so a panic reaching here is a bug outside the kernels.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ws.run_net_once(&net)));
        match r {
            Ok(Ok(())) => ran += 1,
            Ok(Err(e)) => {
                assert!(
                    !matches!(e.root(), Error::KernelPanic(_)),
                    "round {round}: a kernel panicked: {e}"
                );
                refused += 1
            }
            Err(_) => panic!("round {round}: the executor panicked on a mutated net"),
        }
    }
    assert!(ran > 0 && refused > 0, "ran {ran}, refused {refused}");
}

// ---- namescope checks ---------------------------------------------------------------

fn mlp_build(forward: impl dpm::parallel::ForwardBuilder + 'static) -> Result<Trainer> {
    Parallelize::new(ModelHelper::new("mlp"))
        .devices([Device::cpu(0), Device::cpu(1)])
        .forward(forward)
        .update(Sgd::new(0.1))
        .build()
}

#[test]
fn names_the_macro_cannot_see_are_checked_when_the_replicas_are_built() {
    let _serial = serial();
    // Built at run time: `format!`, a variable, a `String` + "/x".
    for bad in [
        format!("cpu_{}/data", 1),
        "features/data".to_owned(),
        String::from("gpu_0") + "_x",
    ] {
        let name = bad.clone();
        let e = mlp_build(move |m: &mut ModelHelper| {
            let data = m.blob(&name);
            let label = m.blob("label");
            let logits = m.fc("fc", &data, 4, 2)?;
            let (_, loss) = m.softmax_with_loss(&logits, &label, "loss");
            Ok(vec![loss])
        })
        .err()
        .expect("a bad name must not build");
        let text = e.to_string();
        assert!(text.contains(&format!("blob name `{bad}`")), "{text}");
        assert!(text.contains("relative to the device scope"), "{text}");
    }
    // A raw op writing another replica's blob.
    let e = mlp_build(|m: &mut ModelHelper| {
        let data = m.blob("data");
        let label = m.blob("label");
        m.net_mut()
            .op("Copy")
            .input(&data)
            .output(BlobRef::new("cpu_1/stolen"))
            .build();
        let logits = m.fc("fc", &data, 4, 2)?;
        let (_, loss) = m.softmax_with_loss(&logits, &label, "loss");
        Ok(vec![loss])
    });
    // Copy may cross devices; a compute op may not.
    assert!(e.is_ok(), "{:?}", e.err());
    let e = mlp_build(|m: &mut ModelHelper| {
        let data = m.blob("data");
        let label = m.blob("label");
        m.net_mut()
            .op("Relu")
            .input(&data)
            .output(BlobRef::new("cpu_1/stolen"))
            .build();
        let logits = m.fc("fc", &data, 4, 2)?;
        let (_, loss) = m.softmax_with_loss(&logits, &label, "loss");
        Ok(vec![loss])
    })
    .err()
    .expect("a replica writing another's blob must not build");
    assert!(e.to_string().contains("touches `cpu_1/stolen`"), "{e}");
}

#[data_parallel]
fn logits_as_loss(m: &mut DeviceModel<'_>) -> Result<Blob<'_>> {
    let x = m.input_with_shape("data", [8]);
    m.fc("fc", x, 4)
}

#[test]
fn a_loss_that_is_not_a_scalar_is_a_build_error_naming_the_blob() {
    let _serial = serial();
    let e = Parallelize::new(ModelHelper::new("m"))
        .devices([Device::cpu(0)])
        .forward(logits_as_loss)
        .update(Sgd::new(0.1))
        .build()
        .err()
        .expect("logits are not a loss");
    let text = e.to_string();
    assert!(
        text.contains("the loss `cpu_0/fc`") && text.contains("not a scalar"),
        "{text}"
    );
}
