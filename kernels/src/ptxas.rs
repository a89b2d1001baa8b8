//! Reads ptxas's resource report (`-Xptxas -v`) out of an NVRTC program log.
//!
//! The report looks like
//! ```text
//! ptxas info    : Compiling entry function 'rmsnorm_fwd' for 'sm_90a'
//! ptxas info    : Function properties for rmsnorm_fwd
//! ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
//! ptxas info    : Used 30 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]
//! ```
//! "Function properties" blocks also appear for non-inlined device functions.

/// Resources of one function as ptxas reported them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunctionResources {
    pub name: String,
    /// None for device functions (ptxas prints register counts for entry functions only).
    pub registers: Option<u32>,
    pub stack_frame_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

/// Every function the log reports, in order.
pub fn parse(log: &str) -> Vec<FunctionResources> {
    let mut out: Vec<FunctionResources> = Vec::new();
    let mut current_entry: Option<String> = None;
    for line in log.lines() {
        let Some(body) = line.strip_prefix("ptxas") else {
            continue;
        };
        let body = body.trim_start();
        if let Some(rest) = body.strip_prefix("info") {
            let rest = rest.trim_start().trim_start_matches(':').trim();
            if let Some(r) = rest.strip_prefix("Compiling entry function '") {
                current_entry = r.split('\'').next().map(str::to_string);
            } else if let Some(name) = rest.strip_prefix("Function properties for ") {
                out.push(FunctionResources {
                    name: name.trim().to_string(),
                    ..Default::default()
                });
            } else if let Some(r) = rest.strip_prefix("Used ") {
                let regs = r.split_whitespace().next().and_then(|n| n.parse().ok());
                if let (Some(entry), Some(regs)) = (&current_entry, regs) {
                    if let Some(f) = out.iter_mut().rev().find(|f| &f.name == entry) {
                        f.registers = Some(regs);
                    }
                }
            }
        } else if let Some(rest) = body.strip_prefix('.') {
            // "N bytes stack frame, S bytes spill stores, L bytes spill loads"
            if let Some(f) = out.last_mut() {
                for part in rest.split(',') {
                    let mut words = part.split_whitespace();
                    let n: u32 = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                    let what: Vec<&str> = words.collect();
                    match what.as_slice() {
                        ["bytes", "stack", "frame"] => f.stack_frame_bytes = n,
                        ["bytes", "spill", "stores"] => f.spill_store_bytes = n,
                        ["bytes", "spill", "loads"] => f.spill_load_bytes = n,
                        _ => {}
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
ptxas         .     256 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers, 256 bytes cumulative stack size
ptxas info    : Function properties for __internal_trig_reduction_slowpathd
ptxas         .     40 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'j' for 'sm_90a'
ptxas info    : Function properties for j
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 1 barriers, 128 bytes smem
ptxas info    : Compile time = 61.751 ms
";

    #[test]
    fn reads_every_function_with_registers_stack_and_spills() {
        let f = parse(LOG);
        assert_eq!(f.len(), 3);
        assert_eq!(
            f[0],
            FunctionResources {
                name: "k".into(),
                registers: Some(32),
                stack_frame_bytes: 256,
                spill_store_bytes: 8,
                spill_load_bytes: 4
            }
        );
        assert_eq!(f[1].name, "__internal_trig_reduction_slowpathd");
        assert_eq!(f[1].registers, None);
        assert_eq!(f[1].stack_frame_bytes, 40);
        assert_eq!(f[2].registers, Some(12));
        assert_eq!(f[2].spill_store_bytes, 0);
        assert!(parse("").is_empty());
    }
}
