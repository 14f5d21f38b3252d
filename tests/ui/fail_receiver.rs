use dpm::prelude::*;

struct Model;

impl Model {
    // The first parameter is the per-device model, not `self`.
    #[data_parallel]
    fn forward(&self) -> Result<Losses<'static>> {
        Ok(Losses::default())
    }
}

fn main() {}
