use dpm::prelude::*;

// The builder is instantiated once per device by dpm, which cannot pick `T`.
#[data_parallel]
fn forward<T: Default>(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let _ = T::default();
    Ok(Losses::default())
}

fn main() {
    let _ = forward;
}
