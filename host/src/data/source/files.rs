//! Readers for one dataset file. Structured files give rows as JSON-object text (what the
//! formatter takes); text files give one document. Every error names the file and, where there
//! is one, the line or row.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{Map, Value};

/// A file format the pipeline reads, chosen by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FileKind {
    Parquet,
    /// `.jsonl`/`.ndjson`: one object per line.
    JsonLines,
    /// `.json`: an array of objects, `{"data": [...]}`, a dict of columns, or JSON lines.
    Json,
    Csv,
    /// `.txt`/`.md`: raw text.
    Text,
}

impl FileKind {
    pub fn of(path: &Path) -> Option<FileKind> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        Some(match ext.as_str() {
            "parquet" => FileKind::Parquet,
            "jsonl" | "ndjson" => FileKind::JsonLines,
            "json" => FileKind::Json,
            "csv" => FileKind::Csv,
            "txt" | "md" | "markdown" => FileKind::Text,
            _ => return None,
        })
    }

    /// Files of kinds in one group can be mixed in one dataset (JSON and JSON lines).
    pub fn group(self) -> &'static str {
        match self {
            FileKind::Parquet => "parquet",
            FileKind::JsonLines | FileKind::Json => "json",
            FileKind::Csv => "csv",
            FileKind::Text => "text",
        }
    }
}

/// Extensions [`FileKind::of`] knows, for messages.
pub const EXTENSIONS: &str = ".jsonl, .json, .csv, .parquet, .txt, .md";

/// Reads a structured file into rows of JSON-object text.
pub fn read_rows(path: &Path, kind: FileKind) -> Result<Vec<String>> {
    match kind {
        FileKind::JsonLines => read_json_lines(path),
        FileKind::Json => read_json(path),
        FileKind::Csv => read_csv(path),
        FileKind::Parquet => read_parquet(path),
        FileKind::Text => bail!("{}: a text file has no rows", path.display()),
    }
}

/// Reads a text file (UTF-8).
pub fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{}: not valid UTF-8 (first bad byte at offset {}); convert the file to UTF-8",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

fn open(path: &Path) -> Result<File> {
    File::open(path).with_context(|| format!("{}: cannot open", path.display()))
}

/// JSON lines: blank lines are skipped; every other line must be a JSON object. The line itself
/// is the row text (validated, not re-serialised). Lines are read in order and validated in
/// parallel afterwards (the first bad line in file order is reported): validation is a full JSON
/// parse, the costliest part of reading.
fn read_json_lines(path: &Path) -> Result<Vec<String>> {
    use rayon::prelude::*;
    let reader = BufReader::new(open(path)?);
    let mut rows = Vec::new();
    // 1-based line number of each row (blank lines make them differ from row indices).
    let mut line_numbers: Vec<usize> = Vec::new();
    for (n, line) in reader.lines().enumerate() {
        let mut line =
            line.with_context(|| format!("{}: line {}: cannot read", path.display(), n + 1))?;
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if trimmed.len() != line.len() {
            line = trimmed.to_string();
        }
        rows.push(line);
        line_numbers.push(n + 1);
    }
    let bad = rows
        .par_iter()
        .enumerate()
        .find_first(|(_, row)| check_object_line(row).is_err());
    if let Some((i, row)) = bad {
        let e = check_object_line(row).expect_err("found invalid");
        bail!(
            "{}: line {}: {e}; each line must be one JSON object",
            path.display(),
            line_numbers[i]
        );
    }
    Ok(rows)
}

fn check_object_line(row: &str) -> std::result::Result<(), String> {
    if !row.starts_with('{') {
        return Err("not a JSON object".to_string());
    }
    serde_json::from_str::<serde::de::IgnoredAny>(row)
        .map(|_| ())
        .map_err(|e| format!("invalid JSON ({e})"))
}

/// A `.json` file: an array of objects, an object with a `data` array (HF `field="data"`), a
/// dict of equally long columns, or (as the `datasets` json loader accepts) JSON lines.
fn read_json(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read (JSON files must be UTF-8)", path.display()))?;
    let value: Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(whole) => {
            let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
            let first = lines.next().unwrap_or("");
            if lines.next().is_some() && check_object_line(first).is_ok() {
                return read_json_lines(path);
            }
            bail!("{}: invalid JSON ({whole}); fix the file", path.display());
        }
    };
    match value {
        Value::Array(items) => objects_to_rows(path, items),
        Value::Object(mut map) => match map.remove("data") {
            Some(Value::Array(items)) => objects_to_rows(path, items),
            Some(other) => {
                map.insert("data".to_string(), other);
                columns_to_rows(path, map)
            }
            None => columns_to_rows(path, map),
        },
        _ => bail!(
            "{}: expected an array of objects, {{\"data\": [...]}} or a dict of columns",
            path.display()
        ),
    }
}

fn objects_to_rows(path: &Path, items: Vec<Value>) -> Result<Vec<String>> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| match item {
            Value::Object(_) => Ok(item.to_string()),
            other => bail!(
                "{}: row {i}: expected a JSON object, found {}",
                path.display(),
                kind_name(&other)
            ),
        })
        .collect()
}

/// `{"col": [v0, v1, ...], ...}` → rows `{"col": v0, ...}`.
fn columns_to_rows(path: &Path, columns: Map<String, Value>) -> Result<Vec<String>> {
    let mut len = None;
    for (name, column) in &columns {
        let Value::Array(values) = column else {
            bail!(
                "{}: column {name:?} is not a list; expected an array of objects, \
                 {{\"data\": [...]}} or a dict of equally long columns",
                path.display()
            );
        };
        match len {
            None => len = Some(values.len()),
            Some(n) if n != values.len() => bail!(
                "{}: column {name:?} has {} values but earlier columns have {n}",
                path.display(),
                values.len()
            ),
            Some(_) => {}
        }
    }
    let mut rows = vec![Map::new(); len.unwrap_or(0)];
    for (name, column) in columns {
        let Value::Array(values) = column else {
            unreachable!("checked above")
        };
        for (row, value) in rows.iter_mut().zip(values) {
            row.insert(name.clone(), value);
        }
    }
    Ok(rows
        .into_iter()
        .map(|r| Value::Object(r).to_string())
        .collect())
}

/// CSV with a header row; every cell becomes a JSON string (empty cells become "").
fn read_csv(path: &Path) -> Result<Vec<String>> {
    let mut reader = csv::ReaderBuilder::new().from_reader(open(path)?);
    let headers = reader
        .headers()
        .with_context(|| format!("{}: cannot read the header row", path.display()))?
        .clone();
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.map_err(|e| {
            let line = e
                .position()
                .map_or(String::new(), |p| format!(" (line {})", p.line()));
            anyhow!("{}: row {i}{line}: {e}", path.display())
        })?;
        let row: Map<String, Value> = headers
            .iter()
            .zip(record.iter())
            .map(|(h, v)| (h.to_string(), Value::String(v.to_string())))
            .collect();
        rows.push(Value::Object(row).to_string());
    }
    Ok(rows)
}

/// Parquet through the record API: each row converted to a JSON object.
fn read_parquet(path: &Path) -> Result<Vec<String>> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let reader = SerializedFileReader::new(open(path)?)
        .map_err(|e| anyhow!("{}: not a readable Parquet file: {e}", path.display()))?;
    let rows = reader
        .get_row_iter(None)
        .map_err(|e| anyhow!("{}: cannot read rows: {e}", path.display()))?;
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(|e| {
            anyhow!(
                "{}: row {i}: {e} (ferrotune reads snappy, lz4 and gzip Parquet; re-save \
                 other codecs with one of those)",
                path.display()
            )
        })?;
        out.push(row.to_json_value().to_string());
    }
    Ok(out)
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
