//! A GPU that runs out of memory, explained: what did not fit, how much memory there was, and the
//! flags that lower the need — one line in front of the driver's bare
//! `CUDA_ERROR_OUT_OF_MEMORY`, which stays at its end. Everything else passes through unchanged.

use anyhow::Error;
use cudarc::driver::{sys::CUresult, DriverError};

const GIB: f64 = (1u64 << 30) as f64;

/// Whether the driver's out-of-memory error is anywhere in `err`'s chain.
pub fn is_out_of_memory(err: &Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<DriverError>()
            .is_some_and(|e| e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY)
    })
}

/// The model's weights, adapters and optimizer state did not fit while loading.
pub fn loading(err: Error, ordinal: usize, free_at_start: usize, load_in_4bit: bool) -> Error {
    if !is_out_of_memory(&err) {
        return err;
    }
    let hint = if load_in_4bit {
        "even with its projections in 4 bits: use a GPU with more memory or a smaller model"
    } else {
        "--load_in_4bit (QLoRA) keeps the frozen projection weights in 4 bits, a quarter of \
         their bf16 size"
    };
    let free = free_at_start as f64 / GIB;
    err.context(format!(
        "GPU {ordinal} ran out of memory loading the model ({free:.1} GiB were free); {hint}"
    ))
}

/// What the training state held when a batch's buffers did not fit.
pub struct BatchMemory {
    pub batch: usize,
    pub seq: usize,
    /// Bytes free on the device before ferrotune allocated anything.
    pub free_at_start: usize,
    /// Bytes ferrotune's live allocations hold without the batch's buffers, where known.
    pub held: Option<usize>,
    pub checkpointing: bool,
    pub load_in_4bit: bool,
}

/// The activation buffers for one batch shape did not fit beside the model.
pub fn batch(err: Error, m: &BatchMemory) -> Error {
    if !is_out_of_memory(&err) {
        return err;
    }
    let held = match m.held {
        Some(bytes) => format!(
            "the model, adapters and optimizer hold {:.1} of the {:.1} GiB that were free",
            bytes as f64 / GIB,
            m.free_at_start as f64 / GIB
        ),
        None => format!("{:.1} GiB were free", m.free_at_start as f64 / GIB),
    };
    let mut flags = vec![
        "a smaller --per_device_train_batch_size (--per_device_eval_batch_size while evaluating)",
        "a shorter --max_seq_length",
    ];
    if !m.checkpointing {
        flags.push("--use_gradient_checkpointing unsloth");
    }
    if !m.load_in_4bit {
        flags.push("--load_in_4bit");
    }
    err.context(format!(
        "the GPU ran out of memory for the activations of a batch of {} x {} tokens ({held}); \
         try {}",
        m.batch,
        m.seq,
        flags.join(", or ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oom() -> Error {
        // Formatting a DriverError asks the driver for its text, which a machine without
        // CUDA lacks: the tests read only the outermost message.
        Error::new(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY)).context("allocating 2048 MiB")
    }

    fn memory(checkpointing: bool, load_in_4bit: bool) -> BatchMemory {
        BatchMemory {
            batch: 8,
            seq: 4096,
            free_at_start: 23 << 30,
            held: Some(16 << 30),
            checkpointing,
            load_in_4bit,
        }
    }

    #[test]
    fn out_of_memory_is_found_under_any_context() {
        assert!(is_out_of_memory(&oom()));
        assert!(is_out_of_memory(&oom().context("layer 3")));
        let other = Error::new(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE)).context("x");
        assert!(!is_out_of_memory(&other));
        assert!(!is_out_of_memory(&anyhow::anyhow!("out of memory")));
    }

    #[test]
    fn a_batch_that_does_not_fit_names_the_flags_that_are_left() {
        let msg = batch(oom(), &memory(false, false)).to_string();
        assert!(msg.starts_with("the GPU ran out of memory"), "{msg}");
        assert!(msg.contains("a batch of 8 x 4096 tokens"), "{msg}");
        assert!(msg.contains("hold 16.0 of the 23.0 GiB"), "{msg}");
        for flag in [
            "--per_device_train_batch_size",
            "--max_seq_length",
            "--use_gradient_checkpointing unsloth",
            "--load_in_4bit",
        ] {
            assert!(msg.contains(flag), "{flag} missing: {msg}");
        }
        // Flags already in use are not suggested again.
        let msg = batch(oom(), &memory(true, true)).to_string();
        assert!(!msg.contains("--use_gradient_checkpointing"), "{msg}");
        assert!(!msg.contains("--load_in_4bit"), "{msg}");
        assert!(msg.contains("--max_seq_length"), "{msg}");
    }

    #[test]
    fn loading_suggests_4_bit_once() {
        let msg = loading(oom(), 1, 23 << 30, false).to_string();
        assert!(msg.starts_with("GPU 1 ran out of memory loading the model (23.0 GiB were free)"));
        assert!(msg.contains("--load_in_4bit"), "{msg}");
        let msg = loading(oom(), 0, 23 << 30, true).to_string();
        assert!(!msg.contains("--load_in_4bit"), "{msg}");
        assert!(msg.contains("a GPU with more memory"), "{msg}");
    }

    #[test]
    fn other_errors_pass_through_unchanged() {
        let err = batch(anyhow::anyhow!("no such file"), &memory(false, false));
        assert_eq!(err.to_string(), "no such file");
        let err = loading(anyhow::anyhow!("bad header"), 0, 1, false);
        assert_eq!(err.to_string(), "bad header");
    }
}
