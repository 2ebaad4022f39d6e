//! Names in messages and files: the hex of a hash, a name that is not one
//! of a key's or flag's choices ([`UnknownName`], with a "did you mean"
//! [`Hint`]), and [`named_choices!`], which writes an enum whose values are
//! named by fixed strings once — its parser, its names and the list the
//! errors and help texts show — so that adding a value is one line.

use std::fmt;

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A name that is not one of a key's or flag's choices (a device, an
/// engine, a cooldown shape, a metric): what it names, what was given,
/// what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{got}`: {expected}")]
pub struct UnknownName {
    pub what: &'static str,
    pub got: String,
    pub expected: String,
}

impl UnknownName {
    pub fn new(what: &'static str, got: &str, expected: impl Into<String>) -> UnknownName {
        UnknownName {
            what,
            got: got.to_string(),
            expected: expected.into(),
        }
    }
}

/// An optional "did you mean" suffix for an error message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint(pub Option<String>);

impl fmt::Display for Hint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(s) => write!(f, " (did you mean `{s}`?)"),
            None => Ok(()),
        }
    }
}

/// `` `a`, `b` or `c` `` — with each value's note in parentheses where it
/// has one.
pub fn one_of(names: &[(&str, &str)]) -> String {
    let shown: Vec<String> = names
        .iter()
        .map(|(name, note)| {
            if note.is_empty() {
                format!("`{name}`")
            } else {
                format!("`{name}` ({note})")
            }
        })
        .collect();
    match shown.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    }
}

/// An enum whose values are named by fixed strings, written once:
///
/// ```text
/// named_choices! {
///     /// Doc of the enum.
///     pub enum Engine: "engine" {
///         /// Doc of the value.
///         Auto = "auto" ("fused on CPU, composed on CUDA"),
///         Fused = "fused",
///     }
/// }
/// ```
///
/// gives the enum, `NAMES` (each name and its note), `name()`, `FromStr`
/// and `TryFrom<String>` (an [`UnknownName`] listing the choices),
/// `From<Self> for String` and `Display` — so serde can read and write it
/// by name (`#[serde(try_from = "String", into = "String")]`).
#[macro_export]
macro_rules! named_choices {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident : $what:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $text:literal $(($note:literal))? ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $name {
            $( $(#[$vmeta])* $variant ),+
        }

        impl $name {
            /// Every value's name and note, in declaration order.
            pub const NAMES: &'static [(&'static str, &'static str)] =
                &[$( ($text, $crate::named_choices!(@note $($note)?)) ),+];

            /// This value's name.
            pub fn name(self) -> &'static str {
                match self {
                    $( $name::$variant => $text ),+
                }
            }

            /// `` `a`, `b` or `c` ``, for messages and help texts.
            pub fn choices() -> String {
                $crate::names::one_of(Self::NAMES)
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = $crate::names::UnknownName;
            fn from_str(s: &str) -> Result<$name, $crate::names::UnknownName> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    other => Err($crate::names::UnknownName::new(
                        $what,
                        other,
                        format!("expected {}", $name::choices()),
                    )),
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = $crate::names::UnknownName;
            fn try_from(s: String) -> Result<$name, $crate::names::UnknownName> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.name().to_string()
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
    (@note $note:literal) => { $note };
    (@note) => { "" };
}

#[cfg(test)]
mod tests {
    use super::*;

    named_choices! {
        /// A test enum.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Shape: "shape" {
            Round = "round" ("the default"),
            Square = "square",
            OneMinusSqrt = "1-sqrt",
        }
    }

    #[test]
    fn choices_parse_print_and_list_themselves() {
        for (v, text) in [
            (Shape::Round, "round"),
            (Shape::Square, "square"),
            (Shape::OneMinusSqrt, "1-sqrt"),
        ] {
            assert_eq!(v.name(), text);
            assert_eq!(v.to_string(), text);
            assert_eq!(String::from(v), text);
            assert_eq!(text.parse::<Shape>(), Ok(v));
            assert_eq!(Shape::try_from(text.to_string()), Ok(v));
        }
        assert_eq!(
            Shape::choices(),
            "`round` (the default), `square` or `1-sqrt`"
        );
        let e = "oval".parse::<Shape>().expect_err("not a shape");
        assert_eq!(
            e.to_string(),
            "unknown shape `oval`: expected `round` (the default), `square` or `1-sqrt`"
        );
    }

    #[test]
    fn lists_and_hex() {
        assert_eq!(one_of(&[("a", "")]), "`a`");
        assert_eq!(one_of(&[("a", ""), ("b", "x")]), "`a` or `b` (x)");
        assert_eq!(one_of(&[]), "");
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        assert_eq!(Hint(Some("x".into())).to_string(), " (did you mean `x`?)");
        assert_eq!(Hint(None).to_string(), "");
    }
}
