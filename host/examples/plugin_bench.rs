//! Benchmark (not a test): format N alpaca rows from a JSONL file with the built-in `alpaca`
//! plugin, per batch size, end to end (read + split the file, format, collect) and for the
//! plugin calls alone. Numbers go to docs/plugins.md.
//!
//! cargo run -p ferrotune --example plugin_bench -- [ROWS] [BATCH_SIZES]
//! e.g. `-- 1000000 1,64,1024`

use std::io::{BufRead, BufWriter, Write};
use std::time::Instant;

use ferrotune::cli::choices::OnBadRow;
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

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("alpaca.jsonl");
    write_dataset(&file, rows)?;
    let bytes = std::fs::metadata(&file)?.len();
    println!("{rows} rows, {:.1} MB of JSONL", bytes as f64 / 1e6);

    let runtime = PluginRuntime::new(PluginLimits::default())?;
    let plugin = FormatterPlugin::load(&runtime, "alpaca", serde_json::Value::Null)?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("workers: {workers}");
    println!("| batch size | end to end rows/s | plugin calls rows/s |");
    println!("|---:|---:|---:|");
    for batch_size in batch_sizes {
        let start = Instant::now();
        let lines: Vec<String> = std::io::BufReader::new(std::fs::File::open(&file)?)
            .lines()
            .collect::<Result<_, _>>()?;
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
        assert_eq!(samples.len(), rows);
        println!(
            "| {batch_size} | {:.0} | {:.0} |",
            rows as f64 / total_secs,
            rows as f64 / plugin_secs
        );
    }
    Ok(())
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
