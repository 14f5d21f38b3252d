//! What the macro emits when the input has errors: the errors, plus the builder
//! struct with a body that never runs, so the rest of the crate (and the IDE)
//! still sees `forward` and one mistake gives one error.

use proc_macro2::TokenStream;
use quote::{quote, ToTokens};

use crate::parse::Kind;

pub fn expand(f: &syn::ItemFn, kind: Kind, error: syn::Error) -> TokenStream {
    let errors = error.to_compile_error();
    // A method sits in an `impl`, where no struct can be declared: keep it as
    // written, so the one error is the macro's.
    if f.sig.receiver().is_some() {
        return quote!(#errors #f);
    }
    // Keep the configuration fields so that call sites still type-check, as the
    // macro would store them; a field with a lifetime (a Blob, a second model)
    // cannot be stored and was reported already: leave it out.
    let owned: Vec<std::borrow::Cow<'_, syn::Type>> = f
        .sig
        .inputs
        .iter()
        .skip(1)
        .filter_map(|a| match a {
            syn::FnArg::Typed(t) => Some(match &*t.ty {
                syn::Type::Reference(r) => crate::parse::owned(&r.elem),
                ty => std::borrow::Cow::Borrowed(ty),
            }),
            syn::FnArg::Receiver(_) => None,
        })
        .filter(|ty| {
            !ty.to_token_stream()
                .into_iter()
                .any(|t| matches!(t, proc_macro2::TokenTree::Punct(p) if p.as_char() == '\''))
        })
        .collect();
    let fields: Vec<&syn::Type> = owned.iter().map(|t| &**t).collect();
    let stub = crate::expand::wrap(f, kind, &fields, quote!(::core::unreachable!()));
    quote!(#errors #stub)
}

/// The part of a non-function item to put an error on: its first tokens.
pub fn item_head(item: &syn::Item) -> TokenStream {
    let tokens = item.to_token_stream();
    tokens.into_iter().take(2).collect()
}
