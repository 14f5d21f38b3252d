//! Typed operator arguments and their reading back from `Argument` messages.

use crate::error::{Error, Result};
use crate::proto::Argument;

/// A value of an operator argument.
#[derive(Clone, Debug, PartialEq)]
pub enum ArgValue {
    /// `f`
    Float(f32),
    /// `i`
    Int(i64),
    /// `s`
    Str(String),
    /// `floats`
    Floats(Vec<f32>),
    /// `ints`
    Ints(Vec<i64>),
}

impl ArgValue {
    /// The `Argument` message called `name` holding this value.
    pub fn to_proto(&self, name: &str) -> Argument {
        let mut a = Argument {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        match self {
            ArgValue::Float(f) => a.f = Some(*f),
            ArgValue::Int(i) => a.i = Some(*i),
            ArgValue::Str(s) => a.s = Some(s.as_bytes().to_vec()),
            ArgValue::Floats(v) => a.floats = v.clone(),
            ArgValue::Ints(v) => a.ints = v.clone(),
        }
        a
    }
}

macro_rules! from_value {
    ($($t:ty => |$v:ident| $e:expr),* $(,)?) => {
        $(impl From<$t> for ArgValue {
            fn from($v: $t) -> Self {
                $e
            }
        })*
    };
}
from_value! {
    f32 => |v| ArgValue::Float(v),
    i64 => |v| ArgValue::Int(v),
    i32 => |v| ArgValue::Int(v.into()),
    usize => |v| ArgValue::Int(v as i64),
    bool => |v| ArgValue::Int(v.into()),
    &str => |v| ArgValue::Str(v.to_owned()),
    String => |v| ArgValue::Str(v),
    Vec<f32> => |v| ArgValue::Floats(v),
    Vec<i64> => |v| ArgValue::Ints(v),
}

/// Read access to an op's arguments, with errors that name the argument.
#[derive(Clone, Copy)]
pub struct Args<'a>(pub &'a [Argument]);

impl<'a> Args<'a> {
    fn find(&self, name: &str) -> Option<&'a Argument> {
        self.0.iter().find(|a| a.name.as_deref() == Some(name))
    }

    /// An integer argument, or `default`.
    pub fn int(&self, name: &str, default: i64) -> Result<i64> {
        match self.find(name) {
            None => Ok(default),
            Some(a) => {
                a.i.ok_or_else(|| Error::arg(name, "expected an integer (field i)"))
            }
        }
    }

    /// A non-negative integer argument, or `default`.
    pub fn usize(&self, name: &str, default: usize) -> Result<usize> {
        let v = self.int(name, default as i64)?;
        usize::try_from(v).map_err(|_| Error::arg(name, format!("must be ≥ 0, got {v}")))
    }

    /// A float argument, or `default`. Integers are accepted.
    pub fn float(&self, name: &str, default: f32) -> Result<f32> {
        match self.find(name) {
            None => Ok(default),
            Some(a) => {
                a.f.or(a.i.map(|i| i as f32))
                    .ok_or_else(|| Error::arg(name, "expected a float (field f)"))
            }
        }
    }

    /// A string argument, or `default`.
    pub fn string(&self, name: &str, default: &str) -> Result<String> {
        match self.find(name) {
            None => Ok(default.to_owned()),
            Some(a) => {
                let s =
                    a.s.as_ref()
                        .ok_or_else(|| Error::arg(name, "expected a string (field s)"))?;
                String::from_utf8(s.clone()).map_err(|_| Error::arg(name, "not valid UTF-8"))
            }
        }
    }

    /// A list of integers, or `None` if absent.
    pub fn ints(&self, name: &str) -> Option<&'a [i64]> {
        self.find(name).map(|a| a.ints.as_slice())
    }

    /// Whether the argument is present.
    pub fn has(&self, name: &str) -> bool {
        self.find(name).is_some()
    }
}
