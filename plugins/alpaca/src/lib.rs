//! `alpaca`: instruction/input/output rows → prompt + completion.
//!
//! Style `unsloth-cli` (default) reproduces, byte for byte, the text the recipe's Python worker
//! (`unsloth-cli.py`) trains on: its `alpaca_prompt.format(instruction, input, output)` — a
//! triple-quoted string indented inside a function, hence the four spaces after each newline —
//! followed by the tokenizer's EOS token. The sample is `Completion { prompt, completion }`
//! with `prompt` = the template up to and including "### Response:\n    " and `completion` =
//! the output, so `prompt + completion` is exactly the formatted string; the host appends EOS
//! when it tokenizes. The worker always uses the with-input form, even for an empty input.
//!
//! Style `standard` is the original Stanford Alpaca prompt (no indentation; the no-input form
//! when `input` is empty or absent).
//!
//! Rows are read by [`columns`]: straight from the JSON text into borrowed slices of the three
//! configured columns (the batched ABI exists for throughput, and a generic JSON map per row
//! cost more than the formatting itself).

mod columns;

use ferrotune_plugin_sdk::{export_formatter, Formatter, Sample};
use serde::Deserialize;

use columns::Column;

const UNSLOTH_CLI_PROMPT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n    ### Instruction:\n    {instruction}\n\n    ### Input:\n    {input}\n\n    ### Response:\n    ";

const STANDARD_WITH_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n";

const STANDARD_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
pub enum Style {
    #[default]
    #[serde(rename = "unsloth-cli")]
    UnslothCli,
    #[serde(rename = "standard")]
    Standard,
}

/// `--formatter_config` of `alpaca`.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub style: Style,
    /// Column names (for datasets that spell them differently).
    pub instruction: String,
    pub input: String,
    pub output: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            style: Style::UnslothCli,
            instruction: "instruction".into(),
            input: "input".into(),
            output: "output".into(),
        }
    }
}

pub struct Alpaca {
    config: Config,
}

impl Formatter for Alpaca {
    const NAME: &'static str = "alpaca";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "instruction/input/output rows as Alpaca prompts (unsloth-cli.py's template by default)";
    const CONFIG_SCHEMA: Option<&'static str> = Some(
        r#"{"type":"object","additionalProperties":false,"properties":{"style":{"enum":["unsloth-cli","standard"],"default":"unsloth-cli"},"instruction":{"type":"string","default":"instruction"},"input":{"type":"string","default":"input"},"output":{"type":"string","default":"output"}}}"#,
    );

    type Config = Config;
    type Row = ferrotune_plugin_sdk::JsonRow;

    fn new(config: Config) -> Result<Self, String> {
        Ok(Alpaca { config })
    }

    fn format(&self, row: Self::Row) -> Result<Sample, String> {
        let [instruction, input, output] = self.names().map(|name| Column::of_json(&row, name));
        self.format_columns(instruction, input, output)
    }

    fn format_json(&self, row: &str) -> Result<Sample, String> {
        let [instruction, input, output] = columns::parse(row, self.names())?;
        self.format_columns(instruction, input, output)
    }
}

impl Alpaca {
    /// The configured names of the instruction, input and output columns.
    fn names(&self) -> [&str; 3] {
        let c = &self.config;
        [&c.instruction, &c.input, &c.output]
    }

    fn format_columns(
        &self,
        instruction: Column<'_>,
        input: Column<'_>,
        output: Column<'_>,
    ) -> Result<Sample, String> {
        let c = &self.config;
        let instruction = instruction.required(&c.instruction)?;
        let output = output.required(&c.output)?;
        let prompt = match c.style {
            // unsloth-cli.py indexes examples["input"]: the column must exist.
            Style::UnslothCli => fill(UNSLOTH_CLI_PROMPT, instruction, input.required(&c.input)?),
            Style::Standard => match input.optional(&c.input)? {
                Some(input) if !input.is_empty() => fill(STANDARD_WITH_INPUT, instruction, input),
                _ => fill(STANDARD_NO_INPUT, instruction, ""),
            },
        };
        Ok(Sample::completion(prompt, output))
    }
}

/// Substitutes once, left to right, like Python's `str.format` (values are not re-scanned).
fn fill(template: &str, instruction: &str, input: &str) -> String {
    let mut out = String::with_capacity(template.len() + instruction.len() + input.len());
    let (head, rest) = template
        .split_once("{instruction}")
        .expect("template has {instruction}");
    out.push_str(head);
    out.push_str(instruction);
    match rest.split_once("{input}") {
        Some((middle, tail)) => {
            out.push_str(middle);
            out.push_str(input);
            out.push_str(tail);
        }
        None => out.push_str(rest),
    }
    out
}

export_formatter!(Alpaca);

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune_plugin_sdk::serde_json::{self, json};
    use ferrotune_plugin_sdk::testing::Harness;

    /// What `unsloth-cli.py` builds: `alpaca_prompt.format(instruction, input, output)`,
    /// the Python literal transcribed verbatim (EOS is appended by the host, not here).
    fn python_worker_text(instruction: &str, input: &str, output: &str) -> String {
        let python = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n    ### Instruction:\n    {}\n\n    ### Input:\n    {}\n\n    ### Response:\n    {}";
        let mut parts = python.split("{}");
        let mut text = String::new();
        for value in [instruction, input, output] {
            text.push_str(parts.next().unwrap());
            text.push_str(value);
        }
        text.push_str(parts.next().unwrap());
        assert!(parts.next().is_none());
        text
    }

    fn joined(sample: Sample) -> (String, String) {
        match sample {
            Sample::Completion { prompt, completion } => (prompt, completion),
            other => panic!("expected a completion sample, got {other:?}"),
        }
    }

    #[test]
    fn unsloth_cli_style_is_byte_identical_to_the_python_worker() {
        let h = Harness::<Alpaca>::new(serde_json::Value::Null).unwrap();
        let row =
            json!({"instruction": "Add {} numbers.", "input": "2 and 3\nplease", "output": "5"});
        let (prompt, completion) = joined(h.format(row).unwrap());
        assert_eq!(completion, "5");
        assert_eq!(
            prompt + &completion,
            python_worker_text("Add {} numbers.", "2 and 3\nplease", "5")
        );
    }

    #[test]
    fn unsloth_cli_style_keeps_the_input_section_for_empty_input() {
        let h = Harness::<Alpaca>::new(json!({"style": "unsloth-cli"})).unwrap();
        let row = json!({"instruction": "Say hi.", "input": "", "output": "Hi!"});
        let (prompt, completion) = joined(h.format(row).unwrap());
        let expected = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n    ### Instruction:\n    Say hi.\n\n    ### Input:\n    \n\n    ### Response:\n    Hi!";
        assert_eq!(prompt + &completion, expected);
        assert_eq!(expected, python_worker_text("Say hi.", "", "Hi!"));
    }

    #[test]
    fn standard_style_with_and_without_input() {
        let h = Harness::<Alpaca>::new(json!({"style": "standard"})).unwrap();
        let (p, c) = joined(
            h.format(json!({"instruction": "Add.", "input": "2, 3", "output": "5"}))
                .unwrap(),
        );
        assert_eq!(p + &c, "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2, 3\n\n### Response:\n5");
        for row in [
            json!({"instruction": "Say hi.", "input": "", "output": "Hi!"}),
            json!({"instruction": "Say hi.", "output": "Hi!"}),
        ] {
            let (p, c) = joined(h.format(row).unwrap());
            assert_eq!(p, "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n");
            assert_eq!(c, "Hi!");
        }
    }

    #[test]
    fn malformed_rows_are_errors_naming_the_column() {
        let h = Harness::<Alpaca>::new(serde_json::Value::Null).unwrap();
        let missing = h
            .format(json!({"instruction": "x", "output": "y"}))
            .unwrap_err();
        assert_eq!(missing, "missing column \"input\"");
        let wrong = h
            .format(json!({"instruction": 3, "input": "", "output": "y"}))
            .unwrap_err();
        assert_eq!(
            wrong,
            "column \"instruction\" is a number, expected a string"
        );
        assert!(h.format_text("[1, 2]").unwrap_err().starts_with("bad row:"));
        assert!(h
            .format_text("{not json")
            .unwrap_err()
            .starts_with("bad row:"));
    }

    #[test]
    fn column_names_and_bad_config() {
        let h = Harness::<Alpaca>::new(json!({"instruction": "q", "input": "ctx", "output": "a"}))
            .unwrap();
        let (p, c) = joined(h.format(json!({"q": "Q", "ctx": "C", "a": "A"})).unwrap());
        assert_eq!(p + &c, python_worker_text("Q", "C", "A"));
        let err = Harness::<Alpaca>::new(json!({"stlye": "standard"}))
            .err()
            .unwrap();
        assert!(err.contains("unknown field `stlye`"), "{err}");
        let err = Harness::<Alpaca>::new(json!({"style": "fancy"}))
            .err()
            .unwrap();
        assert!(err.contains("unknown variant `fancy`"), "{err}");
    }
}
