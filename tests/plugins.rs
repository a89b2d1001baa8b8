//! End-to-end tests of the plugin system: the built-in formatters through the wasm host, the
//! sandbox against a hostile plugin, version handling, the compiled-component cache, and a
//! plugin built from the `ferrotune plugin new` scaffold.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ferrotune::cli::choices::OnBadRow;
use ferrotune::data::sample::{Message, Sample};
use ferrotune::plugin::{
    format_rows, format_rows_with, FormatOptions, FormatterPlugin, PluginLimits, PluginRuntime,
};
use serde_json::{json, Value};

/// A runtime with a short deadline and a small memory cap, so the hostile tests are fast.
fn runtime(cache: &Path) -> PluginRuntime {
    let limits = PluginLimits {
        memory_mb: 64,
        timeout: Duration::from_millis(1500),
    };
    PluginRuntime::with_cache_dir(limits, Some(cache.to_path_buf())).unwrap()
}

fn rows(values: &[Value]) -> Vec<String> {
    values.iter().map(Value::to_string).collect()
}

fn format_ok(plugin: &FormatterPlugin, values: &[Value]) -> Vec<Sample> {
    let out = format_rows(plugin, &rows(values), OnBadRow::Fail).unwrap();
    assert_eq!(
        out.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..values.len()).collect::<Vec<_>>()
    );
    out.into_iter().map(|(_, s)| s).collect()
}

fn full_text(sample: &Sample) -> String {
    match sample {
        Sample::Completion { prompt, completion } => format!("{prompt}{completion}"),
        other => panic!("expected a completion sample, got {other:?}"),
    }
}

/// `alpaca_prompt.format(instruction, input, output)` of unsloth-cli.py, the literal verbatim.
fn python_worker(instruction: &str, input: &str, output: &str) -> String {
    let template = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n    ### Instruction:\n    {}\n\n    ### Input:\n    {}\n\n    ### Response:\n    {}";
    let parts: Vec<&str> = template.split("{}").collect();
    format!(
        "{}{instruction}{}{input}{}{output}{}",
        parts[0], parts[1], parts[2], parts[3]
    )
}

#[test]
fn alpaca_is_byte_identical_to_the_python_worker_through_the_host() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(cache.path());
    let alpaca = FormatterPlugin::load(&rt, "alpaca", Value::Null).unwrap();
    let samples = format_ok(
        &alpaca,
        &[
            json!({"instruction": "Give three tips.", "input": "", "output": "1. Eat.\n2. Sleep.\n3. Move."}),
            json!({"instruction": "Translate {}", "input": "Bonjour \"monde\" \u{e9}", "output": "Hello world", "extra": 1}),
        ],
    );
    assert_eq!(
        full_text(&samples[0]),
        python_worker("Give three tips.", "", "1. Eat.\n2. Sleep.\n3. Move.")
    );
    assert_eq!(
        full_text(&samples[1]),
        python_worker("Translate {}", "Bonjour \"monde\" \u{e9}", "Hello world")
    );
    // The completion is exactly the output: --train_on_completions learns the response only.
    assert!(
        matches!(&samples[0], Sample::Completion { completion, .. } if completion == "1. Eat.\n2. Sleep.\n3. Move.")
    );

    let standard = FormatterPlugin::load(&rt, "alpaca", json!({"style": "standard"})).unwrap();
    let samples = format_ok(
        &standard,
        &[
            json!({"instruction": "Add.", "input": "2, 3", "output": "5"}),
            json!({"instruction": "Say hi.", "input": "", "output": "Hi!"}),
        ],
    );
    assert_eq!(full_text(&samples[0]), "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\nAdd.\n\n### Input:\n2, 3\n\n### Response:\n5");
    assert_eq!(full_text(&samples[1]), "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\nHi!");
}

#[test]
fn each_builtin_formats_good_rows_and_names_malformed_ones() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(cache.path());
    let cases: [(&str, Value, Value, Sample, Value, &str); 4] = [
        (
            "alpaca",
            Value::Null,
            json!({"instruction": "i", "input": "", "output": "o"}),
            Sample::Completion {
                prompt: python_worker("i", "", ""),
                completion: "o".into(),
            },
            json!({"instruction": "i", "output": "o"}),
            "missing column \\\"input\\\"",
        ),
        (
            "chat",
            Value::Null,
            json!({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}),
            Sample::Chat {
                messages: vec![
                    Message {
                        role: "user".into(),
                        content: "Hi".into(),
                    },
                    Message {
                        role: "assistant".into(),
                        content: "Yo".into(),
                    },
                ],
            },
            json!({"messages": []}),
            "column \\\"messages\\\" is an empty list",
        ),
        (
            "text",
            json!({"column": "body"}),
            json!({"body": "hello"}),
            Sample::Text {
                text: "hello".into(),
            },
            json!({"body": 7}),
            "column \\\"body\\\" is a number, expected a string",
        ),
        (
            "prompt-completion",
            Value::Null,
            json!({"prompt": "2+2=", "completion": "4"}),
            Sample::Completion {
                prompt: "2+2=".into(),
                completion: "4".into(),
            },
            json!({"prompt": "2+2="}),
            "missing column \\\"completion\\\"",
        ),
    ];
    for (name, config, good, expected, bad, why) in cases {
        let plugin = FormatterPlugin::load(&rt, name, config).unwrap();
        assert_eq!(plugin.name(), name);
        assert_eq!(
            format_ok(&plugin, std::slice::from_ref(&good)),
            vec![expected.clone()],
            "{name}"
        );

        let batch = rows(&[good.clone(), bad.clone(), good.clone()]);
        let err = format_rows(&plugin, &batch, OnBadRow::Fail)
            .unwrap_err()
            .to_string();
        let why = why.replace("\\\"", "\"");
        assert!(
            err.contains(&format!("formatter {name} rejected row 1: {why}")),
            "{name}: {err}"
        );
        assert!(err.contains("--on_bad_row skip"), "{err}");

        let kept = format_rows(&plugin, &batch, OnBadRow::Skip).unwrap();
        assert_eq!(kept, vec![(0, expected.clone()), (2, expected)], "{name}");
    }

    let err = FormatterPlugin::load(&rt, "alpaca", json!({"style": "fancy"}))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("--formatter_config") && err.contains("unknown variant `fancy`"),
        "{err}"
    );
}

fn evil(rt: &PluginRuntime) -> FormatterPlugin {
    FormatterPlugin::load(rt, env!("FERROTUNE_EVIL_PLUGIN"), Value::Null).unwrap()
}

fn act(action: &str) -> Value {
    json!({"do": action})
}

#[test]
fn sandbox_denies_files_sockets_and_env() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(cache.path());
    let plugin = evil(&rt);
    assert_eq!(plugin.name(), "evil.wasm");
    for (action, needle) in [
        ("passwd", "open /etc/passwd"),
        ("socket", "connect 127.0.0.1:9"),
    ] {
        let err = format_rows(&plugin, &rows(&[act(action)]), OnBadRow::Fail)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("formatter evil.wasm rejected row 0") && err.contains(needle),
            "{err}"
        );
        assert!(!err.contains("root:"), "the plugin read /etc/passwd: {err}");
    }
    let samples = format_ok(&plugin, &[act("env"), act("print")]);
    assert_eq!(
        samples,
        vec![
            Sample::Text {
                text: "0 env vars".into()
            },
            Sample::Text {
                text: "printed".into()
            }
        ]
    );
}

#[test]
fn sandbox_stops_runaway_plugins_and_the_host_carries_on() {
    let cache = tempfile::tempdir().unwrap();
    let rt = runtime(cache.path());
    let plugin = evil(&rt);
    let one_worker = FormatOptions {
        batch_size: 8,
        workers: 1,
    };
    for (action, needle) in [
        (
            "alloc",
            "exceeded its memory limit of 64 MiB (--plugin_memory_mb)",
        ),
        (
            "loop",
            "ran past its deadline of 1.5s per call (--plugin_timeout_s)",
        ),
        ("panic", "evil panics on purpose"),
    ] {
        // The bad row sits in the middle of a batch: bisection must name row 2.
        let batch = rows(&[act("ok"), act("ok"), act(action), act("ok")]);
        let err = format_rows_with(&plugin, &batch, OnBadRow::Fail, one_worker)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("formatting row 2 stopped the plugin: plugin evil.wasm"),
            "{action}: {err}"
        );
        assert!(err.contains(needle), "{action}: {err}");
        // The same plugin (fresh instances) formats the next batch.
        assert_eq!(
            format_ok(&plugin, &[act("ok")]),
            vec![Sample::Text { text: "ok".into() }]
        );
    }
    let batch = rows(&[act("ok"), act("panic"), act("ok"), act("ok"), act("panic")]);
    let kept = format_rows_with(&plugin, &batch, OnBadRow::Skip, one_worker).unwrap();
    assert_eq!(
        kept.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        vec![0, 2, 3]
    );
}

#[test]
fn a_newer_world_version_is_refused_naming_both_versions() {
    // A component declaring ferrotune:plugin@0.2.0: the fixture component with its version
    // strings rewritten (same length, so the binary stays valid).
    let wasm = std::fs::read(env!("FERROTUNE_EVIL_PLUGIN")).unwrap();
    let patched = replace_all(
        &wasm,
        b"ferrotune:plugin/format@0.1.0",
        b"ferrotune:plugin/format@0.2.0",
    );
    assert_ne!(patched, wasm);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("future.wasm");
    std::fs::write(&file, patched).unwrap();
    let rt = runtime(dir.path());
    let err = FormatterPlugin::load(&rt, file.to_str().unwrap(), Value::Null)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("future.wasm")
            && err.contains("ferrotune:plugin@0.2.0")
            && err.contains("ferrotune:plugin@0.1.0"),
        "{err}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["plugin", "inspect"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("newer than this ferrotune supports"));
}

fn replace_all(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let mut out = haystack.to_vec();
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn a_second_load_uses_the_compiled_component_cache() {
    let cache = tempfile::tempdir().unwrap();
    let first = runtime(cache.path());
    FormatterPlugin::load(&first, "text", Value::Null).unwrap();
    assert_eq!(first.cache_stats(), (0, 1), "(hits, compiles)");
    // A new runtime (a new process, in effect) finds the compiled component on disk.
    let second = runtime(cache.path());
    let text = FormatterPlugin::load(&second, "text", Value::Null).unwrap();
    assert_eq!(second.cache_stats(), (1, 0), "(hits, compiles)");
    assert_eq!(
        format_ok(&text, &[json!({"text": "t"})]),
        vec![Sample::Text { text: "t".into() }]
    );
}

#[test]
fn inspect_prints_kind_version_and_schema() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["plugin", "inspect", env!("FERROTUNE_EVIL_PLUGIN")])
        .env("FERROTUNE_CACHE_DIR", tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("kind:        formatter"), "{text}");
    assert!(
        text.contains("world:       ferrotune:plugin/formatter@0.1.0"),
        "{text}"
    );
    assert!(text.contains("name:        evil"), "{text}");
}

/// `ferrotune plugin new` → `cargo build --release --target wasm32-wasip2` → format rows.
#[test]
fn a_scaffolded_plugin_builds_and_formats_through_the_host() {
    let work = tempfile::tempdir().unwrap();
    let wasm = support::scaffold::scaffold_and_build("formatter", "qa-fmt", work.path());

    let rt = runtime(work.path());
    let plugin =
        FormatterPlugin::load(&rt, wasm.to_str().unwrap(), json!({"system": "Be brief."})).unwrap();
    assert_eq!(plugin.info().name, "qa-fmt");
    let samples = format_ok(&plugin, &[json!({"question": "2+2?", "answer": "4"})]);
    let expected = Sample::Chat {
        messages: vec![
            Message {
                role: "system".into(),
                content: "Be brief.".into(),
            },
            Message {
                role: "user".into(),
                content: "2+2?".into(),
            },
            Message {
                role: "assistant".into(),
                content: "4".into(),
            },
        ],
    };
    assert_eq!(samples, vec![expected]);
    let err = format_rows(&plugin, &rows(&[json!({"question": "q"})]), OnBadRow::Fail)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("formatter qa_fmt.wasm rejected row 0") && err.contains("answer"),
        "{err}"
    );
}

/// `ferrotune format` prints the training text after formatter, chat template and EOS, with the
/// no-loss part (the prompt, with --train_on_completions) marked ⟦…⟧.
#[test]
fn format_prints_the_training_text_with_the_masked_part_marked() {
    use ferrotune::data::tiny_tokenizer::{train_tiny_tokenizer, write_tokenizer_files, EOS};
    let work = tempfile::tempdir().unwrap();
    let model = work.path().join("model");
    let texts = ["Below is an instruction that describes a task. Say hi. Hi there!"; 4];
    write_tokenizer_files(&model, &train_tiny_tokenizer(&texts, 300).unwrap(), 512).unwrap();
    let data = work.path().join("data.jsonl");
    let row = json!({"instruction": "Say hi.", "input": "", "output": "Hi there!"});
    std::fs::write(&data, format!("{row}\n{row}\n")).unwrap();

    let run = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
            .args(["format", "--model_name"])
            .arg(&model)
            .arg("--dataset")
            .arg(&data)
            .args(["--formatter", "alpaca", "--limit", "1"])
            .args(extra)
            .env("FERROTUNE_CACHE_DIR", work.path().join("cache"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let masked = run(&["--train_on_completions"]);
    assert!(masked.contains("── sample 0 ──"), "{masked}");
    assert!(!masked.contains("── sample 1 ──"), "--limit 1: {masked}");
    // The prompt is masked up to the response; the response and EOS carry the loss.
    let (prompt, learned) = masked.rsplit_once('⟧').unwrap();
    assert!(prompt.contains("### Instruction:\n    Say hi."), "{masked}");
    assert!(
        learned.trim_end().ends_with(&format!("Hi there!{EOS}")),
        "{masked}"
    );
    assert!(!learned.contains("### Response:"), "{masked}");
    // Without --train_on_completions everything but the first token is learned.
    let full = run(&[]);
    let sample = full.split_once("── sample 0 ──").unwrap().1;
    assert_eq!(sample.matches('⟦').count(), 1, "{full}");
    assert!(full.contains("### Response:\n    Hi there!"), "{full}");
}
