//! Bad input is reported as one line that names the flag and the fix, with exit code 2.

use clap::error::{ContextKind, ContextValue, ErrorKind};

/// A usage error: one line for the user, exit code 2, nothing written.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

impl UsageError {
    pub fn new(line: impl Into<String>) -> Self {
        UsageError(line.into())
    }
}

/// Condenses clap's multi-line error into one line naming the flag and the fix.
pub fn one_line(err: &clap::Error) -> String {
    let context = |kind| err.get(kind).map(context_text);
    let arg = context(ContextKind::InvalidArg).unwrap_or_default();
    let value = context(ContextKind::InvalidValue).unwrap_or_default();
    match err.kind() {
        ErrorKind::UnknownArgument => {
            let hint = match context(ContextKind::SuggestedArg) {
                Some(s) => format!("did you mean {s}?"),
                None => "run ferrotune --help for the list of flags".to_string(),
            };
            format!("unknown flag {arg}; {hint}")
        }
        ErrorKind::InvalidValue => match context(ContextKind::ValidValue) {
            Some(valid) => format!("invalid value {value:?} for {arg}; use one of: {valid}"),
            None => format!("{arg} needs a value; give one after the flag"),
        },
        ErrorKind::ValueValidation => {
            let why = first_line_after_colon(err);
            format!("invalid value {value:?} for {arg}: {why}")
        }
        ErrorKind::NoEquals | ErrorKind::WrongNumberOfValues | ErrorKind::TooManyValues => {
            format!("{arg} got the wrong number of values; see ferrotune --help")
        }
        // Multi-line in clap (the names are on the lines after the first): keep them.
        ErrorKind::MissingRequiredArgument => {
            format!("missing {arg}; add it (see --help)")
        }
        ErrorKind::ArgumentConflict => {
            let other = context(ContextKind::PriorArg).unwrap_or_default();
            format!("{arg} cannot be used with {other}; drop one of them")
        }
        _ => first_line(err),
    }
}

fn context_text(value: &ContextValue) -> String {
    match value {
        ContextValue::String(s) => s.clone(),
        ContextValue::Strings(v) => v.join(", "),
        ContextValue::StyledStr(s) => s.to_string(),
        ContextValue::StyledStrs(v) => v
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        ContextValue::Number(n) => n.to_string(),
        ContextValue::Bool(b) => b.to_string(),
        ContextValue::None => String::new(),
        _ => String::new(),
    }
}

fn first_line(err: &clap::Error) -> String {
    let text = err.render().to_string();
    let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    line.trim_start_matches("error: ").to_string()
}

/// clap renders validator failures as "error: invalid value 'x' for '--f <F>': WHY".
fn first_line_after_colon(err: &clap::Error) -> String {
    let line = first_line(err);
    match line.rsplit_once("': ") {
        Some((_, why)) => why.to_string(),
        None => line,
    }
}
