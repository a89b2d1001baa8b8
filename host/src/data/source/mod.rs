//! Where dataset rows come from: a local file, a directory of files, or a dataset id in the local
//! Hugging Face hub cache. Structured files give rows (JSON-object text, what the formatter
//! takes); `.txt`/`.md` files give documents.
//!
//! A directory (or a hub snapshot) is read like the `datasets` library reads one: hidden and
//! `_`-prefixed paths and `README.md` are skipped; files whose path names a split (`train`,
//! `test`, `validation`, ... as a word, e.g. `data/train-00000-of-00001.parquet`) belong to that
//! split, and when no file names one, every file is training data; when files of several formats
//! are present, the most common format wins and the others are reported.

pub mod files;
pub mod hf_cache;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub use files::FileKind;
use hf_cache::RepoKind;

/// One structured file's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowFile {
    pub path: PathBuf,
    /// Each row is the text of one JSON object.
    pub rows: Vec<String>,
}

/// One raw text file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Document {
    pub path: PathBuf,
    pub text: String,
}

/// What a dataset source holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceData {
    Rows(Vec<RowFile>),
    Documents(Vec<Document>),
}

impl SourceData {
    /// Rows for the formatter: structured rows as they are, documents as `{"text": ...}` rows.
    pub fn into_row_files(self) -> Vec<RowFile> {
        match self {
            SourceData::Rows(files) => files,
            SourceData::Documents(docs) => docs
                .into_iter()
                .map(|d| RowFile {
                    path: d.path,
                    rows: vec![serde_json::json!({ "text": d.text }).to_string()],
                })
                .collect(),
        }
    }
}

/// Which split of a multi-split directory or hub dataset to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// `train` files (or all files when none names a split).
    Train,
    /// `validation`, else `test` files (or all files when none names a split), for
    /// `--eval_dataset`.
    Eval,
}

/// Reads the dataset `spec` (a `--dataset`/`--eval_dataset` value): a file, a directory, or a
/// hub dataset id found in the local cache, else downloaded into it (unless `HF_HUB_OFFLINE`).
/// `flag` names the flag in errors.
pub fn load(spec: &str, split: Split, flag: &str) -> Result<SourceData> {
    let hub = crate::hub::Hub::from_env();
    load_with_caches(spec, split, flag, &hf_cache::hub_cache_dirs(), hub.as_ref())
}

/// [`load`] with explicit hub cache directories to search and Hub to download from (`None`:
/// no downloads).
pub fn load_with_caches(
    spec: &str,
    split: Split,
    flag: &str,
    cache_dirs: &[PathBuf],
    hub: Option<&crate::hub::Hub>,
) -> Result<SourceData> {
    let path = Path::new(spec);
    if path.is_file() {
        return read_file(path).with_context(|| format!("{flag} {spec}"));
    }
    if path.is_dir() {
        return read_dir(path, split).with_context(|| format!("{flag} {spec}"));
    }
    if FileKind::of(path).is_some() || !hf_cache::looks_like_repo_id(spec) {
        bail!(
            "{flag} {spec}: no such file or directory; pass a {} file, a directory of them, or a \
             Hugging Face dataset id",
            files::EXTENSIONS
        );
    }
    if let Some(snapshot) = hf_cache::find_snapshot(RepoKind::Dataset, spec, cache_dirs)? {
        tracing::info!("{flag} {spec}: reading {}", snapshot.display());
        return read_dir(&snapshot, split)
            .with_context(|| format!("{flag} {spec} (hub cache {})", snapshot.display()));
    }
    let looked: Vec<String> = cache_dirs
        .iter()
        .map(|d| {
            d.join(hf_cache::repo_folder(RepoKind::Dataset, spec))
                .display()
                .to_string()
        })
        .collect();
    let download = match (hub, cache_dirs.first()) {
        (None, _) => "downloads are off (HF_HUB_OFFLINE)".to_string(),
        (Some(_), None) => "there is no cache to download into".to_string(),
        (Some(hub), Some(cache)) => {
            tracing::info!(
                "{flag} {spec}: not cached; downloading from {}",
                hub.endpoint()
            );
            // The formats the pipeline reads; README.md and other text stays behind.
            let wanted =
                |file: &str| FileKind::of(Path::new(file)).is_some_and(|k| k != FileKind::Text);
            match hub.download_dataset(spec, cache, wanted) {
                Ok(snapshot) => {
                    return read_dir(&snapshot, split).with_context(|| {
                        format!("{flag} {spec} (downloaded to {})", snapshot.display())
                    })
                }
                Err(e) => format!("downloading from {} failed: {e:#}", hub.endpoint()),
            }
        }
    };
    let arrow_note = match hf_cache::in_datasets_library_cache(spec) {
        Some(dir) => format!(
            " ({} holds the `datasets` library's Arrow cache of it, which ferrotune does not read)",
            dir.display()
        ),
        None => String::new(),
    };
    bail!(
        "{flag} {spec}: not a local file or directory, and not in the Hugging Face hub cache \
         (looked in {}){arrow_note}, and {download}; fetch it with `huggingface-cli download \
         --repo-type dataset {spec}` (set HF_HUB_CACHE or HF_HOME if your cache is elsewhere) or \
         pass a local file",
        if looked.is_empty() {
            "no cache dir: HOME, HF_HOME and HF_HUB_CACHE are unset".to_string()
        } else {
            looked.join(", ")
        }
    )
}

/// Reads one file by its extension.
pub fn read_file(path: &Path) -> Result<SourceData> {
    let Some(kind) = FileKind::of(path) else {
        bail!(
            "{}: unknown file type; use one of {}",
            path.display(),
            files::EXTENSIONS
        );
    };
    read_files(&[(path.to_path_buf(), kind)])
}

fn read_files(list: &[(PathBuf, FileKind)]) -> Result<SourceData> {
    if list.iter().all(|(_, k)| *k == FileKind::Text) {
        let docs = list
            .iter()
            .map(|(path, _)| {
                Ok(Document {
                    path: path.clone(),
                    text: files::read_text(path)?,
                })
            })
            .collect::<Result<_>>()?;
        return Ok(SourceData::Documents(docs));
    }
    let row_files = list
        .iter()
        .map(|(path, kind)| {
            Ok(RowFile {
                path: path.clone(),
                rows: files::read_rows(path, *kind)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(SourceData::Rows(row_files))
}

/// Reads the data files of `dir` for `split` (see the module docs for the rules).
pub fn read_dir(dir: &Path, split: Split) -> Result<SourceData> {
    let mut found = Vec::new();
    collect_files(dir, &mut found)?;
    if found.is_empty() {
        bail!(
            "{}: no data files ({}) in this directory",
            dir.display(),
            files::EXTENSIONS
        );
    }
    let chosen = files_for_split(dir, &found, split)?;
    let chosen = dominant_format(dir, chosen);
    read_files(&chosen)
}

fn collect_files(dir: &Path, out: &mut Vec<(PathBuf, FileKind)>) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot list", dir.display()))?
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("{}: cannot list", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        let path = entry.path();
        // Hub snapshots hold symlinks into blobs/: follow them.
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if path.is_file() && !name.eq_ignore_ascii_case("README.md") {
            if let Some(kind) = FileKind::of(&path) {
                out.push((path, kind));
            }
        }
    }
    Ok(())
}

const TRAIN_WORDS: [&str; 2] = ["train", "training"];
const VALIDATION_WORDS: [&str; 4] = ["validation", "valid", "dev", "val"];
const TEST_WORDS: [&str; 5] = ["test", "testing", "eval", "evaluation", "tests"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SplitName {
    Train,
    Validation,
    Test,
}

/// The split a path names, as a word of its path below `root` (words are separated by any
/// non-alphanumeric character).
fn split_named_by(root: &Path, path: &Path) -> Option<SplitName> {
    let rel = path
        .strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .to_lowercase();
    let words: Vec<&str> = rel.split(|c: char| !c.is_ascii_alphanumeric()).collect();
    let has = |list: &[&str]| words.iter().any(|w| list.contains(w));
    if has(&TRAIN_WORDS) {
        Some(SplitName::Train)
    } else if has(&VALIDATION_WORDS) {
        Some(SplitName::Validation)
    } else if has(&TEST_WORDS) {
        Some(SplitName::Test)
    } else {
        None
    }
}

fn files_for_split(
    root: &Path,
    found: &[(PathBuf, FileKind)],
    split: Split,
) -> Result<Vec<(PathBuf, FileKind)>> {
    let named: Vec<Option<SplitName>> =
        found.iter().map(|(p, _)| split_named_by(root, p)).collect();
    if named.iter().all(Option::is_none) {
        return Ok(found.to_vec());
    }
    let wanted: &[SplitName] = match split {
        Split::Train => &[SplitName::Train],
        Split::Eval => &[SplitName::Validation, SplitName::Test],
    };
    for want in wanted {
        let picked: Vec<_> = found
            .iter()
            .zip(&named)
            .filter(|(_, n)| **n == Some(*want))
            .map(|(f, _)| f.clone())
            .collect();
        if !picked.is_empty() {
            return Ok(picked);
        }
    }
    let what = match split {
        Split::Train => "train",
        Split::Eval => "validation or test",
    };
    bail!(
        "{}: its files name splits, but none is a {what} split; files: {}",
        root.display(),
        found
            .iter()
            .map(|(p, _)| p.strip_prefix(root).unwrap_or(p).display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Keeps the files of the most common format group (ties: parquet, json, csv, text); warns about
/// the others.
fn dominant_format(root: &Path, files: Vec<(PathBuf, FileKind)>) -> Vec<(PathBuf, FileKind)> {
    const ORDER: [&str; 4] = ["parquet", "json", "csv", "text"];
    let count = |g: &str| files.iter().filter(|(_, k)| k.group() == g).count();
    let best = ORDER
        .iter()
        .copied()
        .max_by_key(|g| {
            (
                count(g),
                std::cmp::Reverse(ORDER.iter().position(|o| o == g)),
            )
        })
        .expect("ORDER is not empty");
    let (keep, skip): (Vec<_>, Vec<_>) = files.into_iter().partition(|(_, k)| k.group() == best);
    if !skip.is_empty() {
        tracing::warn!(
            "{}: reading the {} {best} file(s); ignoring {} file(s) of other formats: {}",
            root.display(),
            keep.len(),
            skip.len(),
            skip.iter()
                .map(|(p, _)| p.strip_prefix(root).unwrap_or(p).display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    keep
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_support::write_parquet;

    fn write(dir: &Path, rel: &str, text: &str) -> PathBuf {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    fn rows(data: SourceData) -> Vec<String> {
        match data {
            SourceData::Rows(files) => files.into_iter().flat_map(|f| f.rows).collect(),
            SourceData::Documents(d) => panic!("expected rows, got documents {d:?}"),
        }
    }

    fn load_file(path: &Path) -> Result<Vec<String>> {
        load(path.to_str().unwrap(), Split::Train, "--dataset").map(rows)
    }

    fn err(result: Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", result.unwrap_err())
    }

    #[test]
    fn jsonl_rows_are_the_lines_and_bad_lines_are_named() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "a.jsonl", "{\"a\": 1}\n\n  {\"a\": \"é\"}  \n");
        assert_eq!(load_file(&p).unwrap(), vec!["{\"a\": 1}", "{\"a\": \"é\"}"]);
        let p = write(d.path(), "b.jsonl", "{\"a\": 1}\n{\"a\": 2\n");
        let e = err(load_file(&p));
        assert!(e.contains("b.jsonl: line 2: invalid JSON"), "{e}");
        let p = write(d.path(), "c.jsonl", "{\"a\": 1}\n[1]\n");
        let e = err(load_file(&p));
        assert!(e.contains("c.jsonl: line 2: not a JSON object"), "{e}");
        // Validated in parallel, still reported in file order with the file's line numbers.
        let mut text = "\n{\"a\": 1}\n".repeat(500);
        text.push_str("{bad\n[2]\n");
        let p = write(d.path(), "d.jsonl", &text);
        let e = err(load_file(&p));
        assert!(e.contains("d.jsonl: line 1001: invalid JSON"), "{e}");
    }

    #[test]
    fn json_arrays_data_fields_columns_and_json_lines() {
        let d = tempfile::tempdir().unwrap();
        let want = vec![
            "{\"x\":1,\"y\":\"a\"}".to_string(),
            "{\"x\":2,\"y\":\"b\"}".to_string(),
        ];
        let p = write(
            d.path(),
            "arr.json",
            r#"[{"x": 1, "y": "a"}, {"x": 2, "y": "b"}]"#,
        );
        assert_eq!(load_file(&p).unwrap(), want);
        let p = write(
            d.path(),
            "data.json",
            r#"{"version": "1", "data": [{"x": 1, "y": "a"}, {"x": 2, "y": "b"}]}"#,
        );
        assert_eq!(load_file(&p).unwrap(), want);
        let p = write(d.path(), "cols.json", r#"{"x": [1, 2], "y": ["a", "b"]}"#);
        assert_eq!(load_file(&p).unwrap(), want);
        let p = write(
            d.path(),
            "lines.json",
            "{\"x\":1,\"y\":\"a\"}\n{\"x\":2,\"y\":\"b\"}\n",
        );
        assert_eq!(load_file(&p).unwrap(), want);
        let p = write(d.path(), "bad.json", r#"[{"x": 1}, 7]"#);
        assert!(
            err(load_file(&p)).contains("bad.json: row 1: expected a JSON object, found a number")
        );
        let p = write(d.path(), "ragged.json", r#"{"x": [1, 2], "y": ["a"]}"#);
        assert!(err(load_file(&p)).contains("column \"y\" has 1 values but earlier columns have 2"));
        let p = write(d.path(), "broken.json", "[{\"x\": 1},");
        assert!(err(load_file(&p)).contains("broken.json: invalid JSON"));
    }

    #[test]
    fn csv_cells_become_string_columns() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            d.path(),
            "t.csv",
            "instruction,input,output\n\"Say hi, twice\",,hi hi\n",
        );
        assert_eq!(
            load_file(&p).unwrap(),
            vec![r#"{"input":"","instruction":"Say hi, twice","output":"hi hi"}"#]
        );
        let p = write(d.path(), "bad.csv", "a,b\n1,2\n3\n");
        let e = err(load_file(&p));
        assert!(e.contains("bad.csv: row 1 (line 3)"), "{e}");
    }

    #[test]
    fn parquet_rows_become_json_objects() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t.parquet");
        write_parquet(&p, &[("text", &["one", "two"]), ("lang", &["en", "fr"])]);
        assert_eq!(
            load_file(&p).unwrap(),
            vec![
                r#"{"lang":"en","text":"one"}"#,
                r#"{"lang":"fr","text":"two"}"#
            ]
        );
        let p = write(d.path(), "fake.parquet", "not parquet");
        assert!(err(load_file(&p)).contains("fake.parquet: not a readable Parquet file"));
    }

    #[test]
    fn text_files_are_documents() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "book.md", "# Title\n\nBody.\n");
        let data = load(p.to_str().unwrap(), Split::Train, "--dataset").unwrap();
        assert_eq!(
            data,
            SourceData::Documents(vec![Document {
                path: p.clone(),
                text: "# Title\n\nBody.\n".into()
            }])
        );
        assert_eq!(
            data.into_row_files()[0].rows,
            vec![r##"{"text":"# Title\n\nBody.\n"}"##]
        );
        std::fs::write(&p, [0x66, 0xff, 0x66]).unwrap();
        assert!(err(load_file(&p)).contains("not valid UTF-8 (first bad byte at offset 1)"));
    }

    #[test]
    fn directories_pick_the_split_and_the_dominant_format() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "README.md", "# card");
        write(d.path(), ".hidden.jsonl", "{\"s\": \"hidden\"}");
        write(
            d.path(),
            "data/train-00000-of-00002.jsonl",
            "{\"s\": \"t0\"}",
        );
        write(
            d.path(),
            "data/train-00001-of-00002.jsonl",
            "{\"s\": \"t1\"}",
        );
        write(
            d.path(),
            "data/test-00000-of-00001.jsonl",
            "{\"s\": \"test\"}",
        );
        write(d.path(), "data/validation.json", "[{\"s\": \"val\"}]");
        write(d.path(), "notes.txt", "a stray text file");
        let spec = d.path().to_str().unwrap();
        assert_eq!(
            rows(load(spec, Split::Train, "--dataset").unwrap()),
            vec!["{\"s\": \"t0\"}", "{\"s\": \"t1\"}"]
        );
        assert_eq!(
            rows(load(spec, Split::Eval, "--eval_dataset").unwrap()),
            vec!["{\"s\":\"val\"}"]
        );

        let plain = tempfile::tempdir().unwrap();
        write(plain.path(), "a.csv", "s\n1\n");
        write(plain.path(), "b.csv", "s\n2\n");
        write(plain.path(), "c.jsonl", "{\"s\": \"3\"}");
        assert_eq!(
            rows(load(plain.path().to_str().unwrap(), Split::Train, "--dataset").unwrap()),
            vec!["{\"s\":\"1\"}", "{\"s\":\"2\"}"]
        );

        let only_test = tempfile::tempdir().unwrap();
        write(only_test.path(), "test.jsonl", "{}");
        let e = err(load(
            only_test.path().to_str().unwrap(),
            Split::Train,
            "--dataset",
        ));
        assert!(
            e.contains("none is a train split; files: test.jsonl"),
            "{e}"
        );

        let empty = tempfile::tempdir().unwrap();
        let e = err(load(
            empty.path().to_str().unwrap(),
            Split::Train,
            "--dataset",
        ));
        assert!(e.contains("no data files"), "{e}");
    }

    #[test]
    fn hub_cache_snapshots_are_found_through_refs_main_and_symlinks() {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("datasets--yahma--alpaca-cleaned");
        let blob = write(&repo, "blobs/0123abcd", "[{\"instruction\": \"i\"}]");
        write(&repo, "refs/main", "rev2\n");
        std::fs::create_dir_all(repo.join("snapshots/rev1")).unwrap();
        write(&repo, "snapshots/rev1/old.jsonl", "{\"old\": true}");
        std::fs::create_dir_all(repo.join("snapshots/rev2")).unwrap();
        std::os::unix::fs::symlink(&blob, repo.join("snapshots/rev2/alpaca_data_cleaned.json"))
            .unwrap();
        write(&repo, "snapshots/rev2/README.md", "---\nlicense: cc\n---\n");
        let caches = vec![cache.path().join("elsewhere"), cache.path().to_path_buf()];
        let data = load_with_caches(
            "yahma/alpaca-cleaned",
            Split::Train,
            "--dataset",
            &caches,
            None,
        )
        .unwrap();
        assert_eq!(rows(data), vec!["{\"instruction\":\"i\"}"]);

        let e = err(load_with_caches(
            "org/missing",
            Split::Train,
            "--dataset",
            &caches,
            None,
        ));
        assert!(e.contains("not in the Hugging Face hub cache"), "{e}");
        assert!(
            e.contains(
                &cache
                    .path()
                    .join("datasets--org--missing")
                    .display()
                    .to_string()
            ),
            "{e}"
        );
        assert!(
            e.contains("huggingface-cli download --repo-type dataset org/missing")
                && e.contains("downloads are off"),
            "{e}"
        );
    }

    #[test]
    fn missing_and_unknown_files_are_clear_errors() {
        let e = err(load("/no/such/train.jsonl", Split::Train, "--dataset"));
        assert!(
            e.contains("--dataset /no/such/train.jsonl: no such file or directory"),
            "{e}"
        );
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "data.xml", "<a/>");
        assert!(err(load_file(&p)).contains("data.xml: unknown file type"));
    }
}
