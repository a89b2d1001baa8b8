#![recursion_limit = "512"]
//! End-to-end tests of the command line: they run the built `ferrotune` binary as Kelpie would.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};

fn ferrotune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(args)
        .env_remove("KELPIE_JOB_ID")
        .output()
        .expect("run ferrotune")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `--dry_run` with `args` and returns the printed configuration.
fn dry_run(args: &[&str]) -> Value {
    let mut all = vec!["--dry_run"];
    all.extend_from_slice(args);
    let out = ferrotune(&all);
    assert!(out.status.success(), "dry run failed: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).expect("dry run prints JSON")
}

/// Asserts a usage error: exit code 2 and exactly one line on stderr containing `needle`.
fn assert_usage_error(args: &[&str], needle: &str) {
    let out = ferrotune(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "args {args:?} gave: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err:?}");
    assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
    assert!(out.stdout.is_empty(), "usage error printed to stdout");
}

const RECIPE: &[&str] = &[
    "--model_name",
    "unsloth/llama-3-8b",
    "--dataset",
    "yahma/alpaca-cleaned",
    "--max_seq_length",
    "2048",
    "--load_in_4bit",
    "--r",
    "16",
    "--lora_alpha",
    "16",
    "--lora_dropout",
    "0.05",
    "--bias",
    "none",
    "--use_gradient_checkpointing",
    "unsloth",
    "--per_device_train_batch_size",
    "2",
    "--gradient_accumulation_steps",
    "4",
    "--warmup_steps",
    "5",
    "--max_steps",
    "1200",
    "--learning_rate",
    "2e-4",
    "--logging_steps",
    "10",
    "--optim",
    "adamw_8bit",
    "--weight_decay",
    "0.01",
    "--lr_scheduler_type",
    "linear",
    "--seed",
    "3407",
    "--report_to",
    "none",
    "--output_dir",
    "/opt/checkpoints",
    "--save_model",
    "--save_path",
    "/opt/outputs",
    "--save_method",
    "merged_16bit",
    "--save_strategy",
    "steps",
    "--save_steps",
    "100",
    "--save_total_limit",
    "3",
    "--resume",
];

#[test]
fn kelpie_recipe_arguments_resolve_to_the_same_values() {
    let flags = RECIPE.iter().filter(|a| a.starts_with("--")).count();
    assert_eq!(flags, 28, "the recipe has 28 flags");
    let config = dry_run(RECIPE);
    let expected = json!({
        "model_name": "unsloth/llama-3-8b", "dataset": "yahma/alpaca-cleaned",
        "max_seq_length": 2048, "load_in_4bit": true, "r": 16, "lora_alpha": 16.0,
        "lora_dropout": 0.05, "bias": "none", "use_gradient_checkpointing": "unsloth",
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4,
        "warmup_steps": 5, "max_steps": 1200, "learning_rate": 2e-4, "logging_steps": 10,
        "optim": "adamw_8bit", "weight_decay": 0.01, "lr_scheduler_type": "linear",
        "seed": 3407, "report_to": "none", "output_dir": "/opt/checkpoints",
        "save_model": true, "save_path": "/opt/outputs", "save_method": "merged_16bit",
        "save_strategy": "steps", "save_steps": 100, "save_total_limit": 3, "resume": true,
    });
    for (key, want) in expected.as_object().unwrap() {
        assert_eq!(&config[key], want, "flag --{key}");
    }
}

#[test]
fn defaults_match_unsloth_cli() {
    let config = dry_run(&[]);
    let expected = json!({
        "model_name": "unsloth/llama-3-8b", "max_seq_length": 2048, "dtype": null,
        "load_in_4bit": false, "dataset": "yahma/alpaca-cleaned", "r": 16, "lora_alpha": 16.0,
        "lora_dropout": 0.0, "bias": "none", "use_gradient_checkpointing": "unsloth",
        "random_state": 3407, "use_rslora": false, "loftq_config": null,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 4, "warmup_steps": 5,
        "max_steps": 400, "learning_rate": 2e-4, "optim": "adamw_8bit", "weight_decay": 0.01,
        "lr_scheduler_type": "linear", "seed": 3407, "report_to": "tensorboard",
        "logging_steps": 1, "save_strategy": "steps", "save_steps": 500,
        "save_total_limit": null, "resume": false, "resume_from_checkpoint": null,
        "output_dir": "/opt/checkpoints", "save_model": false, "save_method": "merged_16bit",
        "save_gguf": false, "save_path": "/opt/outputs", "quantization": ["q8_0"],
        "push_model": false, "push_gguf": false, "hub_path": "hf/model", "hub_token": null,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "max_grad_norm": 1.0, "warmup_ratio": 0.0, "packing": false,
        "train_on_completions": false, "chat_template": null, "raw_text_file": null,
        "chunk_size": 2048, "stride": 512, "eval_dataset": null, "val_size": 0.0,
        "per_device_eval_batch_size": 4, "use_dora": false, "formatter": "alpaca",
        "formatter_config": null, "sync": null, "sync_config": null, "log_format": "text",
        "num_train_epochs": null, "device": "auto", "on_bad_row": "fail",
    });
    for (key, want) in expected.as_object().unwrap() {
        assert_eq!(&config[key], want, "default of --{key}");
    }
}

#[test]
fn help_lists_every_flag_in_its_group() {
    let out = ferrotune(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    let groups: &[(&str, &[&str])] = &[
        (
            "Model:",
            &[
                "model_name",
                "max_seq_length",
                "dtype",
                "load_in_4bit",
                "dataset",
            ],
        ),
        (
            "LoRA:",
            &[
                "r",
                "lora_alpha",
                "lora_dropout",
                "bias",
                "use_gradient_checkpointing",
                "random_state",
                "use_rslora",
                "loftq_config",
                "target_modules",
                "use_dora",
            ],
        ),
        (
            "Training:",
            &[
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "warmup_steps",
                "max_steps",
                "learning_rate",
                "optim",
                "weight_decay",
                "lr_scheduler_type",
                "seed",
                "num_train_epochs",
                "max_grad_norm",
                "warmup_ratio",
            ],
        ),
        ("Reporting:", &["report_to", "logging_steps", "log_format"]),
        (
            "Checkpoint & resume:",
            &[
                "save_strategy",
                "save_steps",
                "save_total_limit",
                "resume",
                "resume_from_checkpoint",
            ],
        ),
        (
            "Saving & publishing:",
            &[
                "output_dir",
                "save_model",
                "save_method",
                "save_gguf",
                "save_path",
                "quantization",
                "push_model",
                "push_gguf",
                "hub_path",
                "hub_token",
            ],
        ),
    ];
    for (heading, flags) in groups {
        let start = help
            .find(heading)
            .unwrap_or_else(|| panic!("no {heading} group"));
        // A group runs until the next heading: a line with no indentation ending in ':'.
        let section = &help[start + heading.len()..];
        let end = section
            .lines()
            .skip(1)
            .find(|l| !l.starts_with(' ') && l.ends_with(':'))
            .and_then(|next| section.find(&format!("\n{next}\n")))
            .unwrap_or(section.len());
        let section = &section[..end];
        for flag in *flags {
            let token = format!("--{flag} ");
            let token_eol = format!("--{flag}\n");
            assert!(
                section.contains(&token) || section.contains(&token_eol),
                "--{flag} not under {heading}"
            );
        }
    }
}

#[test]
fn command_line_overrides_config_file_values() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("job.yaml");
    std::fs::write(
        &yaml,
        "model_name: my/model\nr: 8\nload_in_4bit: true\nquantization: [q4_k_m, q5_k_m]\n\
         use_gradient_checkpointing: true\nformatter_config: {text_column: body}\n",
    )
    .unwrap();
    let yaml = yaml.to_str().unwrap();
    let config = dry_run(&["--config", yaml, "--r", "32"]);
    assert_eq!(config["model_name"], "my/model");
    assert_eq!(config["r"], 32, "command line wins over the file");
    assert_eq!(config["load_in_4bit"], true);
    assert_eq!(config["quantization"], json!(["q4_k_m", "q5_k_m"]));
    assert_eq!(config["use_gradient_checkpointing"], "true");
    assert_eq!(config["formatter_config"], r#"{"text_column":"body"}"#);

    let listed = dry_run(&["--config", yaml, "--quantization", "q8_0"]);
    assert_eq!(
        listed["quantization"],
        json!(["q8_0"]),
        "a list flag replaces the file's list"
    );
}

#[test]
fn dry_run_output_round_trips_as_a_json_config() {
    let first = dry_run(RECIPE);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.json");
    let mut map = first.as_object().unwrap().clone();
    map.remove("dry_run");
    map.remove("config");
    std::fs::write(&file, Value::Object(map).to_string()).unwrap();
    let mut second = dry_run(&["--config", file.to_str().unwrap()]);
    second["config"] = first["config"].clone();
    assert_eq!(
        first, second,
        "feeding --dry_run output back as --config changes nothing"
    );
}

#[test]
fn aliases_are_normalised() {
    let config = dry_run(&[
        "--dtype",
        "bf16",
        "--target_modules",
        "q,v",
        "--num_train_epochs",
        "2",
    ]);
    assert_eq!(config["dtype"], "bfloat16");
    assert_eq!(config["target_modules"], json!(["q_proj", "v_proj"]));
    assert_eq!(
        config["max_steps"], -1,
        "epochs given alone take over the step budget"
    );
    assert_eq!(config["num_train_epochs"], 2.0);
    assert_eq!(dry_run(&["--dtype", "None"])["dtype"], Value::Null);
    let both = dry_run(&["--num_train_epochs", "2", "--max_steps", "7"]);
    assert_eq!(
        both["max_steps"], 7,
        "an explicit --max_steps wins, as in transformers"
    );
}

#[test]
fn hub_token_is_never_printed() {
    let secret = "hf_supersecret_token_value";
    let out = ferrotune(&["--dry_run", "--hub_token", secret]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains(secret));
    assert!(text.contains("<redacted>"));

    let run = ferrotune(&["--hub_token", secret, "--log_format", "json"]);
    assert!(!stderr(&run).contains(secret), "token leaked into logs");
}

#[test]
fn kelpie_job_id_is_on_every_log_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args([
            "--log_format",
            "json",
            "--output_dir",
            "/nonexistent/never-written",
        ])
        .env("KELPIE_JOB_ID", "job-1234")
        .output()
        .unwrap();
    let err = stderr(&out);
    let json_lines: Vec<Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(!json_lines.is_empty(), "no JSON log lines in {err}");
    for line in json_lines {
        assert_eq!(
            line["span"]["kelpie_job_id"], "job-1234",
            "line without job id: {line}"
        );
    }
}

#[test]
fn bad_input_is_one_line_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = out_dir.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["--model_nmae", "x"], "--model_nmae"),
        (&["--no_such_flag"], "--no_such_flag"),
        (&["--bias", "some"], "--bias"),
        (&["--optim", "adafactorx"], "--optim"),
        (&["--r", "-4"], "--r"),
        (&["--r", "four"], "--r"),
        (&["--lora_dropout", "1.5"], "--lora_dropout"),
        (&["--learning_rate", "0"], "--learning_rate"),
        (&["--stride", "2048", "--chunk_size", "1024"], "--stride"),
        (
            &["--resume_from_checkpoint", "/no/such/checkpoint-5"],
            "--resume_from_checkpoint",
        ),
        (&["--quantization", "q9_9"], "--quantization"),
        (&["--report_to", "nowhere"], "--report_to"),
        (&["--report_to", "wandb"], "tensorboard"),
        (&["--target_modules", "qq"], "--target_modules"),
        (&["--dtype", "float8"], "--dtype"),
        (&["--formatter", "/no/such/plugin.wasm"], "--formatter"),
        (&["--formatter_config", "{not json"], "--formatter_config"),
        (&["--config", "/no/such/job.yaml"], "--config"),
    ];
    for (args, needle) in cases {
        let mut all = args.to_vec();
        all.extend(["--output_dir", out]);
        assert_usage_error(&all, needle);
        assert!(!Path::new(out).exists(), "{args:?} wrote {out}");
    }
}

#[test]
fn unknown_config_keys_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.yaml");
    std::fs::write(&file, "max_step: 10\n").unwrap();
    assert_usage_error(&["--config", file.to_str().unwrap()], "max_step");
}

#[test]
fn push_flags_without_their_save_fail_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = out_dir.to_str().unwrap();
    for (flag, needs) in [
        ("--push_gguf", "--save_gguf"),
        ("--push_model", "--save_model"),
    ] {
        let run = ferrotune(&[flag, "--output_dir", out, "--save_path", out]);
        assert_eq!(run.status.code(), Some(2));
        let err = stderr(&run);
        assert!(err.contains(flag) && err.contains(needs), "{err}");
        assert!(!out_dir.exists());
    }
}

#[test]
fn features_not_built_fail_loudly_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out = out_dir.to_str().unwrap();
    let flag = "--use_dora";
    let run = ferrotune(&[flag, "--output_dir", out, "--save_path", out]);
    assert_eq!(run.status.code(), Some(2));
    assert!(
        stderr(&run).contains(&format!("{flag} (not built yet")),
        "{}",
        stderr(&run)
    );
    assert!(!out_dir.exists());
}

/// `ferrotune kernels` fills the kernel cache without a GPU (only libnvrtc, which CI installs),
/// for the architecture asked; a second run finds every module there — the same lookup the
/// engine makes at launch, so a container image built this way compiles nothing on a fresh
/// machine.
#[cfg(feature = "cuda")]
#[test]
fn kernels_are_compiled_ahead_of_time_into_the_cache() {
    if !ferrotune_kernels::nvrtc::available() {
        let in_ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
        assert!(!in_ci, "CI=true but libnvrtc was not found (see .ci/run)");
        eprintln!("SKIPPED: libnvrtc not found");
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let run = || {
        let out = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
            .args(["kernels", "--arch", "sm_86"])
            .env("FERROTUNE_CACHE_DIR", cache.path())
            .output()
            .expect("run ferrotune");
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let modules = ferrotune_kernels::sources::ALL.len();
    let first = run();
    assert!(
        first.starts_with(&format!(
            "sm_86: {modules} modules compiled, 0 already cached"
        )),
        "{first}"
    );
    let cubins = std::fs::read_dir(cache.path().join("kernels"))
        .unwrap()
        .filter(|e| {
            let name = e.as_ref().unwrap().file_name();
            name.to_string_lossy().ends_with(".cubin")
        })
        .count();
    assert_eq!(cubins, modules);
    let second = run();
    assert!(
        second.starts_with(&format!(
            "sm_86: 0 modules compiled, {modules} already cached"
        )),
        "{second}"
    );
}

#[test]
fn kernels_arch_must_be_a_supported_gpu_architecture() {
    assert_usage_error(&["kernels", "--arch", "ampere"], "--arch");
    assert_usage_error(&["kernels", "--arch", "sm_75"], "sm_80");
}
