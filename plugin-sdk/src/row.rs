//! A dataset row with dynamic column names, and accessors whose errors name the column.

use serde::Deserialize;
use serde_json::{Map, Value};

/// One dataset row as a JSON object. Use it as [`crate::Formatter::Row`] when column names come
/// from the config; prefer a typed struct when they are fixed (it parses faster).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct JsonRow(pub Map<String, Value>);

impl JsonRow {
    /// The column's value, or "missing column" naming it.
    pub fn get(&self, column: &str) -> Result<&Value, String> {
        self.0
            .get(column)
            .ok_or_else(|| format!("missing column {column:?}"))
    }

    /// A string column; missing or non-string values are errors naming the column.
    pub fn str(&self, column: &str) -> Result<&str, String> {
        expect_str(self.get(column)?, &format!("column {column:?}"))
    }

    /// A string column that may be absent or null.
    pub fn opt_str(&self, column: &str) -> Result<Option<&str>, String> {
        match self.0.get(column) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => expect_str(value, &format!("column {column:?}")).map(Some),
        }
    }

    /// An array column.
    pub fn array(&self, column: &str) -> Result<&Vec<Value>, String> {
        match self.get(column)? {
            Value::Array(items) => Ok(items),
            other => Err(format!(
                "column {column:?} is {}, expected an array",
                kind_of(other)
            )),
        }
    }

    /// Whether the row has the column (even if null).
    pub fn has(&self, column: &str) -> bool {
        self.0.contains_key(column)
    }
}

/// `value` as a string, or an error saying what `what` is instead.
pub fn expect_str<'a>(value: &'a Value, what: &str) -> Result<&'a str, String> {
    value
        .as_str()
        .ok_or_else(|| format!("{what} is {}, expected a string", kind_of(value)))
}

/// "null", "a number", ... for error messages.
pub fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
