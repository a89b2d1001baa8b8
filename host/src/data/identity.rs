//! What a run's data was made from, as the flags a person typed. A checkpoint records these
//! beside the data fingerprint (a hash of every token and mask, [`super::PreparedData`]), so when
//! a resume finds the fingerprint changed it can say which input changed and how to fix it,
//! instead of only that the data differs.

use std::collections::BTreeMap;

use crate::job::JobConfig;

/// The flags that decide the training and evaluation samples, by flag name.
pub fn data_settings(job: &JobConfig) -> BTreeMap<String, String> {
    let d = &job.data;
    let path = |p: &Option<std::path::PathBuf>| {
        p.as_ref()
            .map_or_else(String::new, |p| p.display().to_string())
    };
    let mut settings: BTreeMap<String, String> = [
        ("--dataset", job.model.dataset.clone()),
        ("--raw_text_file", path(&d.raw_text_file)),
        // The tokenizer and the model's own chat template come from here.
        ("--model_name", job.model.model_name.clone()),
        ("--formatter", job.plugins.formatter.clone()),
        (
            "--formatter_config",
            job.plugins.formatter_config.clone().unwrap_or_default(),
        ),
        (
            "--chat_template",
            d.chat_template.clone().unwrap_or_default(),
        ),
        ("--max_seq_length", job.model.max_seq_length.to_string()),
        ("--packing", d.packing.to_string()),
        ("--train_on_completions", d.train_on_completions.to_string()),
        ("--eval_dataset", d.eval_dataset.clone().unwrap_or_default()),
        ("--val_size", d.val_size.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    if d.raw_text_file.is_some() {
        settings.insert("--chunk_size".into(), d.chunk_size.to_string());
        settings.insert("--stride".into(), d.stride.to_string());
    }
    settings
}

/// Why the data differs from the checkpoint's, given the settings it recorded (empty for
/// checkpoints written before settings were recorded) and this job's.
pub fn describe_change(saved: &BTreeMap<String, String>, now: &BTreeMap<String, String>) -> String {
    let shown = |v: Option<&String>| match v.map(String::as_str) {
        None | Some("") => "(unset)".to_string(),
        Some(v) => v.to_string(),
    };
    let changed: Vec<String> = if saved.is_empty() {
        Vec::new()
    } else {
        let keys: std::collections::BTreeSet<&String> = saved.keys().chain(now.keys()).collect();
        keys.into_iter()
            .filter(|k| saved.get(*k) != now.get(*k))
            .map(|k| {
                format!(
                    "{k} {} (checkpoint: {})",
                    shown(now.get(k)),
                    shown(saved.get(k))
                )
            })
            .collect()
    };
    let what = if changed.is_empty() && !saved.is_empty() {
        "the training data's contents changed under the same flags (the dataset file, the \
         model's tokenizer or chat template, or the formatter plugin was modified)"
            .to_string()
    } else if changed.is_empty() {
        "the training data (dataset, formatter, tokenizer, chat template, --max_seq_length or \
         --packing changed)"
            .to_string()
    } else {
        format!("the training data changed: {}", changed.join(", "))
    };
    format!(
        "{what}; a resumed run must see the same samples in the same order. To train this \
         adapter further on other data, start a new --output_dir"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(extra: &[&str]) -> JobConfig {
        let mut args = vec![
            "ferrotune",
            "--model_name",
            "m",
            "--dataset",
            "a.jsonl",
            "--max_steps",
            "1",
        ];
        args.extend(extra);
        match crate::cli::parse(args.iter().map(|s| s.to_string()).collect()) {
            Ok(crate::cli::Invocation::Train(job)) => *job,
            _ => panic!("not a training invocation: {args:?}"),
        }
    }

    #[test]
    fn names_each_changed_flag_with_both_values() {
        let saved = data_settings(&job(&[]));
        let now = data_settings(&job(&[
            "--dataset",
            "b.jsonl",
            "--max_seq_length",
            "512",
            "--formatter_config",
            "{\"style\":\"standard\"}",
        ]));
        let msg = describe_change(&saved, &now);
        assert!(
            msg.contains("--dataset b.jsonl (checkpoint: a.jsonl)"),
            "{msg}"
        );
        assert!(
            msg.contains("--max_seq_length 512 (checkpoint: 2048)"),
            "{msg}"
        );
        assert!(
            msg.contains("--formatter_config {\"style\":\"standard\"} (checkpoint: (unset))"),
            "{msg}"
        );
        assert!(!msg.contains("--packing"), "{msg}");
        assert!(msg.contains("new --output_dir"), "{msg}");
    }

    #[test]
    fn same_flags_mean_changed_contents_and_old_checkpoints_get_the_general_reason() {
        let s = data_settings(&job(&[]));
        assert!(describe_change(&s, &s).contains("contents changed"));
        let old = describe_change(&BTreeMap::new(), &s);
        assert!(old.contains("--max_seq_length or --packing"), "{old}");
        let mut raw = job(&[]);
        raw.data.raw_text_file = Some("t.txt".into());
        let raw_settings = data_settings(&raw);
        assert_eq!(
            raw_settings["--chunk_size"],
            raw.data.chunk_size.to_string()
        );
        assert!(!s.contains_key("--chunk_size"));
    }
}
