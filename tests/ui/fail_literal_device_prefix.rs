use dpm::prelude::*;

#[data_parallel]
fn forward(m: &mut DeviceModel<'_>) -> Result<Blob<'_>> {
    Ok(m.input("gpu_1_data"))
}

#[data_parallel]
fn other(m: &mut DeviceModel<'_>) -> Result<Blob<'_>> {
    Ok(m.input("cpu_0"))
}

fn main() {
    let _ = (forward, other);
}
