//! A tokenized sample as text with the tokens that carry no loss marked, so formatter authors
//! (`ferrotune format`) see exactly what the model will learn.

use anyhow::Result;

use super::encode::TokenizedSample;
use super::tokenize::TokenizerInfo;

/// Opens a run of tokens that carry no loss in [`render_for_display`].
pub const MASK_OPEN: &str = "⟦";
/// Closes a run of tokens that carry no loss.
pub const MASK_CLOSE: &str = "⟧";

/// The sample's text in runs of consecutive tokens with the same loss flag: `(text, trainable)`.
/// Each run is decoded on its own (special tokens shown), so a character split across a
/// boundary may print as U+FFFD.
pub fn display_runs(
    sample: &TokenizedSample,
    tokenizer: &TokenizerInfo,
) -> Result<Vec<(String, bool)>> {
    let mut runs = Vec::new();
    let mut start = 0;
    let n = sample.len();
    for i in 1..=n {
        if i == n || sample.trainable[i] != sample.trainable[start] {
            let text = tokenizer.decode(&sample.input_ids[start..i])?;
            runs.push((text, sample.trainable[start]));
            start = i;
        }
    }
    Ok(runs)
}

/// The sample's text with every run that carries no loss wrapped in `⟦…⟧` (the first token is
/// always inside: nothing predicts it).
pub fn render_for_display(sample: &TokenizedSample, tokenizer: &TokenizerInfo) -> Result<String> {
    let mut out = String::new();
    for (text, trainable) in display_runs(sample, tokenizer)? {
        if trainable {
            out.push_str(&text);
        } else {
            out.push_str(MASK_OPEN);
            out.push_str(&text);
            out.push_str(MASK_CLOSE);
        }
    }
    Ok(out)
}
