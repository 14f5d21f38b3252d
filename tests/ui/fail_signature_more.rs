use dpm::prelude::*;

#[data_parallel]
unsafe fn not_unsafe(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    Ok(Losses::default())
}

#[data_parallel]
fn no_const_generics<const N: usize>(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    Ok(Losses::default())
}

#[data_parallel]
fn blob_config<'d>(m: &mut DeviceModel<'d>, x: Blob<'d>) -> Result<Losses<'d>> {
    Ok(Losses::default())
}

#[data_parallel]
fn two_models(m: &mut DeviceModel<'_>, other: &mut DeviceModel<'_>) -> Result<Losses<'static>> {
    Ok(Losses::default())
}

fn main() {}
