//! The per-row formatter trait and the batched glue behind `export_formatter!`.

use serde::de::DeserializeOwned;

use crate::bindings::exports::ferrotune::plugin::format as wit;
use crate::bindings::ferrotune::plugin::types as wit_types;
use crate::Sample;

/// A dataset formatter: one JSON row in, one [`Sample`] (or a row error) out.
///
/// Errors are values: return `Err("column \"x\" is missing")` for a bad row and the host
/// fails the job or skips the row (`--on_bad_row`). Never panic on bad data — a panic is a
/// trap, which costs the host a fresh instance and a bisection of the batch.
pub trait Formatter: Sized + 'static {
    /// Short name shown by `ferrotune plugin inspect` and in the host's log.
    const NAME: &'static str;
    /// The plugin's own version.
    const VERSION: &'static str = "0.1.0";
    /// One line for humans.
    const DESCRIPTION: &'static str = "";
    /// JSON Schema of [`Formatter::Config`], if you want `plugin inspect` to show one.
    const CONFIG_SCHEMA: Option<&'static str> = None;

    /// The `--formatter_config` JSON. An absent config arrives as `{}`, so
    /// `#[serde(default)]` structs work; add `#[serde(deny_unknown_fields)]` to catch typos.
    type Config: DeserializeOwned;
    /// One dataset row: a `#[derive(Deserialize)]` struct of the columns you need (other
    /// columns are ignored) or [`crate::JsonRow`] for dynamic column names.
    type Row: DeserializeOwned;

    /// Builds the formatter from its config, once per plugin instance.
    fn new(config: Self::Config) -> Result<Self, String>;

    /// Formats one row.
    fn format(&self, row: Self::Row) -> Result<Sample, String>;

    /// Formats one row from its JSON text: parses [`Formatter::Row`], then calls
    /// [`Formatter::format`]. Override it when speed matters and the row type cannot borrow
    /// (column names from the config): deserialize straight into `&str` slices of `row` (see
    /// the built-in `alpaca` plugin), so no column is copied before it is used. Errors for a
    /// row that is not valid JSON should start with "bad row:".
    fn format_json(&self, row: &str) -> Result<Sample, String> {
        let row: Self::Row = serde_json::from_str(row).map_err(|e| format!("bad row: {e}"))?;
        self.format(row)
    }
}

/// `describe` of the WIT interface.
pub fn describe<F: Formatter>() -> wit::PluginInfo {
    wit::PluginInfo {
        name: F::NAME.to_string(),
        version: F::VERSION.to_string(),
        description: F::DESCRIPTION.to_string(),
        config_schema: F::CONFIG_SCHEMA.map(str::to_string),
    }
}

/// `configure`: parses the JSON config (`null` → `{}`) and builds the formatter.
pub fn configure<F: Formatter>(config: &str) -> Result<F, String> {
    let mut value: serde_json::Value = serde_json::from_str(config)
        .map_err(|e| format!("formatter config is not valid JSON: {e}"))?;
    if value.is_null() {
        value = serde_json::Value::Object(Default::default());
    }
    let config = F::Config::deserialize(value)
        .map_err(|e| format!("invalid formatter config for {}: {e}", F::NAME))?;
    F::new(config)
}

/// Formats one row from its JSON text.
pub fn format_row<F: Formatter>(formatter: &F, row: &str) -> Result<Sample, String> {
    formatter.format_json(row)
}

/// `format-batch`: one result per row, same order.
pub fn format_batch<F: Formatter>(
    formatter: Option<&F>,
    rows: &[String],
) -> Vec<Result<wit::Sample, String>> {
    let Some(formatter) = formatter else {
        let error = format!("{}: format-batch called before configure", F::NAME);
        return rows.iter().map(|_| Err(error.clone())).collect();
    };
    rows.iter()
        .map(|row| format_row(formatter, row).map(to_wit))
        .collect()
}

use serde::Deserialize as _;

fn to_wit(sample: Sample) -> wit::Sample {
    match sample {
        Sample::Text { text } => wit_types::Sample::Text(text),
        Sample::Completion { prompt, completion } => {
            wit_types::Sample::Completion(wit_types::PromptCompletion { prompt, completion })
        }
        Sample::Chat { messages } => wit_types::Sample::Chat(
            messages
                .into_iter()
                .map(|m| wit_types::Message {
                    role: m.role,
                    content: m.content,
                })
                .collect(),
        ),
    }
}
