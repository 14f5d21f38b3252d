use dpm::prelude::*;

#[data_parallel]
fn forward(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let data = m.input_with_shape("data", [8]);
    let label = m.input("label");
    let logits = m.fc("fc", data, 4)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

/// Elided brands, a bare blob as the loss, and a named lifetime all work.
#[data_parallel(forward)]
fn single(m: &mut DeviceModel) -> Result<Blob> {
    let x = m.input_with_shape("x", [2]);
    m.fc("fc", x, 1)
}

#[data_parallel]
fn named<'d>(m: &mut DeviceModel<'d>) -> Vec<Blob<'d>> {
    vec![m.input("loss")]
}

#[data_parallel(input)]
fn inputs(m: &mut DeviceModel<'_>) {
    let _ = m.input("data");
}

fn main() {
    let _ = Parallelize::new(ModelHelper::new("m"))
        .devices([Device::cpu(0)])
        .input_builder(inputs)
        .forward(forward);
    let _ = (single, named);
}

/// Configuration parameters: kept in the builder, passed to every device's build.
#[derive(Clone)]
struct Config {
    width: usize,
}

#[data_parallel]
fn configured(m: &mut DeviceModel<'_>, cfg: &Config, classes: usize) -> Result<Blob<'_>> {
    let x = m.input_with_shape("x", [cfg.width]);
    m.fc("fc", x, classes)
}

#[allow(dead_code)]
fn uses_config() {
    let _ = Parallelize::new(ModelHelper::new("m")).forward(configured(Config { width: 4 }, 3));
}
