use dpm::prelude::*;

#[data_parallel]
fn forward(m: &mut DeviceModel<'_>, counter: &mut usize) -> Result<Blob<'_>> {
    *counter += 1;
    Ok(m.input("data"))
}

fn main() {
    let _ = forward(0);
}
