//! Benchmark (not a test): format N alpaca rows from a JSONL file with the built-in `alpaca`
//! plugin, per batch size, end to end (read the file with the pipeline's JSONL reader, format,
//! collect) and for the plugin calls alone. Numbers go to docs/plugins.md.
//!
//! cargo run -p ferrotune --example plugin_bench -- [ROWS] [BATCH_SIZES] [FORMATTER]
//! e.g. `-- 1000000 1,64,1024` (FORMATTER: a built-in name, default alpaca, or a .wasm path)

use std::io::{BufWriter, Write};
use std::time::Instant;

use ferrotune::cli::choices::OnBadRow;
use ferrotune::data::source::files::{read_rows, FileKind};
use ferrotune::plugin::{
    format_rows_with, FormatOptions, FormatterPlugin, PluginLimits, PluginRuntime,
};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let rows: usize = args.next().map_or(Ok(1_000_000), |a| a.parse())?;
    let batch_sizes: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "1,64,1024".into())
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let formatter = args.next().unwrap_or_else(|| "alpaca".into());

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("alpaca.jsonl");
    write_dataset(&file, rows)?;
    let bytes = std::fs::metadata(&file)?.len();
    println!("{rows} rows, {:.1} MB of JSONL", bytes as f64 / 1e6);

    let runtime = PluginRuntime::new(PluginLimits::default())?;
    let plugin = FormatterPlugin::load(&runtime, &formatter, serde_json::Value::Null)?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("workers: {workers}");
    println!(
        "| batch size | end to end rows/s | plugin calls rows/s | read s | format s | CPU s | rows per CPU s |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for batch_size in batch_sizes {
        let cpu_start = cpu_seconds();
        let start = Instant::now();
        // The pipeline's own JSONL reader (lines checked to be JSON objects).
        let lines = read_rows(&file, FileKind::JsonLines)?;
        let plugin_start = Instant::now();
        let samples = format_rows_with(
            &plugin,
            &lines,
            OnBadRow::Fail,
            FormatOptions {
                batch_size,
                workers,
            },
        )?;
        let plugin_secs = plugin_start.elapsed().as_secs_f64();
        let total_secs = start.elapsed().as_secs_f64();
        // CPU time of every thread: on a shared machine wall time also counts other people's
        // work, CPU time only ours.
        let cpu = cpu_seconds() - cpu_start;
        assert_eq!(samples.len(), rows);
        println!(
            "| {batch_size} | {:.0} | {:.0} | {:.2} | {:.2} | {cpu:.2} | {:.0} |",
            rows as f64 / total_secs,
            rows as f64 / plugin_secs,
            total_secs - plugin_secs,
            plugin_secs,
            rows as f64 / cpu
        );
    }
    Ok(())
}

/// User + system CPU seconds of this process, all threads (from /proc/self/stat, in ticks of
/// 1/100 s, the kernel's USER_HZ on Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

/// Rows shaped like yahma/alpaca-cleaned (about 60% without input; a few hundred bytes each).
fn write_dataset(path: &std::path::Path, rows: usize) -> anyhow::Result<()> {
    let mut out = BufWriter::new(std::fs::File::create(path)?);
    for i in 0..rows {
        let input = if i % 5 < 3 {
            String::new()
        } else {
            format!("The numbers are {i} and {}.", i * 7 % 101)
        };
        let row = serde_json::json!({
            "instruction": format!("Give three tips for staying healthy, variant {i}."),
            "input": input,
            "output": format!("1. Eat a balanced and nutritious diet: make sure your meals include a variety of fruits and vegetables, lean protein, whole grains, and healthy fats ({i}).\n2. Engage in regular physical activity.\n3. Get enough sleep and maintain a consistent sleep schedule."),
        });
        writeln!(out, "{row}")?;
    }
    out.flush()?;
    Ok(())
}
