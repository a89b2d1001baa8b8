//! The formatter API the data pipeline calls: load a formatter plugin (built-in name or .wasm
//! path) once per job, then format all rows in parallel batches, one fresh Store per worker
//! thread. A row the plugin rejects is an error value; a trap (panic, deadline, memory limit)
//! discards that Store, and the batch is bisected on fresh instances to find the row that
//! causes it. Either follows `--on_bad_row`.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use wasmtime::component::Component;
use wasmtime::{Store, Trap};

use super::bindings::v0_1_0;
use super::builtin;
use super::runtime::PluginRuntime;
use super::sandbox::{self, PluginState};
use super::wasm_err;
use super::world::{self, Kind, World};
use crate::cli::choices::OnBadRow;
use crate::cli::UsageError;
use crate::data::sample::{Message, Sample};

/// What a plugin says about itself (`describe`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginInfo {
    pub name: String,
    pub version: String,
    pub description: String,
    pub config_schema: Option<String>,
}

/// A compiled formatter plugin ready to instantiate (cheap to clone, Send + Sync).
#[derive(Clone)]
pub struct FormatterPlugin {
    inner: Arc<Loaded>,
}

struct Loaded {
    name: Arc<str>,
    runtime: PluginRuntime,
    pre: Pre,
    world: World,
    info: PluginInfo,
    /// `--formatter_config` as JSON text, passed to `configure` of every instance.
    config: String,
}

/// Pre-linked component, one variant per WIT version the host loads.
enum Pre {
    V0_1_0(v0_1_0::FormatterPre<PluginState>),
}

impl FormatterPlugin {
    /// `spec` is the --formatter value (built-in name or .wasm path); `config` the parsed
    /// --formatter_config (Null if none).
    pub fn load(runtime: &PluginRuntime, spec: &str, config: serde_json::Value) -> Result<Self> {
        let (name, wasm) = read_spec(spec)?;
        let (pre, world) = prepare(runtime, &name, &wasm)?;
        let mut loaded = Loaded {
            name,
            runtime: runtime.clone(),
            pre,
            world,
            info: PluginInfo {
                name: String::new(),
                version: String::new(),
                description: String::new(),
                config_schema: None,
            },
            config: config.to_string(),
        };
        // One probe instance: reads `describe` and rejects a bad config before any row.
        let mut probe = Instance::unconfigured(&loaded)?;
        loaded.info = probe.describe()?;
        probe.configure(&loaded.config)?.map_err(|message| {
            UsageError::new(format!(
                "--formatter_config: formatter {} rejected it: {message}",
                loaded.name
            ))
        })?;
        tracing::info!(
            plugin = %loaded.name,
            world = %loaded.world,
            version = %loaded.info.version,
            "formatter plugin loaded"
        );
        Ok(FormatterPlugin {
            inner: Arc::new(loaded),
        })
    }

    /// The name used in logs and errors: the built-in name or the .wasm file name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// What the plugin says about itself.
    pub fn info(&self) -> &PluginInfo {
        &self.inner.info
    }

    /// The plugin's kind and WIT version.
    pub fn world(&self) -> World {
        self.inner.world
    }
}

/// Name and bytes of a built-in (`alpaca`) or a `.wasm` path.
fn read_spec(spec: &str) -> Result<(Arc<str>, Vec<u8>)> {
    if let Some(wasm) = builtin::formatter(spec) {
        return Ok((spec.into(), wasm.to_vec()));
    }
    let path = Path::new(spec);
    let wasm = std::fs::read(path).map_err(|e| {
        UsageError::new(format!(
            "--formatter {spec}: cannot read it ({e}); pass a built-in ({}) or a .wasm component",
            builtin::FORMATTERS.map(|b| b.name).join(", ")
        ))
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string());
    Ok((name.into(), wasm))
}

/// Compiles (or loads from the cache), checks the world and version, and pre-links.
fn prepare(runtime: &PluginRuntime, name: &str, wasm: &[u8]) -> Result<(Pre, World)> {
    let component: Component = runtime.component(name, wasm)?;
    let world = world::detect(runtime.engine(), &component, name)?;
    if world.kind != Kind::Formatter {
        bail!(UsageError::new(format!(
            "--formatter {name}: this is a {} plugin, not a formatter",
            world.kind
        )));
    }
    let pre = runtime
        .formatter_linker()
        .instantiate_pre(&component)
        .map_err(wasm_err)
        .with_context(|| {
            format!("plugin {name} needs an import ferrotune does not give formatters (only WASI without files/network, and ferrotune:plugin/log)")
        })?;
    // Only released versions get past `world::detect`; each has its bindings module.
    let pre = match (
        world.version.major,
        world.version.minor,
        world.version.patch,
    ) {
        (0, 1, 0) => Pre::V0_1_0(v0_1_0::FormatterPre::new(pre).map_err(wasm_err)?),
        _ => unreachable!(
            "world::detect admitted an unsupported version {}",
            world.version
        ),
    };
    Ok((pre, world))
}

/// Describes a component without configuring it (for `ferrotune plugin inspect`).
pub fn describe_component(
    runtime: &PluginRuntime,
    name: &str,
    wasm: &[u8],
) -> Result<(World, PluginInfo)> {
    let (pre, world) = prepare(runtime, name, wasm)?;
    let loaded = Loaded {
        name: name.into(),
        runtime: runtime.clone(),
        pre,
        world,
        info: PluginInfo {
            name: String::new(),
            version: String::new(),
            description: String::new(),
            config_schema: None,
        },
        config: "null".into(),
    };
    let info = Instance::unconfigured(&loaded)?.describe()?;
    Ok((world, info))
}

/// One live instance in its own Store.
struct Instance {
    store: Store<PluginState>,
    bindings: Bound,
    timeout: std::time::Duration,
}

enum Bound {
    V0_1_0(v0_1_0::Formatter),
}

impl Instance {
    fn unconfigured(plugin: &Loaded) -> Result<Self> {
        let mut store = sandbox::new_store(&plugin.runtime, plugin.name.clone());
        let bindings = match &plugin.pre {
            Pre::V0_1_0(pre) => Bound::V0_1_0(
                pre.instantiate(&mut store)
                    .map_err(|e| trap_error(&store, e, plugin.runtime.limits().timeout))
                    .with_context(|| format!("plugin {}: instantiation failed", plugin.name))?,
            ),
        };
        Ok(Instance {
            store,
            bindings,
            timeout: plugin.runtime.limits().timeout,
        })
    }

    fn configured(plugin: &Loaded) -> Result<Self> {
        let mut instance = Self::unconfigured(plugin)?;
        instance
            .configure(&plugin.config)?
            .map_err(|m| anyhow!("formatter {} rejected its config: {m}", plugin.name))?;
        Ok(instance)
    }

    fn describe(&mut self) -> Result<PluginInfo> {
        sandbox::arm_deadline(&mut self.store, self.timeout);
        let result = match &self.bindings {
            Bound::V0_1_0(b) => b.ferrotune_plugin_format().call_describe(&mut self.store),
        };
        let info = result.map_err(|e| trap_error(&self.store, e, self.timeout))?;
        Ok(PluginInfo {
            name: info.name,
            version: info.version,
            description: info.description,
            config_schema: info.config_schema,
        })
    }

    /// Outer error: a trap. Inner error: the plugin's message about the config.
    fn configure(&mut self, config: &str) -> Result<std::result::Result<(), String>> {
        sandbox::arm_deadline(&mut self.store, self.timeout);
        let result = match &self.bindings {
            Bound::V0_1_0(b) => b
                .ferrotune_plugin_format()
                .call_configure(&mut self.store, config),
        };
        result.map_err(|e| trap_error(&self.store, e, self.timeout))
    }

    /// One result per row; `Err` is a trap (the instance must then be discarded).
    fn format_batch(
        &mut self,
        rows: &[String],
    ) -> std::result::Result<Vec<std::result::Result<Sample, String>>, String> {
        sandbox::arm_deadline(&mut self.store, self.timeout);
        let result = match &self.bindings {
            Bound::V0_1_0(b) => b
                .ferrotune_plugin_format()
                .call_format_batch(&mut self.store, rows)
                .map(|out| {
                    out.into_iter()
                        .map(|r| r.map(from_v0_1_0))
                        .collect::<Vec<_>>()
                }),
        };
        let out = result.map_err(|e| trap_error(&self.store, e, self.timeout).to_string())?;
        if out.len() != rows.len() {
            return Err(format!(
                "returned {} results for a batch of {} rows (a broken plugin: the ABI is one result per row)",
                out.len(),
                rows.len()
            ));
        }
        Ok(out)
    }
}

fn from_v0_1_0(sample: v0_1_0::ferrotune::plugin::types::Sample) -> Sample {
    use v0_1_0::ferrotune::plugin::types::Sample as Wit;
    match sample {
        Wit::Text(text) => Sample::Text { text },
        Wit::Completion(pc) => Sample::Completion {
            prompt: pc.prompt,
            completion: pc.completion,
        },
        Wit::Chat(messages) => Sample::Chat {
            messages: messages
                .into_iter()
                .map(|m| Message {
                    role: m.role,
                    content: m.content,
                })
                .collect(),
        },
    }
}

/// Turns a failed call into one line: why it stopped (deadline, memory limit, trap) plus the
/// last lines the plugin wrote to stderr (a panic message, typically).
pub(super) fn trap_error(
    store: &Store<PluginState>,
    err: wasmtime::Error,
    timeout: std::time::Duration,
) -> anyhow::Error {
    let state = store.data();
    let why = if state.limiter.exceeded {
        format!(
            "exceeded its memory limit of {} MiB (--plugin_memory_mb)",
            state.limiter.limit_mb()
        )
    } else if err.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
        format!(
            "ran past its deadline of {}s per call (--plugin_timeout_s)",
            timeout.as_secs_f64()
        )
    } else if let Some(trap) = err.downcast_ref::<Trap>() {
        format!("trapped ({trap})")
    } else {
        format!("failed ({})", err.root_cause())
    };
    let tail = state.stderr.take_tail();
    let stderr = if tail.is_empty() {
        String::new()
    } else {
        format!("; its stderr ended with: {}", tail.join(" | "))
    };
    anyhow!("plugin {} {why}{stderr}", state.plugin)
}

/// Tuning of [`format_rows_with`].
#[derive(Debug, Clone, Copy)]
pub struct FormatOptions {
    /// Rows per `format-batch` call.
    pub batch_size: usize,
    /// Worker threads, each with its own instance.
    pub workers: usize,
}

impl Default for FormatOptions {
    fn default() -> Self {
        FormatOptions {
            batch_size: 256,
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// What became of one row.
enum Outcome {
    Sample(Sample),
    /// The plugin returned an error value for the row.
    Rejected(String),
    /// Formatting the row alone trapped.
    Trapped(String),
}

impl Outcome {
    fn is_bad(&self) -> bool {
        !matches!(self, Outcome::Sample(_))
    }
}

/// Formats all rows (JSON object text per row) in order, in parallel batches; returns
/// (row_index, Sample) for each row kept. Row errors and traps follow `on_bad_row` (fail →
/// Err naming plugin, row index and message; skip → warn with counts).
pub fn format_rows(
    plugin: &FormatterPlugin,
    rows: &[String],
    on_bad_row: OnBadRow,
) -> Result<Vec<(usize, Sample)>> {
    format_rows_with(plugin, rows, on_bad_row, FormatOptions::default())
}

/// [`format_rows`] with explicit batch size and worker count.
pub fn format_rows_with(
    plugin: &FormatterPlugin,
    rows: &[String],
    on_bad_row: OnBadRow,
    options: FormatOptions,
) -> Result<Vec<(usize, Sample)>> {
    let batch_size = options.batch_size.max(1);
    let batches = rows.len().div_ceil(batch_size);
    let workers = options.workers.clamp(1, batches.max(1));
    let fail_fast = on_bad_row == OnBadRow::Fail;
    let next = AtomicUsize::new(0);
    // With --on_bad_row fail, no batch after the first bad one is started.
    let first_bad = AtomicUsize::new(usize::MAX);
    let done: Mutex<Vec<(usize, Vec<Outcome>)>> = Mutex::new(Vec::with_capacity(batches));

    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    let mut instance: Option<Instance> = None;
                    loop {
                        let b = next.fetch_add(1, Ordering::Relaxed);
                        if b >= batches || b > first_bad.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let range = b * batch_size..((b + 1) * batch_size).min(rows.len());
                        let mut out = Vec::with_capacity(range.len());
                        run_range(
                            &plugin.inner,
                            &mut instance,
                            &rows[range],
                            fail_fast,
                            &mut out,
                        )?;
                        if fail_fast && out.iter().any(Outcome::is_bad) {
                            first_bad.fetch_min(b, Ordering::Relaxed);
                        }
                        done.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((b, out));
                    }
                })
            })
            .collect();
        for handle in handles {
            handle
                .join()
                .map_err(|_| anyhow!("a formatter worker thread panicked"))??;
        }
        Ok(())
    })?;

    let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
    done.sort_unstable_by_key(|(b, _)| *b);
    collect(plugin.name(), done, batch_size, rows.len(), on_bad_row)
}

/// Formats `rows` on `instance` (made on demand). On a trap the instance is dropped and the
/// range is split in halves, each retried on a fresh instance, down to the single row that
/// traps. With `fail_fast`, stops after the first bad row.
fn run_range(
    plugin: &Loaded,
    instance: &mut Option<Instance>,
    rows: &[String],
    fail_fast: bool,
    out: &mut Vec<Outcome>,
) -> Result<()> {
    let live = match instance {
        Some(live) => live,
        None => instance.insert(Instance::configured(plugin)?),
    };
    match live.format_batch(rows) {
        Ok(results) => {
            out.extend(results.into_iter().map(|r| match r {
                Ok(sample) => Outcome::Sample(sample),
                Err(message) => Outcome::Rejected(message),
            }));
            Ok(())
        }
        Err(trap) => {
            *instance = None;
            if rows.len() == 1 {
                out.push(Outcome::Trapped(trap));
                return Ok(());
            }
            tracing::debug!(plugin = %plugin.name, rows = rows.len(), "batch trapped; bisecting: {trap}");
            let (left, right) = rows.split_at(rows.len() / 2);
            let before = out.len();
            run_range(plugin, instance, left, fail_fast, out)?;
            if fail_fast && out[before..].iter().any(Outcome::is_bad) {
                return Ok(());
            }
            run_range(plugin, instance, right, fail_fast, out)
        }
    }
}

/// Bad rows logged one by one with --on_bad_row skip (then only counted).
const LOGGED_BAD_ROWS: usize = 5;

fn collect(
    plugin: &str,
    done: Vec<(usize, Vec<Outcome>)>,
    batch_size: usize,
    total: usize,
    on_bad_row: OnBadRow,
) -> Result<Vec<(usize, Sample)>> {
    let mut kept = Vec::with_capacity(total);
    let (mut rejected, mut trapped) = (0usize, 0usize);
    for (b, outcomes) in done {
        for (offset, outcome) in outcomes.into_iter().enumerate() {
            let row = b * batch_size + offset;
            let problem = match outcome {
                Outcome::Sample(sample) => {
                    kept.push((row, sample));
                    continue;
                }
                Outcome::Rejected(message) => {
                    rejected += 1;
                    format!("formatter {plugin} rejected row {row}: {message}")
                }
                Outcome::Trapped(message) => {
                    trapped += 1;
                    format!("formatting row {row} stopped the plugin: {message}")
                }
            };
            match on_bad_row {
                OnBadRow::Fail => {
                    bail!("{problem} (rows count from 0; fix the row or pass --on_bad_row skip)")
                }
                OnBadRow::Skip if rejected + trapped <= LOGGED_BAD_ROWS => {
                    tracing::warn!("skipping: {problem}")
                }
                OnBadRow::Skip => {}
            }
        }
    }
    if rejected + trapped > 0 {
        tracing::warn!(
            plugin,
            rejected,
            trapped,
            kept = kept.len(),
            total,
            "formatter skipped {} of {total} rows (--on_bad_row skip)",
            rejected + trapped
        );
    }
    Ok(kept)
}
