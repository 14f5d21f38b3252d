use dpm::prelude::*;

// A builder builds a graph at run time: it cannot be a `const fn`.
#[data_parallel]
const fn forward(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    Ok(Losses::default())
}

fn main() {
    let _ = forward;
}
