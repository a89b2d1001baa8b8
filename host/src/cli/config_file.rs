//! `--config FILE`: a YAML or JSON map whose keys are flag names. The file's values become
//! command-line tokens placed before the real ones, so clap validates them like typed flags. A key
//! whose flag is also on the command line is left out, so the command line overrides the file
//! whole (a list flag such as --quantization replaces the file's list, it does not extend it).

use std::path::Path;

use clap::{ArgAction, Command};
use serde_json::Value;

use super::UsageError;

/// Returns `argv` with the tokens of any `--config FILE` inserted right after the program name.
pub fn expand(command: &Command, argv: Vec<String>) -> Result<Vec<String>, UsageError> {
    let Some(path) = config_path(&argv) else {
        return Ok(argv);
    };
    let map = read_map(Path::new(&path))?;
    let given = flags_given(&argv);
    let mut tokens = Vec::new();
    for (key, value) in map {
        let these = tokens_for(command, &path, &key, value)?;
        if !given.contains(key.as_str()) {
            tokens.extend(these);
        }
    }
    let mut expanded = Vec::with_capacity(argv.len() + tokens.len());
    expanded.push(argv[0].clone());
    expanded.extend(tokens);
    expanded.extend(argv.into_iter().skip(1));
    Ok(expanded)
}

/// Long flag names present on the command line (`--name` or `--name=value`).
fn flags_given(argv: &[String]) -> std::collections::HashSet<&str> {
    argv.iter()
        .skip(1)
        .take_while(|arg| *arg != "--")
        .filter_map(|arg| arg.strip_prefix("--"))
        .map(|flag| flag.split_once('=').map_or(flag, |(name, _)| name))
        .collect()
}

/// The value of the last `--config` on the command line (`--config F` or `--config=F`).
fn config_path(argv: &[String]) -> Option<String> {
    let mut found = None;
    let mut args = argv.iter().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--" {
            break;
        } else if arg == "--config" {
            found = args.next().cloned();
        } else if let Some(path) = arg.strip_prefix("--config=") {
            found = Some(path.to_string());
        }
    }
    found
}

fn read_map(path: &Path) -> Result<serde_json::Map<String, Value>, UsageError> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| {
        UsageError::new(format!(
            "--config {shown}: cannot read it ({e}); pass an existing YAML or JSON file"
        ))
    })?;
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let value: Value = if is_json {
        serde_json::from_str(&text).map_err(|e| {
            UsageError::new(format!(
                "--config {shown}: invalid JSON ({e}); fix the file"
            ))
        })?
    } else {
        serde_yaml_ng::from_str(&text).map_err(|e| {
            UsageError::new(format!(
                "--config {shown}: invalid YAML ({e}); fix the file"
            ))
        })?
    };
    match value {
        Value::Object(map) => Ok(map),
        Value::Null => Ok(Default::default()),
        _ => Err(UsageError::new(format!(
            "--config {shown}: the top level must be a map of flag names to values"
        ))),
    }
}

fn tokens_for(
    command: &Command,
    path: &str,
    key: &str,
    value: Value,
) -> Result<Vec<String>, UsageError> {
    let arg = command
        .get_arguments()
        .find(|a| a.get_long() == Some(key))
        .filter(|_| key != "config")
        .ok_or_else(|| {
            UsageError::new(format!(
                "--config {path}: unknown key {key:?}; keys are flag names such as max_steps \
                 (see ferrotune --help)"
            ))
        })?;
    let flag = format!("--{key}");
    let is_switch = matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse);
    let tokens = match value {
        Value::Null => vec![],
        Value::Bool(on) if is_switch => {
            if on {
                vec![flag]
            } else {
                vec![]
            }
        }
        _ if is_switch => {
            return Err(UsageError::new(format!(
                "--config {path}: key {key:?} is a switch; give it true or false"
            )))
        }
        Value::Array(items) => {
            let mut tokens = vec![flag];
            for item in items {
                tokens.push(scalar_text(path, key, item)?);
            }
            tokens
        }
        // Nested maps (e.g. formatter_config) travel as the JSON text the flag takes.
        Value::Object(map) => vec![flag, Value::Object(map).to_string()],
        scalar => vec![flag, scalar_text(path, key, scalar)?],
    };
    Ok(tokens)
}

fn scalar_text(path: &str, key: &str, value: Value) -> Result<String, UsageError> {
    match value {
        Value::String(s) => Ok(s),
        Value::Number(n) => Ok(n.to_string()),
        Value::Bool(b) => Ok(b.to_string()),
        other => Err(UsageError::new(format!(
            "--config {path}: key {key:?} has an unsupported value {other}; use a string, number or list"
        ))),
    }
}
