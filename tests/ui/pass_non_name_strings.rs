use dpm::prelude::*;

/// Strings that are not blob names may hold anything: a file path, a message.
#[data_parallel]
fn forward(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
    let classes = std::fs::read_to_string("data/classes.txt").map_or(4, |s| s.lines().count());
    let path = std::path::Path::new("cifar/data_batch_1.bin");
    println!("reading {} (gpu_0 style names are fine in messages)", path.display());
    let data = m.input_with_shape("data", [8]);
    let label = m.input("label");
    let logits = m.fc("fc", data, classes)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

fn main() {
    let _ = forward;
}
