use dpm::prelude::*;

// Input and update builders add ops; they return nothing.
#[data_parallel(update)]
fn update(m: &mut DeviceModel<'_>) -> Result<usize> {
    Sgd::new(0.1).build(m.model())?;
    Ok(1)
}

#[data_parallel(input)]
fn input(m: &mut DeviceModel<'_>) -> Blob<'_> {
    m.input("data")
}

fn main() {
    let _ = (update, input);
}
