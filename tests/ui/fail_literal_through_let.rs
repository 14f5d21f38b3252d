use dpm::prelude::*;

#[data_parallel]
fn forward(m: &mut DeviceModel<'_>) -> Result<Blob<'_>> {
    let name = "cpu_0_data";
    let other = concat!("features", "/", "data");
    let _ = m.input(other);
    Ok(m.input(name))
}

fn main() {
    let _ = forward;
}
