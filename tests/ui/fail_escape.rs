use std::cell::RefCell;

use dpm::prelude::*;

thread_local! {
    static KEPT: RefCell<Vec<Blob<'static>>> = RefCell::new(Vec::new());
}

// A blob cannot outlive the build of its device.
#[data_parallel]
fn forward(m: &mut DeviceModel<'_>) -> Result<Blob<'_>> {
    let x = m.input("data");
    KEPT.with(|k| k.borrow_mut().push(x));
    Ok(x)
}

fn main() {
    let _ = forward;
}
