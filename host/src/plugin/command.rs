//! The `ferrotune plugin` subcommands.

use anyhow::Result;

use super::runtime::{PluginLimits, PluginRuntime};
use crate::cli::args::PluginCommand;
use crate::cli::choices::{LogFormat, PluginKind};
use crate::cli::UsageError;

pub fn run(command: PluginCommand) -> Result<()> {
    crate::logging::init(LogFormat::Text);
    match command {
        PluginCommand::New(args) => {
            if args.kind != PluginKind::Formatter {
                return Err(UsageError::new(format!(
                    "plugin new --kind {}: only formatter plugins can be scaffolded so far \
                     (the {} world's SDK is not built yet: issue \"Storage backends, sync plugins\" / \"Export and publish\")",
                    args.kind, args.kind
                ))
                .into());
            }
            let dir =
                super::scaffold::new_formatter(&args.name, &args.dir, args.sdk_path.as_deref())?;
            println!(
                "created {}\nbuild it:  cd {} && cargo build --release --target wasm32-wasip2\nthen:      ferrotune --formatter target/wasm32-wasip2/release/{}.wasm ...",
                dir.display(),
                dir.display(),
                args.name.replace('-', "_")
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
