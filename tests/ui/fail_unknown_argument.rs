use dpm::prelude::*;

#[data_parallel(backward)]
fn forward(m: &mut DeviceModel<'_>) -> Result<Blob<'_>> {
    Ok(m.input("data"))
}

fn main() {
    let _ = forward;
}
