//! `--raw_text_file` (and `.txt`/`.md` datasets): a document tokenized whole (no BOS) and cut into
//! windows of `--chunk_size` tokens that overlap by `--stride`, as the recipe's worker does with
//! unsloth's `RawTextDataLoader`:
//!
//! * a document of at most `chunk_size` tokens is one window;
//! * otherwise windows start every `chunk_size - stride` tokens, and the last one ends at the
//!   document's end (it may be shorter);
//! * EOS is appended to every full window and to the last one — which, since only the last
//!   window can be short, is every window;
//! * every token is learned (labels = input ids).
//!
//! Windows then go through the same `max_seq_length` truncation as every sample (as the worker's
//! SFTTrainer truncates them), so with `chunk_size == max_seq_length` the EOS of full windows is
//! cut; use `--chunk_size` below `--max_seq_length` to keep it.

use anyhow::{bail, Result};

use super::encode::TokenizedSample;
use super::tokenize::TokenizerInfo;

/// Token windows of `tokens` (see the module docs).
pub fn windows(
    tokens: &[u32],
    chunk_size: usize,
    stride: usize,
    eos: Option<u32>,
) -> Vec<Vec<u32>> {
    assert!(
        stride < chunk_size,
        "stride must be smaller than chunk_size"
    );
    let finish = |mut w: Vec<u32>| {
        w.extend(eos);
        w
    };
    if tokens.len() <= chunk_size {
        return vec![finish(tokens.to_vec())];
    }
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let end = (start + chunk_size).min(tokens.len());
        let window = tokens[start..end].to_vec();
        let last = end == tokens.len();
        out.push(if last || window.len() == chunk_size {
            finish(window)
        } else {
            window
        });
        if last {
            return out;
        }
        start += chunk_size - stride;
    }
}

/// Windows of one document as fully trainable samples; `truncated` counts windows cut by
/// `max_seq_length`.
pub fn document_samples(
    text: &str,
    tokenizer: &TokenizerInfo,
    chunk_size: usize,
    stride: usize,
    max_seq_length: usize,
) -> Result<(Vec<TokenizedSample>, usize)> {
    if text.trim().is_empty() {
        bail!("empty or whitespace only");
    }
    if stride >= chunk_size {
        bail!("--stride ({stride}) must be smaller than --chunk_size ({chunk_size})");
    }
    let tokens = tokenizer.encode(text, false)?.ids;
    let eos = tokenizer.eos.as_ref().map(|t| t.id);
    let mut truncated = 0;
    let samples = windows(&tokens, chunk_size, stride, eos)
        .into_iter()
        .map(|mut ids| {
            if ids.len() > max_seq_length {
                ids.truncate(max_seq_length);
                truncated += 1;
            }
            let mut trainable = vec![true; ids.len()];
            if let Some(first) = trainable.first_mut() {
                *first = false;
            }
            TokenizedSample {
                input_ids: ids,
                trainable,
            }
        })
        .collect();
    Ok((samples, truncated))
}

#[cfg(test)]
mod tests {
    use super::windows;

    const EOS: u32 = 99;

    fn seq(n: u32) -> Vec<u32> {
        (0..n).collect()
    }

    #[test]
    fn short_document_is_one_window_with_eos() {
        assert_eq!(windows(&seq(3), 4, 1, Some(EOS)), vec![vec![0, 1, 2, EOS]]);
        assert_eq!(
            windows(&seq(4), 4, 1, Some(EOS)),
            vec![vec![0, 1, 2, 3, EOS]]
        );
    }

    #[test]
    fn windows_step_by_chunk_minus_stride_and_end_at_the_document_end() {
        // 10 tokens, chunk 4, stride 1 → starts 0, 3, 6; the window at 6 reaches the end.
        assert_eq!(
            windows(&seq(10), 4, 1, Some(EOS)),
            vec![
                vec![0, 1, 2, 3, EOS],
                vec![3, 4, 5, 6, EOS],
                vec![6, 7, 8, 9, EOS],
            ]
        );
        // 11 tokens: starts 0, 3, 6, 9; the last window is short and still gets EOS.
        assert_eq!(
            windows(&seq(11), 4, 1, Some(EOS)),
            vec![
                vec![0, 1, 2, 3, EOS],
                vec![3, 4, 5, 6, EOS],
                vec![6, 7, 8, 9, EOS],
                vec![9, 10, EOS],
            ]
        );
    }

    #[test]
    fn zero_stride_gives_disjoint_windows() {
        assert_eq!(
            windows(&seq(5), 2, 0, Some(EOS)),
            vec![vec![0, 1, EOS], vec![2, 3, EOS], vec![4, EOS]]
        );
    }

    #[test]
    fn no_eos_token_means_no_eos() {
        assert_eq!(
            windows(&seq(5), 3, 1, None),
            vec![vec![0, 1, 2], vec![2, 3, 4]]
        );
    }
}
