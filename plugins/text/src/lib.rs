//! `text`: one text column → a text sample (the loss covers all of it).

use ferrotune_plugin_sdk::{export_formatter, Formatter, JsonRow, Sample};
use serde::Deserialize;

/// `--formatter_config` of `text`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The column holding the training text.
    pub column: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            column: "text".into(),
        }
    }
}

pub struct Text {
    column: String,
}

impl Formatter for Text {
    const NAME: &'static str = "text";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str = "one text column, trained on in full";
    const CONFIG_SCHEMA: Option<&'static str> = Some(
        r#"{"type":"object","additionalProperties":false,"properties":{"column":{"type":"string","default":"text"}}}"#,
    );

    type Config = Config;
    type Row = JsonRow;

    fn new(config: Config) -> Result<Self, String> {
        if config.column.is_empty() {
            return Err("config \"column\" is empty; name the text column".into());
        }
        Ok(Text {
            column: config.column,
        })
    }

    fn format(&self, row: JsonRow) -> Result<Sample, String> {
        Ok(Sample::text(row.str(&self.column)?))
    }
}

export_formatter!(Text);

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune_plugin_sdk::serde_json::{json, Value};
    use ferrotune_plugin_sdk::testing::Harness;

    #[test]
    fn formats_the_text_column() {
        let h = Harness::<Text>::new(Value::Null).unwrap();
        assert_eq!(
            h.format(json!({"text": "hello\nworld", "id": 3})),
            Ok(Sample::text("hello\nworld"))
        );
        let h = Harness::<Text>::new(json!({"column": "body"})).unwrap();
        assert_eq!(h.format(json!({"body": "b"})), Ok(Sample::text("b")));
    }

    #[test]
    fn malformed_rows_and_config() {
        let h = Harness::<Text>::new(Value::Null).unwrap();
        assert_eq!(
            h.format(json!({"body": "b"})),
            Err("missing column \"text\"".into())
        );
        assert_eq!(
            h.format(json!({"text": null})),
            Err("column \"text\" is null, expected a string".into())
        );
        assert!(h
            .format_text("\"just a string\"")
            .unwrap_err()
            .starts_with("bad row:"));
        assert!(Harness::<Text>::new(json!({"column": ""})).is_err());
        assert!(Harness::<Text>::new(json!({"col": "x"}))
            .err()
            .unwrap()
            .contains("unknown field `col`"));
    }
}
