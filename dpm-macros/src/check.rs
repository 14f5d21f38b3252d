//! The rules a `#[data_parallel]` function must follow, one `check_*` each.
//! Every error is collected, so one compile shows all of them.

use quote::ToTokens;
use syn::visit::Visit;
use syn::{ReturnType, Type};

use crate::parse::{last_segment, type_args, Builder, Kind};

/// Collects errors; [`Errors::finish`] combines them.
#[derive(Default)]
pub struct Errors(Vec<syn::Error>);

impl Errors {
    /// Adds an error.
    pub fn push(&mut self, e: syn::Error) {
        self.0.push(e);
    }

    /// Adds an error spanning `tokens`.
    pub fn spanned(&mut self, tokens: impl ToTokens, msg: impl std::fmt::Display) {
        self.0.push(syn::Error::new_spanned(tokens, msg));
    }

    /// How many errors so far.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// `Ok` if no error was added, else all of them as one.
    pub fn finish(self) -> Result<(), syn::Error> {
        let mut it = self.0.into_iter();
        match it.next() {
            None => Ok(()),
            Some(mut first) => {
                first.extend(it);
                Err(first)
            }
        }
    }
}

/// Runs every rule.
pub fn check(b: &Builder<'_>, errors: &mut Errors) {
    check_return_type(b, errors);
    check_literals(b, errors);
}

const LOSS_TYPES: &str = "Result<Losses<'_>>, Losses<'_>, Blob<'_>, Vec<Blob<'_>> or a Result of one";

fn is_losses(ty: &Type) -> bool {
    let Some(seg) = last_segment(ty) else { return false };
    match seg.ident.to_string().as_str() {
        "Losses" | "Blob" => true,
        "Vec" => type_args(seg)
            .first()
            .is_some_and(|t| last_segment(t).is_some_and(|s| s.ident == "Blob")),
        _ => false,
    }
}

fn is_unit(ty: &Type) -> bool {
    matches!(ty, Type::Tuple(t) if t.elems.is_empty())
}

/// `Result<T, ..>` → `T`.
fn result_ok(ty: &Type) -> Option<&Type> {
    let seg = last_segment(ty)?;
    (seg.ident == "Result")
        .then(|| type_args(seg).into_iter().next())
        .flatten()
}

/// Whether `ty` is a type that is certainly not what a builder may return: a
/// primitive, `String`, a tuple other than `()`, a reference, an array. Any other
/// path (a type alias, say) is left to the `IntoLosses` / `IntoUnit` bounds of
/// the generated code, whose `on_unimplemented` messages say the same.
fn certainly_not(ty: &Type, allowed: fn(&Type) -> bool) -> bool {
    if allowed(ty) {
        return false;
    }
    match ty {
        Type::Path(_) => {
            let Some(seg) = last_segment(ty) else { return false };
            let name = seg.ident.to_string();
            const PRIMITIVES: [&str; 18] = [
                "bool", "char", "str", "String", "i8", "i16", "i32", "i64", "i128", "isize", "u8", "u16",
                "u32", "u64", "u128", "usize", "f32", "f64",
            ];
            PRIMITIVES.contains(&name.as_str())
                || ((name == "Losses" || name == "Blob" || name == "Vec") && !allowed(ty))
                || (name == "Option")
        }
        Type::Paren(p) => certainly_not(&p.elem, allowed),
        Type::Group(g) => certainly_not(&g.elem, allowed),
        _ => true,
    }
}

/// A forward function returns its losses; input and update functions return
/// `()` or `Result<()>`. Aliases are checked by the trait bounds instead.
fn check_return_type(b: &Builder<'_>, errors: &mut Errors) {
    let sig = &b.original.sig;
    match (b.kind, b.output) {
        (Kind::Forward, ReturnType::Default) => errors.spanned(
            &sig.ident,
            format!("a forward function returns its losses; add a return type: {LOSS_TYPES}"),
        ),
        (Kind::Forward, ReturnType::Type(_, ty)) => {
            let inner = result_ok(ty).unwrap_or(ty);
            if certainly_not(inner, is_losses) {
                errors.spanned(
                    ty,
                    format!("a forward function returns its losses: expected {LOSS_TYPES}"),
                );
            }
        }
        (_, ReturnType::Default) => {}
        (_, ReturnType::Type(_, ty)) => {
            let inner = result_ok(ty).unwrap_or(ty);
            if certainly_not(inner, is_unit) {
                errors.spanned(ty, "an input or update function returns `()` or `Result<()>`");
            }
        }
    }
}

/// Whether `s` names a device scope: `cpu_N` or `gpu_N` at a word start.
fn device_prefix(s: &str) -> Option<&str> {
    let bytes = s.as_bytes();
    for start in 0..s.len() {
        let at_word_start =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let rest = &s[start..];
        if at_word_start && (rest.starts_with("cpu_") || rest.starts_with("gpu_")) {
            let digits = rest[4..].bytes().take_while(u8::is_ascii_digit).count();
            let end = 4 + digits;
            let after_ok = rest
                .as_bytes()
                .get(end)
                .is_none_or(|c| !c.is_ascii_alphanumeric());
            if digits > 0 && after_ok {
                return Some(&rest[..end]);
            }
        }
    }
    None
}

/// Checks the string literals that are blob names: arguments of calls on the
/// model parameter, of helpers that take it, and of `BlobRef::new`, including
/// literals bound with `let` and `concat!`. Other strings (a file path) are not
/// names. Names built at run time are checked when the replicas are built.
struct Literals<'e, 'a> {
    errors: &'e mut Errors,
    model: Option<&'a syn::Ident>,
    /// `let name = "…";` (or `concat!` of literals) bindings seen so far: the
    /// value and the tokens to point at.
    lets: std::collections::HashMap<String, (String, proc_macro2::TokenStream)>,
}

impl Literals<'_, '_> {
    fn check_value(&mut self, v: &str, span: impl ToTokens) {
        if v.contains('/') {
            self.errors.spanned(
                span,
                "blob names are relative to the device scope and cannot contain the namescope separator `/`; \
                 dpm adds `cpu_N/` or `gpu_N/` for each device",
            );
        } else if let Some(p) = device_prefix(v) {
            self.errors.spanned(
                span,
                format!(
                    "`{p}` names one device, but blob names are relative to the device scope: \
                     this function is built once per device"
                ),
            );
        }
    }

    /// The value of a literal or of `concat!` of literals, with its tokens.
    fn constant(e: &syn::Expr) -> Option<(String, proc_macro2::TokenStream)> {
        match e {
            syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) => Some((s.value(), s.to_token_stream())),
            syn::Expr::Macro(m) if m.mac.path.is_ident("concat") => {
                let parts = m
                    .mac
                    .parse_body_with(
                        syn::punctuated::Punctuated::<syn::Expr, syn::Token![,]>::parse_terminated,
                    )
                    .ok()?;
                let mut joined = String::new();
                for part in &parts {
                    match part {
                        syn::Expr::Lit(syn::ExprLit {
                            lit: syn::Lit::Str(s),
                            ..
                        }) => joined.push_str(&s.value()),
                        syn::Expr::Lit(syn::ExprLit {
                            lit: syn::Lit::Int(i),
                            ..
                        }) => joined.push_str(i.base10_digits()),
                        _ => return None,
                    }
                }
                Some((joined, m.to_token_stream()))
            }
            _ => None,
        }
    }

    /// A blob-name argument: a literal, `concat!` of literals, a `let`-bound
    /// one of these, or a reference to one.
    fn check(&mut self, e: &syn::Expr) {
        match e {
            syn::Expr::Reference(r) => self.check(&r.expr),
            syn::Expr::Paren(p) => self.check(&p.expr),
            syn::Expr::Path(p) => {
                if let Some((v, span)) = p
                    .path
                    .get_ident()
                    .and_then(|i| self.lets.get(&i.to_string()))
                    .cloned()
                {
                    self.check_value(&v, span);
                }
            }
            e => {
                if let Some((v, span)) = Self::constant(e) {
                    self.check_value(&v, span);
                }
            }
        }
    }

    fn is_model(&self, e: &syn::Expr) -> bool {
        match e {
            syn::Expr::Path(p) => self.model.is_some_and(|m| p.path.is_ident(m)),
            syn::Expr::Reference(r) => self.is_model(&r.expr),
            syn::Expr::Unary(u) => self.is_model(&u.expr),
            syn::Expr::Paren(p) => self.is_model(&p.expr),
            _ => false,
        }
    }
}

impl<'ast> Visit<'ast> for Literals<'_, '_> {
    fn visit_local(&mut self, l: &'ast syn::Local) {
        if let (syn::Pat::Ident(p), Some(init)) = (&l.pat, &l.init) {
            match Self::constant(&init.expr) {
                Some(c) => self.lets.insert(p.ident.to_string(), c),
                // A later binding of the name shadows the constant.
                None => self.lets.remove(&p.ident.to_string()),
            };
        }
        syn::visit::visit_local(self, l);
    }

    fn visit_expr_method_call(&mut self, c: &'ast syn::ExprMethodCall) {
        if self.is_model(&c.receiver) || c.args.iter().any(|a| self.is_model(a)) {
            c.args.iter().for_each(|a| self.check(a));
        }
        syn::visit::visit_expr_method_call(self, c);
    }

    fn visit_expr_call(&mut self, c: &'ast syn::ExprCall) {
        let blob_ref_new = matches!(&*c.func, syn::Expr::Path(p)
            if p.path.segments.len() >= 2
                && p.path.segments.iter().rev().take(2).map(|s| s.ident.to_string()).eq(["new", "BlobRef"]));
        if blob_ref_new || c.args.iter().any(|a| self.is_model(a)) {
            c.args.iter().for_each(|a| self.check(a));
        }
        syn::visit::visit_expr_call(self, c);
    }
}

/// String literals that are blob names are relative: no `/`, no `cpu_N` / `gpu_N`.
fn check_literals(b: &Builder<'_>, errors: &mut Errors) {
    Literals {
        errors,
        model: b.model,
        lets: Default::default(),
    }
    .visit_block(&b.original.block);
}
