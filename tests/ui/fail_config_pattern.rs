use dpm::prelude::*;

// Configuration parameters are stored in the builder by name.
#[data_parallel]
fn forward(m: &mut DeviceModel<'_>, (width, classes): (usize, usize)) -> Result<Blob<'_>> {
    let x = m.input_with_shape("x", [width]);
    m.fc("fc", x, classes)
}

fn main() {
    let _ = forward;
}
