use dpm::prelude::*;

#[data_parallel]
fn forward(m: &mut DeviceModel<'_>) -> Result<Blob<'_>> {
    Ok(m.input("features/data"))
}

fn main() {
    let _ = forward;
}
