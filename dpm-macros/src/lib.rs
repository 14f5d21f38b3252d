//! Procedural macros of dpm. Use them through the `dpm` crate.
//!
//! `#[data_parallel]` turns a forward function written once, for one device,
//! into a builder `Parallelize` calls once per device. The pipeline follows
//! thiserror's: `parse.rs` reads the function into a small IR borrowing the
//! syntax, `check.rs` holds the rules and collects every error at once, and
//! `expand.rs` cannot fail. On error `fallback.rs` still emits the item, so one
//! mistake gives one error.

mod check;
mod expand;
mod fallback;
mod parse;

use proc_macro::TokenStream;

/// Marks a function as a per-device builder of a data-parallel model.
///
/// ```
/// use dpm::prelude::*;
///
/// #[data_parallel]
/// fn forward(m: &mut DeviceModel<'_>) -> Result<Losses<'_>> {
///     let data = m.input_with_shape("data", [8]);
///     let label = m.input("label");
///     let h = m.fc("fc1", data, 16)?;
///     let h = m.relu(h)?;
///     let logits = m.fc("fc2", h, 4)?;
///     let (_, loss) = m.softmax_with_loss("loss", logits, label)?;
///     Ok(loss.into())
/// }
///
/// let trainer = Parallelize::new(ModelHelper::new("mlp"))
///     .devices([Device::cpu(0), Device::cpu(1)])
///     .forward(forward)
///     .update(Sgd::new(0.1))
///     .build()?;
/// // One replica per device, each in its own namescope.
/// let fc1 = |d: u32| format!("cpu_{d}/fc1");
/// let ops = trainer.model().net().ops();
/// assert!(ops.iter().any(|o| o.op_type() == "FC" && o.output == [fc1(0)]));
/// assert!(ops.iter().any(|o| o.op_type() == "FC" && o.output == [fc1(1)]));
/// # Ok::<(), dpm::Error>(())
/// ```
///
/// Arguments: none or `forward` (returns losses: `Losses`, a `Blob`, a
/// `Vec<Blob>`, or a `Result` of one), `input` or `update` (return `()` or
/// `Result<()>`). The function takes exactly one parameter, `&mut DeviceModel`;
/// elided lifetimes in its signature all become the device's brand. Blob names
/// given as string literals are relative to the device scope: a literal
/// containing `/` or a device prefix (`cpu_0`, `gpu_1`) is a compile error.
#[proc_macro_attribute]
pub fn data_parallel(args: TokenStream, item: TokenStream) -> TokenStream {
    let args = proc_macro2::TokenStream::from(args);
    let item = proc_macro2::TokenStream::from(item);
    match syn::parse2::<syn::Item>(item.clone()) {
        Ok(syn::Item::Fn(f)) => {
            let mut errors = check::Errors::default();
            let kind = parse::parse_args(args, &mut errors);
            let ir = parse::Builder::from_fn(&f, kind, &mut errors);
            if let Some(ir) = &ir {
                check::check(ir, &mut errors);
            }
            match (ir, errors.finish()) {
                (Some(ir), Ok(())) => expand::expand(&ir),
                (_, Err(e)) => fallback::expand(&f, kind, e),
                (None, Ok(())) => {
                    fallback::expand(&f, kind, syn::Error::new_spanned(&f.sig, "invalid signature"))
                }
            }
            .into()
        }
        Ok(other) => {
            let e = syn::Error::new_spanned(
                fallback::item_head(&other),
                "#[data_parallel] applies to a function: `fn forward(m: &mut DeviceModel<'_>) -> Result<Losses<'_>>`",
            );
            let err = e.to_compile_error();
            quote::quote!(#other #err).into()
        }
        Err(e) => {
            let err = e.to_compile_error();
            quote::quote!(#item #err).into()
        }
    }
}
