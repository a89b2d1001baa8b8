//! Reading the three columns a row needs straight from its JSON text. Strings without escapes
//! are borrowed from the text; every other column is skipped without being built. Errors match
//! the SDK's `JsonRow` accessors word for word, so both paths report a bad row the same way.

use std::borrow::Cow;
use std::fmt;

use ferrotune_plugin_sdk::row::{expect_str, kind_of};
use ferrotune_plugin_sdk::serde_json::{self, Value};
use ferrotune_plugin_sdk::JsonRow;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserializer;

/// One column of a row, as found.
#[derive(Debug, Clone, PartialEq)]
pub enum Column<'a> {
    Missing,
    Null,
    Str(Cow<'a, str>),
    /// Present but not a string: what it is instead ("a number", …).
    Other(&'static str),
}

impl<'a> Column<'a> {
    /// The column of a parsed row (the SDK's generic path).
    pub fn of_json(row: &'a JsonRow, name: &str) -> Self {
        match row.0.get(name) {
            None => Column::Missing,
            Some(Value::Null) => Column::Null,
            Some(Value::String(s)) => Column::Str(Cow::Borrowed(s)),
            Some(other) => Column::Other(kind_of(other)),
        }
    }

    /// A string column: missing or non-string values are errors naming the column.
    pub fn required(&self, name: &str) -> Result<&str, String> {
        match self {
            Column::Missing => Err(format!("missing column {name:?}")),
            Column::Null => expect_str(&Value::Null, &format!("column {name:?}")),
            Column::Str(s) => Ok(s),
            Column::Other(kind) => Err(format!("column {name:?} is {kind}, expected a string")),
        }
    }

    /// A string column that may be absent or null.
    pub fn optional(&self, name: &str) -> Result<Option<&str>, String> {
        match self {
            Column::Missing | Column::Null => Ok(None),
            other => other.required(name).map(Some),
        }
    }
}

/// The columns `names` of one JSON object row, in the order of `names` (a name given twice gets
/// the same value twice). Invalid JSON or a row that is not an object: "bad row: …".
pub fn parse<'a, const N: usize>(
    row: &'a str,
    names: [&str; N],
) -> Result<[Column<'a>; N], String> {
    let mut de = serde_json::Deserializer::from_str(row);
    let columns = Columns { names }
        .deserialize(&mut de)
        .and_then(|columns| de.end().map(|()| columns))
        .map_err(|e| format!("bad row: {e}"))?;
    Ok(columns)
}

struct Columns<'n, const N: usize> {
    names: [&'n str; N],
}

impl<'de, const N: usize> DeserializeSeed<'de> for Columns<'_, N> {
    type Value = [Column<'de>; N];

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, const N: usize> Visitor<'de> for Columns<'_, N> {
    type Value = [Column<'de>; N];

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object (one dataset row)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found: [Column<'de>; N] = std::array::from_fn(|_| Column::Missing);
        while let Some(Text(key)) = map.next_key()? {
            let mut wanted = self.names.iter().enumerate().filter(|(_, n)| **n == key);
            match wanted.next() {
                // A later duplicate key wins, as in serde_json's maps.
                Some((i, _)) => {
                    let ColumnValue(value) = map.next_value()?;
                    for (j, _) in wanted {
                        found[j] = value.clone();
                    }
                    found[i] = value;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(found)
    }
}

/// A string borrowed from the input where it has no escapes.
struct Text<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// Any JSON value, kept only when it is a string.
struct ColumnValue<'de>(Column<'de>);

impl<'de> de::Deserialize<'de> for ColumnValue<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ColumnValue<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(ColumnValue(Column::Str(Cow::Borrowed(v))))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(ColumnValue(Column::Str(Cow::Owned(v.to_string()))))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(ColumnValue(Column::Str(Cow::Owned(v))))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(ColumnValue(Column::Null))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(ColumnValue(Column::Other("a boolean")))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(ColumnValue(Column::Other("a number")))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(ColumnValue(Column::Other("a number")))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(ColumnValue(Column::Other("a number")))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(ColumnValue(Column::Other("an array")))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(ColumnValue(Column::Other("an object")))
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrows_plain_strings_and_agrees_with_the_generic_row() {
        let text = r#"{"a": "plain", "skip": {"deep": [1, {"x": null}]}, "b": "esc\"aped",
                       "c": 3, "d": null, "e": [1], "f": true, "g": {}}"#;
        let names = ["a", "b", "c", "d", "e", "f", "g", "missing"];
        let fast = parse(text, names).unwrap();
        assert!(matches!(fast[0], Column::Str(Cow::Borrowed("plain"))));
        let row: JsonRow = serde_json::from_str(text).unwrap();
        for (name, got) in names.iter().zip(&fast) {
            assert_eq!(*got, Column::of_json(&row, name), "{name}");
            assert_eq!(
                got.required(name),
                Column::of_json(&row, name).required(name)
            );
            assert_eq!(
                got.required(name).map_err(|e| e.clone()),
                row.str(name).map_err(|e| e.clone())
            );
        }
    }

    #[test]
    fn same_name_twice_and_duplicate_keys() {
        let [x, y] = parse(r#"{"k": "1", "k": "2"}"#, ["k", "k"]).unwrap();
        assert_eq!((x.required("k"), y.required("k")), (Ok("2"), Ok("2")));
    }

    #[test]
    fn non_objects_and_trailing_text_are_bad_rows() {
        for bad in ["[1, 2]", "{not json", r#"{"a": "x"} trailing"#, "\"s\""] {
            let err = parse(bad, ["a"]).unwrap_err();
            assert!(err.starts_with("bad row:"), "{bad}: {err}");
        }
    }
}
