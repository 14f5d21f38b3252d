//! Expansion of a valid `#[data_parallel]` function: a unit struct named like
//! the function, implementing the builder trait by calling the function, kept
//! as written but with elided lifetimes bound to the device brand.

use proc_macro2::{Span, TokenStream};
use quote::quote;
use syn::visit_mut::VisitMut;
use syn::Lifetime;

use crate::parse::{Builder, Kind};

/// Replaces `'_` and missing lifetimes on `DeviceModel`, `Losses` and `Blob` with
/// the brand, so that `fn f(m: &mut DeviceModel<'_>) -> Result<Losses<'_>>` means
/// what it says.
struct Brand(Lifetime);

impl VisitMut for Brand {
    fn visit_lifetime_mut(&mut self, l: &mut Lifetime) {
        if l.ident == "_" {
            *l = self.0.clone();
        }
    }

    fn visit_path_segment_mut(&mut self, seg: &mut syn::PathSegment) {
        let branded = ["DeviceModel", "Losses", "Blob"].iter().any(|n| seg.ident == n);
        if branded && seg.arguments.is_empty() {
            let l = &self.0;
            seg.arguments = syn::PathArguments::AngleBracketed(syn::parse_quote!(<#l>));
        }
        syn::visit_mut::visit_path_segment_mut(self, seg);
    }

    fn visit_type_reference_mut(&mut self, r: &mut syn::TypeReference) {
        // The outer `&mut` keeps its own (elided) lifetime; only what is inside is branded.
        self.visit_type_mut(&mut r.elem);
    }
}

/// The function, renamed nowhere, with its signature branded.
pub fn branded_fn(b: &Builder<'_>) -> syn::ItemFn {
    let mut f = b.original.clone();
    let brand = match b.brand {
        Some(l) => l.clone(),
        None => {
            let l = Lifetime::new("'__dpm_device", Span::call_site());
            f.sig.generics.params.insert(0, syn::parse_quote!(#l));
            l
        }
    };
    let mut v = Brand(brand);
    for input in f.sig.inputs.iter_mut() {
        if let syn::FnArg::Typed(t) = input {
            v.visit_type_mut(&mut t.ty);
        }
    }
    if let syn::ReturnType::Type(_, ty) = &mut f.sig.output {
        v.visit_type_mut(ty);
    }
    f.vis = syn::Visibility::Inherited;
    f.attrs.retain(|a| !a.path().is_ident("doc"));
    f
}

pub fn expand(b: &Builder<'_>) -> TokenStream {
    let f = b.original;
    let name = &f.sig.ident;
    let inner = branded_fn(b);
    let args = b.extra.iter().enumerate().map(|(i, e)| {
        let i = syn::Index::from(i);
        if e.by_ref {
            quote!(&self.#i)
        } else {
            quote!(::core::clone::Clone::clone(&self.#i))
        }
    });
    let call = match b.kind {
        Kind::Forward => quote! {
            ::dpm::parallel::DeviceModel::within(model, device, |m| {
                let out = #name(m #(, #args)*);
                ::dpm::parallel::IntoLosses::into_losses(out, m)
            })
        },
        Kind::Input | Kind::Update => quote! {
            ::dpm::parallel::DeviceModel::within(model, device, |m| ::dpm::parallel::IntoUnit::into_unit(#name(m #(, #args)*)))
        },
    };
    let fields: Vec<&syn::Type> = b.extra.iter().map(|e| &*e.ty).collect();
    wrap(f, b.kind, &fields, quote!(#inner #call))
}

/// The unit struct and the builder-trait impl whose body is `body`.
pub fn wrap(f: &syn::ItemFn, kind: Kind, fields: &[&syn::Type], body: TokenStream) -> TokenStream {
    let name = &f.sig.ident;
    let vis = &f.vis;
    let docs = f.attrs.iter().filter(|a| a.path().is_ident("doc"));
    let (trait_, ret) = match kind {
        Kind::Forward => (
            quote!(ForwardBuilder),
            quote!(::dpm::Result<::std::vec::Vec<::dpm::graph::BlobRef>>),
        ),
        Kind::Input => (quote!(InputBuilder), quote!(::dpm::Result<()>)),
        Kind::Update => (quote!(UpdateBuilder), quote!(::dpm::Result<()>)),
    };
    // Without configuration the builder is a unit struct (`.forward(forward)`); with
    // it, a tuple struct built like a call (`.forward(resnet(config))`).
    let item = if fields.is_empty() {
        quote!(#[derive(Clone, Copy, Debug, Default)] #vis struct #name;)
    } else {
        quote!(#vis struct #name(#(pub #fields),*);)
    };
    quote! {
        #(#docs)*
        #[allow(non_camel_case_types)]
        #item

        impl ::dpm::parallel::#trait_ for #name {
            fn build(&self, model: &mut ::dpm::model::ModelHelper, device: ::dpm::graph::Device) -> #ret {
                #body
            }
        }
    }
}
