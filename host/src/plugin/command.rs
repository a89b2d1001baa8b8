//! The `ferrotune plugin` subcommands and `ferrotune format`.

use anyhow::Result;

use super::formatter::FormatterPlugin;
use super::runtime::{PluginLimits, PluginRuntime};
use crate::cli::args::{FormatArgs, PluginCommand};
use crate::cli::UsageError;

pub fn run(command: PluginCommand) -> Result<()> {
    match command {
        PluginCommand::New(args) => {
            let created = super::scaffold::new_plugin(
                args.kind,
                &args.name,
                &args.dir,
                args.sdk_path.as_deref(),
            )?;
            let dir = created.dir.display();
            let wasm = format!(
                "target/wasm32-wasip2/release/{}.wasm",
                args.name.replace('-', "_")
            );
            println!(
                "created {dir}\nbuild it:  cd {dir} && cargo build --release --target wasm32-wasip2\nthen:      ferrotune ... {}",
                created.run_flags.replace("{wasm}", &wasm)
            );
            Ok(())
        }
        PluginCommand::Inspect(args) => {
            let runtime = PluginRuntime::new(PluginLimits::default())?;
            print!("{}", super::inspect::inspect(&runtime, &args.file)?);
            Ok(())
        }
    }
}

/// `ferrotune format`: the first `--limit` samples after formatter, chat template, EOS and
/// truncation, with the no-loss parts marked, so plugin authors see what the model will learn.
pub fn format(args: FormatArgs) -> Result<()> {
    let FormatArgs { job, limit } = args;
    // `--config` is expanded for the training command line only; refuse rather than ignore it.
    if job.run.config.is_some() || job.run.dry_run {
        return Err(UsageError::new(
            "ferrotune format: --config and --dry_run are training-only; pass the flags directly",
        )
        .into());
    }
    let job = crate::job::resolve(job, |_| false)?;
    // A directory: GGUF files are dequantised into one (with their tokenizer) on the way.
    let model = crate::model::resolve::resolve_model(&job.model.model_name)?;
    let tokenizer = crate::data::TokenizerInfo::load(&model)?;
    let runtime = PluginRuntime::new(PluginLimits::from_job(&job))?;
    let config = match &job.plugins.formatter_config {
        Some(text) => crate::job::json_or_file("--formatter_config", text)?,
        None => serde_json::Value::Null,
    };
    let plugin = FormatterPlugin::load(&runtime, &job.plugins.formatter, config)?;
    let rows = crate::data::PluginRows {
        plugin: &plugin,
        on_bad_row: job.plugins.on_bad_row,
    };
    let samples = crate::data::preview(&job, &tokenizer, &rows, limit)?;
    println!(
        "# {} sample(s) from {} via formatter {}; ⟦…⟧ marks text that carries no loss",
        samples.len(),
        job.model.dataset,
        plugin.name()
    );
    for (i, text) in samples.iter().enumerate() {
        println!("── sample {i} ──\n{text}");
    }
    Ok(())
}
