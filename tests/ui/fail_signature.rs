use dpm::prelude::*;

#[data_parallel]
async fn not_async(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    Ok(Losses::default())
}

#[data_parallel]
fn no_model() -> Result<Losses<'static>> {
    Ok(Losses::default())
}

#[data_parallel]
fn wrong_model(m: &mut ModelHelper) -> Result<Losses<'static>> {
    Ok(Losses::default())
}

#[data_parallel]
fn returns_a_number(m: &mut DeviceModel<'_>) -> i32 {
    1
}

#[data_parallel]
fn returns_nothing(m: &mut DeviceModel<'_>) {}

fn main() {
    let _ = (not_async, no_model, wrong_model, returns_a_number, returns_nothing);
}
