//! Parsing: the attribute arguments and the function into a small IR that
//! borrows the original syntax.

use proc_macro2::TokenStream;
use syn::{FnArg, ItemFn, Lifetime, ReturnType, Type};

use crate::check::Errors;

/// Which builder the function is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Adds the forward pass; returns losses.
    Forward,
    /// Adds input ops.
    Input,
    /// Adds the parameter update.
    Update,
}

impl Kind {
    const ALL: [(&'static str, Kind); 3] = [
        ("forward", Kind::Forward),
        ("input", Kind::Input),
        ("update", Kind::Update),
    ];
}

/// Reads `forward` | `input` | `update` (default `forward`).
pub fn parse_args(args: TokenStream, errors: &mut Errors) -> Kind {
    if args.is_empty() {
        return Kind::Forward;
    }
    let parsed = syn::parse::Parser::parse2(
        syn::punctuated::Punctuated::<syn::Meta, syn::Token![,]>::parse_terminated,
        args.clone(),
    );
    let metas = match parsed {
        Ok(m) => m,
        Err(e) => {
            errors.push(e);
            return Kind::Forward;
        }
    };
    let mut kind = None;
    for meta in &metas {
        let known = meta
            .path()
            .get_ident()
            .and_then(|i| Kind::ALL.iter().find(|(n, _)| i == n).map(|(_, k)| *k));
        match (known, meta) {
            (Some(k), syn::Meta::Path(_)) if kind.is_none() => kind = Some(k),
            (Some(_), syn::Meta::Path(_)) => {
                errors.spanned(meta, "only one of `forward`, `input`, `update` may be given")
            }
            (Some(_), _) => errors.spanned(meta, "takes no value: write `#[data_parallel(forward)]`"),
            (None, _) => errors.spanned(
                meta.path(),
                "unknown argument; #[data_parallel] takes one of `forward` (the default), `input`, `update`",
            ),
        }
    }
    kind.unwrap_or(Kind::Forward)
}

/// A builder function, as the macro sees it.
pub struct Builder<'a> {
    /// The function as written.
    pub original: &'a ItemFn,
    /// Which builder it is.
    pub kind: Kind,
    /// The brand lifetime the user named, if any (`None`: elided, `'_` or absent).
    pub brand: Option<&'a Lifetime>,
    /// The return type.
    pub output: &'a ReturnType,
    /// Parameters after the model: configuration the builder carries.
    pub extra: Vec<Extra<'a>>,
    /// The model parameter's name (`m` in `m: &mut DeviceModel<'_>`), if a plain one.
    pub model: Option<&'a syn::Ident>,
}

/// A configuration parameter after the model: stored in the builder struct and
/// passed to every per-device call, by reference (`&T`) or as a clone (`T`).
pub struct Extra<'a> {
    /// The type stored in the struct: the parameter's, or its owned form for
    /// `&str` (`String`) and `&[T]` (`Vec<T>`).
    pub ty: std::borrow::Cow<'a, Type>,
    /// Whether the function takes it by reference.
    pub by_ref: bool,
}

/// The last path segment of a type, with its generic arguments.
pub fn last_segment(ty: &Type) -> Option<&syn::PathSegment> {
    match ty {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last(),
        Type::Group(g) => last_segment(&g.elem),
        Type::Paren(p) => last_segment(&p.elem),
        _ => None,
    }
}

/// The generic type arguments of a path segment.
pub fn type_args(seg: &syn::PathSegment) -> Vec<&Type> {
    match &seg.arguments {
        syn::PathArguments::AngleBracketed(a) => a
            .args
            .iter()
            .filter_map(|g| match g {
                syn::GenericArgument::Type(t) => Some(t),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn lifetime_arg(seg: &syn::PathSegment) -> Option<&Lifetime> {
    match &seg.arguments {
        syn::PathArguments::AngleBracketed(a) => a.args.iter().find_map(|g| match g {
            syn::GenericArgument::Lifetime(l) if l.ident != "_" => Some(l),
            _ => None,
        }),
        _ => None,
    }
}

/// What the builder stores for a parameter taken as `&elem`: `String` for `str`,
/// `Vec<T>` for `[T]`, else `elem` itself (passed back as `&field`, which the
/// compiler derefs to `&str` / `&[T]`).
pub(crate) fn owned(elem: &Type) -> std::borrow::Cow<'_, Type> {
    match elem {
        Type::Path(p) if p.path.is_ident("str") => {
            std::borrow::Cow::Owned(syn::parse_quote!(::std::string::String))
        }
        Type::Slice(s) => {
            let t = &s.elem;
            std::borrow::Cow::Owned(syn::parse_quote!(::std::vec::Vec<#t>))
        }
        _ => std::borrow::Cow::Borrowed(elem),
    }
}

impl<'a> Builder<'a> {
    /// Reads the signature; signature errors go to `errors` and give `None`.
    pub fn from_fn(f: &'a ItemFn, kind: Kind, errors: &mut Errors) -> Option<Builder<'a>> {
        let sig = &f.sig;
        let before = errors.len();
        if let Some(a) = &sig.asyncness {
            errors.spanned(
                a,
                "a #[data_parallel] function cannot be async: it builds a graph, it does not run it",
            );
        }
        if let Some(c) = &sig.constness {
            errors.spanned(c, "a #[data_parallel] function cannot be const");
        }
        if let Some(p) = sig.generics.type_params().next() {
            errors.spanned(p, "a #[data_parallel] function cannot have type parameters");
        }
        if let Some(p) = sig.generics.const_params().next() {
            errors.spanned(
                p,
                "a #[data_parallel] function cannot have const parameters: pass the value as configuration",
            );
        }
        if let Some(u) = &sig.unsafety {
            errors.spanned(
                u,
                "a #[data_parallel] function cannot be unsafe: dpm calls it once per device",
            );
        }
        let expected = "expected the per-device model as the first parameter: `m: &mut DeviceModel<'_>`";
        let model_ty = match sig.inputs.first() {
            None => {
                errors.spanned(&sig.ident, format!("missing the model parameter; {expected}"));
                None
            }
            Some(FnArg::Receiver(r)) => {
                errors.spanned(r, expected);
                None
            }
            Some(FnArg::Typed(t)) => {
                let ok = matches!(&*t.ty, Type::Reference(r) if r.mutability.is_some()
                    && last_segment(&r.elem).is_some_and(|s| s.ident == "DeviceModel"));
                if !ok {
                    errors.spanned(&t.ty, expected);
                }
                ok.then_some(&*t.ty)
            }
        };
        let mut extra = Vec::new();
        for arg in sig.inputs.iter().skip(1) {
            let FnArg::Typed(t) = arg else { continue };
            let elem = match &*t.ty {
                Type::Reference(r) => &*r.elem,
                ty => ty,
            };
            match last_segment(elem).map(|s| s.ident.to_string()).as_deref() {
                Some("DeviceModel") => {
                    errors.spanned(
                        &t.ty,
                        "only the first parameter is the per-device model; a function builds one device at a time",
                    );
                    continue;
                }
                Some("Blob") => {
                    errors.spanned(
                        &t.ty,
                        "a Blob belongs to one device's build and cannot be configuration; \
                         create it inside the function (m.input(..)) or pass a name",
                    );
                    continue;
                }
                _ => {}
            }
            let syn::Pat::Ident(_) = &*t.pat else {
                errors.spanned(&t.pat, "a configuration parameter needs a plain name");
                continue;
            };
            match &*t.ty {
                Type::Reference(r) if r.mutability.is_some() => errors.spanned(
                    &t.ty,
                    "a configuration parameter is shared by every device's build: take it by `&T` or by value, not `&mut`",
                ),
                Type::Reference(r) => extra.push(Extra {
                    ty: owned(&r.elem),
                    by_ref: true,
                }),
                ty => extra.push(Extra {
                    ty: std::borrow::Cow::Borrowed(ty),
                    by_ref: false,
                }),
            }
        }
        if errors.len() > before {
            return None;
        }
        let model_ty = model_ty?;
        let model = match sig.inputs.first() {
            Some(FnArg::Typed(t)) => match &*t.pat {
                syn::Pat::Ident(p) => Some(&p.ident),
                _ => None,
            },
            _ => None,
        };
        let brand = match model_ty {
            Type::Reference(r) => last_segment(&r.elem).and_then(lifetime_arg),
            _ => None,
        };
        Some(Builder {
            original: f,
            kind,
            brand,
            output: &sig.output,
            extra,
            model,
        })
    }
}
