use dpm::prelude::*;

// A blob made for one device cannot be used by another device's model.
fn mix<'a, 'b>(a: &mut DeviceModel<'a>, b: &mut DeviceModel<'b>) -> Result<Blob<'b>> {
    let x = a.input("data");
    b.relu(x)
}

fn main() {
    let _ = mix;
}
