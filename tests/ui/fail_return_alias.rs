use dpm::prelude::*;

/// An alias hides the type from the macro; the trait bound still refuses it.
type Count = Result<usize>;

#[data_parallel]
fn forward(m: &mut DeviceModel<'_>) -> Count {
    let _ = m.input("data");
    Ok(1)
}

fn main() {
    let _ = forward;
}
