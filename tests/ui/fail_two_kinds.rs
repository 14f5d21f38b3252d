use dpm::prelude::*;

// A function is one builder: forward, input or update.
#[data_parallel(forward, update)]
fn forward(m: &mut DeviceModel<'_>) -> Result<Blob<'_>> {
    Ok(m.input("data"))
}

fn main() {
    let _ = forward;
}
