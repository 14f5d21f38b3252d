use dpm::prelude::*;

fn layer<'d>(m: &mut DeviceModel<'d>, name: &str, x: Blob<'d>) -> Result<Blob<'d>> {
    m.fc(name, x, 4)
}

#[data_parallel]
fn forward(m: &mut DeviceModel<'_>) -> Result<Blob<'_>> {
    let x = m.input_with_shape("x", [2]);
    let _ = BlobRef::new("gpu_1/x");
    layer(m, "block/fc", x)
}

fn main() {
    let _ = forward;
}
