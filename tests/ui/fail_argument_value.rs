use dpm::prelude::*;

// The kind takes no value.
#[data_parallel(forward = true)]
fn forward(m: &mut DeviceModel<'_>) -> Result<Blob<'_>> {
    Ok(m.input("data"))
}

fn main() {
    let _ = forward;
}
