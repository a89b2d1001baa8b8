//! `prompt-completion`: a prompt column and a completion column → a completion sample (with
//! `--train_on_completions` only the completion is learned; otherwise prompt + completion).

use ferrotune_plugin_sdk::{export_formatter, Formatter, JsonRow, Sample};
use serde::Deserialize;

/// `--formatter_config` of `prompt-completion`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub prompt: String,
    pub completion: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            prompt: "prompt".into(),
            completion: "completion".into(),
        }
    }
}

pub struct PromptCompletion {
    config: Config,
}

impl Formatter for PromptCompletion {
    const NAME: &'static str = "prompt-completion";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "prompt and completion columns; the completion is what is learned";
    const CONFIG_SCHEMA: Option<&'static str> = Some(
        r#"{"type":"object","additionalProperties":false,"properties":{"prompt":{"type":"string","default":"prompt"},"completion":{"type":"string","default":"completion"}}}"#,
    );

    type Config = Config;
    type Row = JsonRow;

    fn new(config: Config) -> Result<Self, String> {
        if config.prompt == config.completion {
            return Err(format!(
                "config \"prompt\" and \"completion\" both name column {:?}; name two columns",
                config.prompt
            ));
        }
        Ok(PromptCompletion { config })
    }

    fn format(&self, row: JsonRow) -> Result<Sample, String> {
        Ok(Sample::completion(
            row.str(&self.config.prompt)?,
            row.str(&self.config.completion)?,
        ))
    }
}

export_formatter!(PromptCompletion);

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune_plugin_sdk::serde_json::{json, Value};
    use ferrotune_plugin_sdk::testing::Harness;

    #[test]
    fn formats_prompt_and_completion() {
        let h = Harness::<PromptCompletion>::new(Value::Null).unwrap();
        assert_eq!(
            h.format(json!({"prompt": "2+2=", "completion": " 4"})),
            Ok(Sample::completion("2+2=", " 4"))
        );
        let h =
            Harness::<PromptCompletion>::new(json!({"prompt": "q", "completion": "a"})).unwrap();
        assert_eq!(
            h.format(json!({"q": "Q", "a": "A"})),
            Ok(Sample::completion("Q", "A"))
        );
    }

    #[test]
    fn malformed_rows_and_config() {
        let h = Harness::<PromptCompletion>::new(Value::Null).unwrap();
        assert_eq!(
            h.format(json!({"prompt": "x"})),
            Err("missing column \"completion\"".into())
        );
        assert_eq!(
            h.format(json!({"prompt": ["x"], "completion": "y"})),
            Err("column \"prompt\" is an array, expected a string".into())
        );
        let err = Harness::<PromptCompletion>::new(json!({"prompt": "x", "completion": "x"}))
            .err()
            .unwrap();
        assert!(err.contains("both name column"), "{err}");
    }
}
