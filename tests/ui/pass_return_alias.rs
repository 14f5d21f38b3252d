use dpm::prelude::*;

/// A type alias of an allowed return type works (the trait bound checks it).
type Out<'d> = Result<Losses<'d>>;

#[data_parallel]
fn forward(m: &mut DeviceModel<'_>) -> Out<'_> {
    let data = m.input_with_shape("data", [8]);
    let label = m.input("label");
    let logits = m.fc("fc", data, 4)?;
    let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
    Ok(loss.into())
}

fn main() {
    let _ = forward;
}
