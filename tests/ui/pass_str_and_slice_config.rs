use dpm::prelude::*;

/// `&str` and `&[T]` configuration is stored owned (`String`, `Vec<T>`).
#[data_parallel]
fn forward(m: &mut DeviceModel<'_>, prefix: &str, widths: &[usize]) -> Result<Losses<'_>> {
    let mut x = m.input_with_shape("data", [8]);
    for (i, &w) in widths.iter().enumerate() {
        x = m.fc(&format!("{prefix}{i}"), x, w)?;
    }
    let label = m.input("label");
    let (_, loss) = m.softmax_with_loss("loss", x, label)?;
    Ok(loss.into())
}

fn main() {
    let _ = Parallelize::new(ModelHelper::new("m"))
        .devices([Device::cpu(0)])
        .forward(forward("layer".to_owned(), vec![16, 4]))
        .build()
        .unwrap();
}
