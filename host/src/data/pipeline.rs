//! The data pipeline end to end, as the trainer calls it: read the dataset (or raw text), format
//! rows into samples with the formatter plugin, tokenize with the chat template and loss masks,
//! drop what cannot train (with counted warnings), split off evaluation data, and hand out
//! [`Batcher`]s.

use std::path::Path;

use anyhow::{bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::batch::{BatchOptions, Batcher};
use super::encode::{EncodeOptions, Encoded, Encoder, TokenizedSample};
use super::raw_text;
use super::sample::Sample;
use super::source::{self, Document, RowFile, SourceData, Split};
use super::template::ChatTemplate;
use super::tokenize::TokenizerInfo;
use crate::cli::choices::OnBadRow;
use crate::job::JobConfig;

/// Turns dataset rows (JSON-object text) into samples: `(index into rows, sample)` for each row
/// kept, in order. The formatter plugin implements it (with `--on_bad_row` applied); tests pass
/// closures.
pub trait RowFormatter {
    fn format(&self, rows: &[String]) -> Result<Vec<(usize, Sample)>>;
}

impl<F> RowFormatter for F
where
    F: Fn(&[String]) -> Result<Vec<(usize, Sample)>>,
{
    fn format(&self, rows: &[String]) -> Result<Vec<(usize, Sample)>> {
        self(rows)
    }
}

/// The formatter plugin as a [`RowFormatter`], applying `--on_bad_row` (rejected and trapping
/// rows fail the job or are skipped with counts, as the plugin host reports them).
pub struct PluginRows<'a> {
    pub plugin: &'a crate::plugin::formatter::FormatterPlugin,
    pub on_bad_row: OnBadRow,
}

impl RowFormatter for PluginRows<'_> {
    fn format(&self, rows: &[String]) -> Result<Vec<(usize, Sample)>> {
        crate::plugin::formatter::format_rows(self.plugin, rows, self.on_bad_row)
    }
}

/// What happened to the rows of one dataset on their way to samples.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DataStats {
    /// Rows read (documents for raw text).
    pub rows: usize,
    /// Rows the formatter or chat template rejected, skipped by `--on_bad_row skip`.
    pub skipped_rows: usize,
    /// Samples with no text, dropped.
    pub empty: usize,
    /// Samples without a single trainable token (e.g. a prompt longer than max_seq_length under
    /// --train_on_completions), dropped.
    pub all_masked: usize,
    /// Samples cut to max_seq_length (kept).
    pub truncated: usize,
    /// Assistant turns masked by content search because the template renders prefixes
    /// inconsistently (their end-of-turn tokens are not learned).
    pub approximate_spans: usize,
    /// Samples kept.
    pub samples: usize,
    pub tokens: usize,
    pub trainable_tokens: usize,
}

/// Everything the trainer needs from the data side.
pub struct PreparedData {
    pub train: Vec<TokenizedSample>,
    /// From `--eval_dataset` or `--val_size`.
    pub eval: Option<Vec<TokenizedSample>>,
    pub tokenizer: TokenizerInfo,
    pub chat_template: Option<ChatTemplate>,
    /// The training data as read, before `--val_size` holds samples out of it.
    pub train_stats: DataStats,
    /// `--eval_dataset` as read, or the samples `--val_size` held out.
    pub eval_stats: Option<DataStats>,
    /// SHA-256 over every sample's ids and mask (train, then eval). A checkpoint stores it so a
    /// resume can tell when the data it continues on is not the data it started with.
    pub fingerprint: String,
}

impl PreparedData {
    /// Training batches: `--per_device_train_batch_size` rows, shuffled per epoch by `--seed`.
    pub fn train_batcher(&self, job: &JobConfig) -> Result<Batcher<'_>> {
        Batcher::new(
            &self.train,
            batch_options(job, true, self.tokenizer.pad_id()),
        )
    }

    /// Evaluation batches (`--per_device_eval_batch_size`, dataset order), when there is eval data.
    pub fn eval_batcher(&self, job: &JobConfig) -> Result<Option<Batcher<'_>>> {
        self.eval
            .as_deref()
            .map(|eval| Batcher::new(eval, batch_options(job, false, self.tokenizer.pad_id())))
            .transpose()
    }
}

/// Batch settings from the job; `training` picks the train or eval batch size and shuffling.
pub fn batch_options(job: &JobConfig, training: bool, pad_id: u32) -> BatchOptions {
    BatchOptions {
        micro_batch_size: if training {
            job.training.per_device_train_batch_size
        } else {
            job.data.per_device_eval_batch_size
        },
        max_seq_length: job.model.max_seq_length,
        packing: job.data.packing,
        shuffle: training,
        seed: job.training.seed,
        pad_id,
    }
}

/// Loads the tokenizer from `model_dir` and prepares the job's data (see [`prepare_with`]).
pub fn prepare(
    job: &JobConfig,
    model_dir: &Path,
    formatter: &dyn RowFormatter,
) -> Result<PreparedData> {
    let tokenizer = TokenizerInfo::load(model_dir)?;
    prepare_with(job, tokenizer, formatter)
}

/// Prepares the job's data with an already loaded tokenizer (e.g. from GGUF metadata).
pub fn prepare_with(
    job: &JobConfig,
    tokenizer: TokenizerInfo,
    formatter: &dyn RowFormatter,
) -> Result<PreparedData> {
    let chat_template = ChatTemplate::resolve(job.data.chat_template.as_deref(), &tokenizer)?;
    if tokenizer.eos.is_none() {
        tracing::warn!(
            "the tokenizer names no EOS token (tokenizer_config.json, special_tokens_map.json, \
             generation_config.json); samples get no end-of-sequence token"
        );
    }
    let pipeline = Pipeline::new(job, &tokenizer, chat_template.as_ref(), formatter);
    let (mut train, train_stats) = match &job.data.raw_text_file {
        Some(file) => {
            let text = source::files::read_text(file)
                .with_context(|| format!("--raw_text_file {}", file.display()))?;
            pipeline.windows(
                vec![Document {
                    path: file.clone(),
                    text,
                }],
                "--raw_text_file",
                None,
            )?
        }
        None => pipeline.samples(&job.model.dataset, Split::Train, "--dataset", None)?,
    };
    let val_size = job.data.val_size;
    if job.data.eval_dataset.is_some() && val_size > 0.0 {
        bail!("--eval_dataset and --val_size both ask for evaluation data; pass one of them");
    }
    // The training data as read: what was truncated, skipped or dropped is counted over all of
    // it, before --val_size holds samples out.
    report("training data", &train_stats);
    let (eval, eval_stats) = match &job.data.eval_dataset {
        Some(spec) => {
            let (eval, stats) = pipeline.samples(spec, Split::Eval, "--eval_dataset", None)?;
            report("evaluation data", &stats);
            (Some(eval), Some(stats))
        }
        None if val_size > 0.0 => {
            let eval = split_off_eval(&mut train, val_size, job.training.seed)?;
            let held_out = summarise(&eval);
            tracing::info!("{}", held_out_line(val_size, &held_out, &summarise(&train)));
            (Some(eval), Some(held_out))
        }
        None => (None, None),
    };
    if train.is_empty() || train_stats.trainable_tokens == 0 {
        bail!(
            "no trainable tokens remain in the training data: {} rows → {} skipped by the \
             formatter, {} empty, {} with every token masked; check the dataset, --formatter and \
             --train_on_completions",
            train_stats.rows,
            train_stats.skipped_rows,
            train_stats.empty,
            train_stats.all_masked
        );
    }
    if eval.as_ref().is_some_and(Vec::is_empty) {
        bail!("the evaluation data has no trainable sample; check --eval_dataset");
    }
    let fingerprint = fingerprint(&train, eval.as_deref());
    Ok(PreparedData {
        train,
        eval,
        tokenizer,
        chat_template,
        train_stats,
        eval_stats,
        fingerprint,
    })
}

/// What `ferrotune format` prints: the first `limit` training samples of the job's data
/// (`--dataset`, or `--raw_text_file`) after formatter, chat template, EOS and truncation, each
/// as text with the parts that carry no loss wrapped in `⟦…⟧`. Rows that would be dropped
/// (empty, fully masked) are not shown.
pub fn preview(
    job: &JobConfig,
    tokenizer: &TokenizerInfo,
    formatter: &dyn RowFormatter,
    limit: usize,
) -> Result<Vec<String>> {
    let chat_template = ChatTemplate::resolve(job.data.chat_template.as_deref(), tokenizer)?;
    let pipeline = Pipeline::new(job, tokenizer, chat_template.as_ref(), formatter);
    let (samples, _) = match &job.data.raw_text_file {
        Some(file) => {
            let text = source::files::read_text(file)
                .with_context(|| format!("--raw_text_file {}", file.display()))?;
            pipeline.windows(
                vec![Document {
                    path: file.clone(),
                    text,
                }],
                "--raw_text_file",
                Some(limit),
            )?
        }
        None => pipeline.samples(&job.model.dataset, Split::Train, "--dataset", Some(limit))?,
    };
    samples
        .iter()
        .map(|s| super::display::render_for_display(s, tokenizer))
        .collect()
}

struct Pipeline<'a> {
    job: &'a JobConfig,
    encoder: Encoder<'a>,
    formatter: &'a dyn RowFormatter,
}

impl<'a> Pipeline<'a> {
    fn new(
        job: &'a JobConfig,
        tokenizer: &'a TokenizerInfo,
        template: Option<&'a ChatTemplate>,
        formatter: &'a dyn RowFormatter,
    ) -> Self {
        Self {
            job,
            encoder: Encoder {
                tokenizer,
                template,
                options: EncodeOptions {
                    max_seq_length: job.model.max_seq_length,
                    train_on_completions: job.data.train_on_completions,
                },
            },
            formatter,
        }
    }

    /// Samples of a `--dataset`/`--eval_dataset` value. Text documents are cut into raw-text
    /// windows when the formatter is the default `alpaca` (which cannot use them; this is what
    /// the recipe's worker does with `.txt`/`.md` datasets); any other formatter gets each
    /// document as a `{"text": ...}` row.
    /// `limit` stops after that many samples (previews).
    fn samples(
        &self,
        spec: &str,
        split: Split,
        flag: &str,
        limit: Option<usize>,
    ) -> Result<(Vec<TokenizedSample>, DataStats)> {
        match source::load(spec, split, flag)? {
            SourceData::Documents(docs) if self.job.plugins.formatter == "alpaca" => {
                tracing::info!(
                    "{flag} {spec}: raw text, cut into windows of --chunk_size {} tokens with \
                     --stride {} (pass --formatter text to train on each file as one sample)",
                    self.job.data.chunk_size,
                    self.job.data.stride
                );
                self.windows(docs, flag, limit)
            }
            data => self.format_and_encode(data.into_row_files(), limit),
        }
    }

    fn windows(
        &self,
        docs: Vec<Document>,
        flag: &str,
        limit: Option<usize>,
    ) -> Result<(Vec<TokenizedSample>, DataStats)> {
        let limit = limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut stats = DataStats::default();
        for doc in docs {
            if out.len() >= limit {
                break;
            }
            stats.rows += 1;
            let (samples, truncated) = raw_text::document_samples(
                &doc.text,
                self.encoder.tokenizer,
                self.job.data.chunk_size,
                self.job.data.stride,
                self.job.model.max_seq_length,
            )
            .with_context(|| format!("{flag} {}", doc.path.display()))?;
            stats.truncated += truncated;
            out.extend(samples);
        }
        out.truncate(limit);
        recount(&mut stats, &out);
        Ok((out, stats))
    }

    fn format_and_encode(
        &self,
        files: Vec<RowFile>,
        limit: Option<usize>,
    ) -> Result<(Vec<TokenizedSample>, DataStats)> {
        let limit = limit.unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut stats = DataStats::default();
        let skip_bad = self.job.plugins.on_bad_row == OnBadRow::Skip;
        for mut file in files {
            if out.len() >= limit {
                break;
            }
            file.rows.truncate(limit - out.len());
            let path = file.path.display();
            stats.rows += file.rows.len();
            let formatted = self
                .formatter
                .format(&file.rows)
                .with_context(|| format!("{path}: formatting rows"))?;
            stats.skipped_rows += file.rows.len().saturating_sub(formatted.len());
            // Templating and tokenizing are independent per sample: spread them over the
            // cores, then account for the results in row order (first error wins, as serially).
            let encoder = &self.encoder;
            let results: Vec<(usize, Option<Result<Encoded>>)> = formatted
                .par_iter()
                .map(|(row, sample)| (*row, (!is_empty(sample)).then(|| encoder.encode(sample))))
                .collect();
            for (row, result) in results {
                let Some(result) = result else {
                    stats.empty += 1;
                    continue;
                };
                let encoded = match result {
                    Ok(e) => e,
                    Err(e) if skip_bad => {
                        tracing::warn!("{path}: row {row}: skipped: {e:#}");
                        stats.skipped_rows += 1;
                        continue;
                    }
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("{path}: row {row} (pass --on_bad_row skip to skip such rows)")
                        })
                    }
                };
                stats.truncated += usize::from(encoded.truncated);
                stats.approximate_spans += encoded.approximate_spans;
                if encoded.sample.trainable_tokens() == 0 {
                    stats.all_masked += 1;
                    continue;
                }
                out.push(encoded.sample);
            }
        }
        recount(&mut stats, &out);
        Ok((out, stats))
    }
}

/// A sample with no text at all (the formatter found nothing to train on in the row).
fn is_empty(sample: &Sample) -> bool {
    match sample {
        Sample::Text { text } => text.trim().is_empty(),
        Sample::Completion { prompt, completion } => {
            prompt.trim().is_empty() && completion.trim().is_empty()
        }
        Sample::Chat { messages } => messages.iter().all(|m| m.content.trim().is_empty()),
    }
}

fn recount(stats: &mut DataStats, samples: &[TokenizedSample]) {
    stats.samples = samples.len();
    stats.tokens = samples.iter().map(TokenizedSample::len).sum();
    stats.trainable_tokens = samples.iter().map(TokenizedSample::trainable_tokens).sum();
}

fn summarise(samples: &[TokenizedSample]) -> DataStats {
    let mut stats = DataStats {
        rows: samples.len(),
        ..Default::default()
    };
    recount(&mut stats, samples);
    stats
}

/// Moves a seeded random `val_size` of `train` into the returned eval set: a share when below 1
/// (rounded up, as `datasets`' `train_test_split` does), else a count. Train keeps dataset order.
pub fn split_off_eval(
    train: &mut Vec<TokenizedSample>,
    val_size: f64,
    seed: u64,
) -> Result<Vec<TokenizedSample>> {
    let n = train.len();
    let count = if val_size < 1.0 {
        (val_size * n as f64).ceil() as usize
    } else if val_size.fract() == 0.0 {
        val_size as usize
    } else {
        bail!("--val_size {val_size}: use a share below 1 (e.g. 0.1) or a whole number of rows");
    };
    if count == 0 || count >= n {
        bail!(
            "--val_size {val_size}: would hold out {count} of {n} samples; leave at least one for \
             training and one for evaluation"
        );
    }
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    // A stream no epoch uses, so the split is independent of the epoch shuffles.
    rng.set_stream(u64::MAX);
    order.shuffle(&mut rng);
    let mut is_eval = vec![false; n];
    for &i in &order[..count] {
        is_eval[i] = true;
    }
    let mut eval = Vec::with_capacity(count);
    let mut kept = Vec::with_capacity(n - count);
    for (sample, held_out) in std::mem::take(train).into_iter().zip(is_eval) {
        if held_out {
            eval.push(sample);
        } else {
            kept.push(sample);
        }
    }
    *train = kept;
    Ok(eval)
}

/// The log line for a `--val_size` split: how many samples (of all the training data's) went to
/// evaluation and what each side holds.
fn held_out_line(val_size: f64, held_out: &DataStats, kept: &DataStats) -> String {
    format!(
        "--val_size {val_size}: {} of {} samples held out for evaluation ({} tokens, {} \
         trainable); {} left for training ({} tokens, {} trainable)",
        held_out.samples,
        held_out.samples + kept.samples,
        held_out.tokens,
        held_out.trainable_tokens,
        kept.samples,
        kept.tokens,
        kept.trainable_tokens
    )
}

fn report(label: &str, s: &DataStats) {
    tracing::info!(
        "{label}: {} rows → {} samples, {} tokens ({} trainable)",
        s.rows,
        s.samples,
        s.tokens,
        s.trainable_tokens
    );
    if s.skipped_rows > 0 {
        tracing::warn!(
            "{label}: {} of {} rows rejected and skipped (--on_bad_row skip)",
            s.skipped_rows,
            s.rows
        );
    }
    if s.empty > 0 {
        tracing::warn!("{label}: {} empty samples dropped", s.empty);
    }
    if s.all_masked > 0 {
        tracing::warn!(
            "{label}: {} samples dropped because no token of them is trained (prompt fills \
             max_seq_length under --train_on_completions, or no assistant turn)",
            s.all_masked
        );
    }
    if s.truncated > 0 {
        tracing::warn!(
            "{label}: {} of {} samples truncated to --max_seq_length",
            s.truncated,
            s.samples + s.all_masked
        );
    }
    if s.approximate_spans > 0 {
        tracing::warn!(
            "{label}: the chat template renders conversation prefixes inconsistently; {} \
             assistant turns were located by their content, so their end-of-turn tokens are not \
             learned",
            s.approximate_spans
        );
    }
}

fn fingerprint(train: &[TokenizedSample], eval: Option<&[TokenizedSample]>) -> String {
    let mut hash = Sha256::new();
    let mut add = |samples: &[TokenizedSample]| {
        hash.update((samples.len() as u64).to_le_bytes());
        for s in samples {
            hash.update((s.len() as u64).to_le_bytes());
            for &id in &s.input_ids {
                hash.update(id.to_le_bytes());
            }
            hash.update(s.trainable.iter().map(|&t| t as u8).collect::<Vec<u8>>());
        }
    };
    add(train);
    add(eval.unwrap_or(&[]));
    format!("{:x}", hash.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::batch::DataPosition;
    use crate::data::display::render_for_display;
    use crate::data::sample::Message;
    use crate::data::test_support::{
        alpaca_formatter, text_formatter, write_model_dir, write_parquet,
    };

    /// The job of `ferrotune --dataset <dataset>` (all other flags at their defaults), then
    /// `edit` sets the flags a test is about.
    fn job_with(dataset: &str, edit: impl FnOnce(&mut JobConfig)) -> JobConfig {
        let argv = vec![
            "ferrotune".to_string(),
            "--dataset".to_string(),
            dataset.to_string(),
        ];
        let mut job = match crate::cli::parse(argv) {
            Ok(crate::cli::Invocation::Train(job)) => *job,
            other => panic!("bad test flags: {other:?}"),
        };
        edit(&mut job);
        job
    }

    fn job(dataset: &str) -> JobConfig {
        job_with(dataset, |_| {})
    }

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            write_model_dir(&dir.path().join("model"));
            Self { dir }
        }
        fn model(&self) -> std::path::PathBuf {
            self.dir.path().join("model")
        }
        fn file(&self, name: &str, text: &str) -> String {
            let p = self.dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.to_str().unwrap().to_string()
        }
        fn alpaca_rows(&self, n: usize) -> String {
            let rows: String = (0..n)
                .map(|i| {
                    format!(
                        "{{\"instruction\": \"Add two and three.\", \"input\": \"{i}\", \"output\": \"Two plus three is five.\"}}\n"
                    )
                })
                .collect();
            self.file("train.jsonl", &rows)
        }
    }

    fn err(result: Result<PreparedData>) -> String {
        format!("{:#}", result.err().expect("expected an error"))
    }

    #[test]
    fn jsonl_through_formatter_template_and_tokenizer() {
        let f = Fixture::new();
        let data = f.alpaca_rows(3);
        let p = prepare(&job(&data), &f.model(), &alpaca_formatter).unwrap();
        assert_eq!(p.train.len(), 3);
        assert!(p.eval.is_none());
        assert_eq!(
            render_for_display(&p.train[1], &p.tokenizer).unwrap(),
            "⟦<|begin_of_text|>⟧### Instruction:\nAdd two and three.\n\n### Input:\n1\n\n### Response:\nTwo plus three is five.<|end_of_text|>"
        );
        assert_eq!(p.train_stats.rows, 3);
        assert_eq!(p.train_stats.samples, 3);
        assert_eq!(p.train_stats.trainable_tokens, p.train_stats.tokens - 3);
    }

    #[test]
    fn every_file_format_gives_the_same_samples() {
        let f = Fixture::new();
        let rows = [
            ("Add two and three.", "", "Two plus three is five."),
            ("Say hi", "twice", "hi hi"),
        ];
        let jsonl: String = rows
            .iter()
            .map(|(i, n, o)| {
                format!(
                    "{}\n",
                    serde_json::json!({"instruction": i, "input": n, "output": o})
                )
            })
            .collect();
        let reference = prepare(
            &job(&f.file("a.jsonl", &jsonl)),
            &f.model(),
            &alpaca_formatter,
        )
        .unwrap();
        assert_eq!(reference.train.len(), 2);
        let array = serde_json::Value::Array(
            rows.iter()
                .map(|(i, n, o)| serde_json::json!({"instruction": i, "input": n, "output": o}))
                .collect(),
        );
        let columns = serde_json::json!({
            "instruction": rows.iter().map(|r| r.0).collect::<Vec<_>>(),
            "input": rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            "output": rows.iter().map(|r| r.2).collect::<Vec<_>>(),
        });
        let csv: String = std::iter::once("instruction,input,output\n".to_string())
            .chain(rows.iter().map(|(i, n, o)| format!("{i},{n},{o}\n")))
            .collect();
        let parquet = f.dir.path().join("e.parquet");
        let column = |k: usize| -> Vec<&str> { rows.iter().map(|r| [r.0, r.1, r.2][k]).collect() };
        let (c0, c1, c2) = (column(0), column(1), column(2));
        write_parquet(
            &parquet,
            &[("instruction", &c0), ("input", &c1), ("output", &c2)],
        );
        let parquet = parquet.to_str().unwrap().to_string();
        let dir = f.dir.path().join("dir/data");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("train-00000-of-00001.jsonl"), &jsonl).unwrap();
        std::fs::write(dir.join("test-00000-of-00001.jsonl"), "{}\n").unwrap();
        for spec in [
            f.file("a.json", &array.to_string()),
            f.file("b.json", &serde_json::json!({ "data": array }).to_string()),
            f.file("c.json", &columns.to_string()),
            f.file("d.csv", &csv),
            f.dir.path().join("dir").to_str().unwrap().to_string(),
            parquet,
        ] {
            let p = prepare(&job(&spec), &f.model(), &alpaca_formatter).unwrap();
            assert_eq!(p.train, reference.train, "{spec}");
        }
    }

    #[test]
    fn formatter_errors_name_the_file() {
        let f = Fixture::new();
        let data = f.file("train.jsonl", "{\"instruction\": \"x\", \"input\": \"\"}\n");
        let e = err(prepare(&job(&data), &f.model(), &alpaca_formatter));
        assert!(e.contains("train.jsonl: formatting rows"), "{e}");
        assert!(e.contains("row 0: missing column \"output\""), "{e}");
    }

    #[test]
    fn empty_and_all_masked_samples_are_dropped_and_counted() {
        let f = Fixture::new();
        let data = f.file(
            "rows.jsonl",
            "{\"k\": 0}\n{\"k\": 1}\n{\"k\": 2}\n{\"k\": 3}\n",
        );
        let formatter = |rows: &[String]| -> Result<Vec<(usize, Sample)>> {
            Ok((0..rows.len())
                .filter(|&i| i != 3) // the formatter skipped row 3 (--on_bad_row skip)
                .map(|i| {
                    let sample = match i {
                        0 => Sample::Text { text: " ".into() },
                        1 => Sample::Completion {
                            prompt: "The quick brown fox jumps over the lazy dog. ".repeat(4),
                            completion: "Paris.".into(),
                        },
                        _ => Sample::Completion {
                            prompt: "Q: ".into(),
                            completion: "hello world".into(),
                        },
                    };
                    (i, sample)
                })
                .collect())
        };
        let job = job_with(&data, |j| {
            j.data.train_on_completions = true;
            j.model.max_seq_length = 16;
        });
        let p = prepare(&job, &f.model(), &formatter).unwrap();
        let s = &p.train_stats;
        assert_eq!(
            (s.rows, s.skipped_rows, s.empty, s.all_masked, s.samples),
            (4, 1, 1, 1, 1)
        );
        assert_eq!(s.truncated, 1);

        let only_masked = |rows: &[String]| -> Result<Vec<(usize, Sample)>> {
            Ok((0..rows.len())
                .map(|i| {
                    let messages = vec![Message {
                        role: "user".into(),
                        content: "hi".into(),
                    }];
                    (i, Sample::Chat { messages })
                })
                .collect())
        };
        let e = err(prepare(&job, &f.model(), &only_masked));
        assert!(e.contains("no trainable tokens remain"), "{e}");
        assert!(e.contains("4 with every token masked"), "{e}");
    }

    #[test]
    fn template_errors_fail_or_skip_per_on_bad_row() {
        let f = Fixture::new();
        let data = f.file(
            "rows.jsonl",
            "{\"role\": \"user\"}\n{\"role\": \"robot\"}\n",
        );
        let template = f.file(
            "t.jinja",
            "{% for m in messages %}{% if m.role == 'robot' %}{{ raise_exception('no robots') }}{% endif %}{{ m.content }}{% endfor %}",
        );
        let formatter = |rows: &[String]| -> Result<Vec<(usize, Sample)>> {
            rows.iter()
                .enumerate()
                .map(|(i, r)| {
                    let v: serde_json::Value = serde_json::from_str(r)?;
                    let role = v["role"].as_str().unwrap().to_string();
                    let messages = vec![Message {
                        role,
                        content: "hello world".into(),
                    }];
                    Ok((i, Sample::Chat { messages }))
                })
                .collect()
        };
        let failing = job_with(&data, |j| j.data.chat_template = Some(template.clone()));
        let e = err(prepare(&failing, &f.model(), &formatter));
        assert!(e.contains("rows.jsonl: row 1"), "{e}");
        assert!(e.contains("no robots"), "{e}");
        let skipping = job_with(&data, |j| {
            j.data.chat_template = Some(template.clone());
            j.plugins.on_bad_row = OnBadRow::Skip;
        });
        let p = prepare(&skipping, &f.model(), &formatter).unwrap();
        assert_eq!((p.train_stats.samples, p.train_stats.skipped_rows), (1, 1));
    }

    #[test]
    fn val_size_holds_out_a_seeded_share_or_count() {
        let f = Fixture::new();
        let data = f.alpaca_rows(8);
        let val = |v: f64, seed: u64| {
            job_with(&data, |j| {
                j.data.val_size = v;
                j.training.seed = seed;
            })
        };
        let p = prepare(&val(0.2, 3407), &f.model(), &alpaca_formatter).unwrap();
        assert_eq!((p.train.len(), p.eval.as_ref().unwrap().len()), (6, 2));
        let again = prepare(&val(0.2, 3407), &f.model(), &alpaca_formatter).unwrap();
        assert_eq!(p.eval, again.eval);
        assert_eq!(p.fingerprint, again.fingerprint);
        let other_seed = prepare(&val(0.2, 1), &f.model(), &alpaca_formatter).unwrap();
        assert_ne!(p.fingerprint, other_seed.fingerprint);
        // The training data's counts are of all of it, the held-out part's of its samples.
        assert_eq!((p.train_stats.rows, p.train_stats.samples), (8, 8));
        let held_out = p.eval_stats.as_ref().unwrap();
        assert_eq!((held_out.rows, held_out.samples), (2, 2));
        let line = held_out_line(0.2, held_out, &summarise(&p.train));
        assert!(
            line.starts_with("--val_size 0.2: 2 of 8 samples held out"),
            "{line}"
        );
        assert!(line.contains("; 6 left for training"), "{line}");
        let truncating = job_with(&data, |j| {
            j.data.val_size = 0.25;
            j.model.max_seq_length = 8;
        });
        let p = prepare(&truncating, &f.model(), &alpaca_formatter).unwrap();
        let s = &p.train_stats;
        assert_eq!(
            (s.samples, s.truncated),
            (8, 8),
            "every sample cut, counted over all 8"
        );
        assert_eq!(p.train.len(), 6);
        let p = prepare(&val(3.0, 3407), &f.model(), &alpaca_formatter).unwrap();
        assert_eq!(p.eval.unwrap().len(), 3);
        let e = err(prepare(&val(8.0, 3407), &f.model(), &alpaca_formatter));
        assert!(e.contains("leave at least one for training"), "{e}");
        let both = job_with(&data, |j| {
            j.data.val_size = 2.0;
            j.data.eval_dataset = Some(data.clone());
        });
        assert!(err(prepare(&both, &f.model(), &alpaca_formatter)).contains("pass one of them"));
        let eval_file = job_with(&data, |j| j.data.eval_dataset = Some(data.clone()));
        let p = prepare(&eval_file, &f.model(), &alpaca_formatter).unwrap();
        assert_eq!(p.eval.as_ref().unwrap(), &p.train);
        let batches: Vec<_> = p
            .eval_batcher(&eval_file)
            .unwrap()
            .unwrap()
            .one_epoch()
            .collect();
        assert_eq!(batches.len(), 2, "8 samples in eval batches of 4");
    }

    #[test]
    fn raw_text_file_becomes_windows_with_eos() {
        let f = Fixture::new();
        let text = "The quick brown fox jumps over the lazy dog. ".repeat(6);
        let file = f.file("book.txt", &text);
        let windows = |dataset: &str, raw: bool| {
            job_with(dataset, |j| {
                j.data.raw_text_file = raw.then(|| file.clone().into());
                j.data.chunk_size = 12;
                j.data.stride = 4;
                j.model.max_seq_length = 64;
            })
        };
        let p = prepare(&windows("unused", true), &f.model(), &alpaca_formatter).unwrap();
        let tokens = p.tokenizer.encode(&text, false).unwrap().ids;
        let eos = p.tokenizer.eos.as_ref().unwrap().id;
        let expected = raw_text::windows(&tokens, 12, 4, Some(eos));
        assert!(expected.len() > 2);
        let got: Vec<Vec<u32>> = p.train.iter().map(|s| s.input_ids.clone()).collect();
        assert_eq!(got, expected);
        assert_eq!(
            &got[1][..12],
            &tokens[8..20],
            "windows step by chunk_size - stride"
        );
        assert!(p.train.iter().all(|s| s.trainable[1..].iter().all(|&t| t)));

        // A .txt dataset: windows with the default formatter, one row per file with `text`.
        let p = prepare(&windows(&file, false), &f.model(), &alpaca_formatter).unwrap();
        assert_eq!(p.train.len(), expected.len());
        let as_rows = job_with(&file, |j| j.plugins.formatter = "text".into());
        let p = prepare(&as_rows, &f.model(), &text_formatter).unwrap();
        assert_eq!(p.train.len(), 1);
        assert_eq!(p.train[0].len(), tokens.len() + 2, "BOS + text + EOS");
    }

    #[test]
    fn prepared_batches_are_identical_across_runs_and_resume() {
        let f = Fixture::new();
        let data = f.alpaca_rows(10);
        let job = job_with(&data, |j| {
            j.data.packing = true;
            j.model.max_seq_length = 128;
            j.training.per_device_train_batch_size = 2;
        });
        let a = prepare(&job, &f.model(), &alpaca_formatter).unwrap();
        let b = prepare(&job, &f.model(), &alpaca_formatter).unwrap();
        let (ba, bb) = (
            a.train_batcher(&job).unwrap(),
            b.train_batcher(&job).unwrap(),
        );
        let run: Vec<_> = ba
            .batches_from(DataPosition::default())
            .unwrap()
            .take(9)
            .collect();
        assert_eq!(
            run,
            bb.batches_from(DataPosition::default())
                .unwrap()
                .take(9)
                .collect::<Vec<_>>()
        );
        let resumed: Vec<_> = bb.batches_from(run[4].next).unwrap().take(4).collect();
        assert_eq!(resumed, run[5..].to_vec());
        assert!(run.iter().all(|p| p.batch.seq_len <= 128));
        assert!(
            ba.rows() < a.train.len(),
            "packing put several samples in a row"
        );
    }

    #[test]
    fn preview_shows_the_first_samples_with_masks_marked() {
        let f = Fixture::new();
        let data = f.alpaca_rows(5);
        let tokenizer = TokenizerInfo::load(&f.model()).unwrap();
        let shown = preview(&job(&data), &tokenizer, &alpaca_formatter, 2).unwrap();
        assert_eq!(shown.len(), 2);
        assert!(
            shown[0].starts_with("⟦<|begin_of_text|>⟧### Instruction:\nAdd two and three."),
            "{}",
            shown[0]
        );
        assert!(
            shown[1].ends_with("Two plus three is five.<|end_of_text|>"),
            "{}",
            shown[1]
        );
    }
}
