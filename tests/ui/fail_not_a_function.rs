use dpm::prelude::*;

#[data_parallel]
struct Forward;

fn main() {}
