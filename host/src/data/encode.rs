//! One [`Sample`] → token ids plus a per-token loss mask.
//!
//! The sample becomes one string (chat template applied, EOS appended where it is missing) and a
//! set of byte spans that carry loss; the string is tokenized once and a token is trainable when
//! its byte range overlaps a trainable span. Tokenizing once (rather than prompt and completion
//! separately) gives exactly the ids the model sees, and the overlap rule means a token that
//! straddles the prompt/answer boundary is learned, since the model must produce it.
//!
//! What is appended and masked follows the recipe's Python worker (TRL's SFTTrainer):
//! text and prompt+completion get the EOS token text unless they already end with it, and are
//! tokenized with the tokenizer's special tokens (BOS); a chat is rendered by the template, which
//! writes its own BOS, and is tokenized without adding special tokens.

use std::ops::Range;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::sample::{Message, Sample};
use super::template::ChatTemplate;
use super::tokenize::{TokenizerInfo, Tokens};

/// A tokenized training example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizedSample {
    pub input_ids: Vec<u32>,
    /// `trainable[i]`: token `i` is a loss target (predicted at position `i - 1`). Always false
    /// for the first token, which nothing predicts.
    pub trainable: Vec<bool>,
}

impl TokenizedSample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// Tokens that carry loss.
    pub fn trainable_tokens(&self) -> usize {
        self.trainable.iter().filter(|&&t| t).count()
    }
}

/// What [`Encoder::encode`] made of a sample.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub sample: TokenizedSample,
    /// The sample was longer than `max_seq_length` and lost its tail.
    pub truncated: bool,
    /// Assistant turns that the prefix renders could not locate exactly (template that rewrites
    /// earlier turns); their content was found by search and only it is trainable.
    pub approximate_spans: usize,
}

/// Settings from the job that shape encoding.
#[derive(Debug, Clone, Copy)]
pub struct EncodeOptions {
    pub max_seq_length: usize,
    pub train_on_completions: bool,
}

/// Turns samples into tokens with the model's tokenizer and chat template.
pub struct Encoder<'a> {
    pub tokenizer: &'a TokenizerInfo,
    pub template: Option<&'a ChatTemplate>,
    pub options: EncodeOptions,
}

/// The string to tokenize and the byte ranges of it that carry loss.
struct Layout {
    text: String,
    trainable: Vec<Range<usize>>,
    add_special_tokens: bool,
    approximate_spans: usize,
}

impl Encoder<'_> {
    pub fn encode(&self, sample: &Sample) -> Result<Encoded> {
        let layout = self.layout(sample)?;
        let tokens = self
            .tokenizer
            .encode(&layout.text, layout.add_special_tokens)?;
        let tokens = self.drop_doubled_specials(tokens);
        let mut trainable: Vec<bool> = tokens
            .offsets
            .iter()
            .map(|&(start, end)| {
                end > start
                    && layout
                        .trainable
                        .iter()
                        .any(|s| start < s.end && end > s.start)
            })
            .collect();
        let mut input_ids = tokens.ids;
        let truncated = input_ids.len() > self.options.max_seq_length;
        input_ids.truncate(self.options.max_seq_length);
        trainable.truncate(self.options.max_seq_length);
        if let Some(first) = trainable.first_mut() {
            *first = false;
        }
        Ok(Encoded {
            sample: TokenizedSample {
                input_ids,
                trainable,
            },
            truncated,
            approximate_spans: layout.approximate_spans,
        })
    }

    /// The full training text of `sample` (what `ferrotune format` shows before tokenizing).
    pub fn text_of(&self, sample: &Sample) -> Result<String> {
        Ok(self.layout(sample)?.text)
    }

    // Span lists often hold a single span; `vec![a..b]` is meant literally here.
    #[allow(clippy::single_range_in_vec_init)]
    fn layout(&self, sample: &Sample) -> Result<Layout> {
        let all = |text: &str| vec![0..text.len()];
        Ok(match sample {
            Sample::Text { text } => {
                let text = self.with_eos(text.clone(), false);
                Layout {
                    trainable: all(&text),
                    text,
                    add_special_tokens: true,
                    approximate_spans: 0,
                }
            }
            Sample::Completion { prompt, completion } => {
                let text = self.with_eos(format!("{prompt}{completion}"), false);
                let trainable = if self.options.train_on_completions {
                    vec![prompt.len()..text.len()]
                } else {
                    all(&text)
                };
                Layout {
                    text,
                    trainable,
                    add_special_tokens: true,
                    approximate_spans: 0,
                }
            }
            Sample::Chat { messages } => self.chat_layout(messages)?,
        })
    }

    #[allow(clippy::single_range_in_vec_init)]
    fn chat_layout(&self, messages: &[Message]) -> Result<Layout> {
        let Some(template) = self.template else {
            bail!(
                "the formatter produced chat messages but the model has no chat template; pass \
                 --chat_template NAME|FILE (e.g. chatml, llama-3)"
            );
        };
        let rendered = template.render(messages, false)?;
        let (spans, approximate_spans) = if self.options.train_on_completions {
            assistant_spans(template, messages, &rendered)?
        } else {
            (vec![0..rendered.len()], 0)
        };
        let rendered_len = rendered.len();
        let text = self.with_eos(rendered, true);
        let mut trainable = spans;
        let ends_with_assistant = messages.last().is_some_and(|m| m.role == "assistant");
        if text.len() > rendered_len && (ends_with_assistant || !self.options.train_on_completions)
        {
            trainable.push(rendered_len..text.len());
        }
        Ok(Layout {
            text,
            trainable,
            add_special_tokens: false,
            approximate_spans,
        })
    }

    /// Appends the EOS token text unless the text already ends with it, as TRL does. For chat
    /// text trailing whitespace is ignored: a template ending in `<|im_end|>\n` with EOS
    /// `<|im_end|>` has ended its turn already.
    fn with_eos(&self, mut text: String, ignore_trailing_whitespace: bool) -> String {
        if let Some(eos) = &self.tokenizer.eos {
            let end = if ignore_trailing_whitespace {
                text.trim_end()
            } else {
                &text
            };
            if !end.ends_with(&eos.text) {
                text.push_str(&eos.text);
            }
        }
        text
    }

    /// A text that starts with the BOS text and a post-processor that adds BOS would give two;
    /// transformers would train on both, but it is never intended.
    fn drop_doubled_specials(&self, mut tokens: Tokens) -> Tokens {
        if let Some(bos) = &self.tokenizer.bos {
            if tokens.ids.len() >= 2 && tokens.ids[0] == bos.id && tokens.ids[1] == bos.id {
                tokens.ids.remove(0);
                tokens.offsets.remove(0);
            }
        }
        if let Some(eos) = &self.tokenizer.eos {
            let n = tokens.ids.len();
            if n >= 2 && tokens.ids[n - 1] == eos.id && tokens.ids[n - 2] == eos.id {
                tokens.ids.pop();
                tokens.offsets.pop();
            }
        }
        tokens
    }
}

/// Byte spans of `rendered` written for assistant turns: for turn `i`, from the end of the
/// conversation before it rendered with the generation prompt, to the end of the conversation
/// rendered through it. This covers the answer and its end-of-turn marker, whatever the template
/// looks like. A template that renders prefixes differently (e.g. rewrites earlier turns) falls
/// back to finding the turn's content in the text; those spans are counted as approximate.
fn assistant_spans(
    template: &ChatTemplate,
    messages: &[Message],
    rendered: &str,
) -> Result<(Vec<Range<usize>>, usize)> {
    let mut spans = Vec::new();
    let mut approximate = 0;
    let mut cursor = 0;
    for (i, message) in messages.iter().enumerate() {
        if message.role != "assistant" {
            continue;
        }
        let exact = (|| -> Option<Range<usize>> {
            let before = template.render(&messages[..i], true).ok()?;
            let through = template.render(&messages[..=i], false).ok()?;
            let consistent = rendered.starts_with(&through)
                && through.starts_with(&before)
                && before.len() >= cursor;
            consistent.then_some(before.len()..through.len())
        })();
        let span = match exact {
            Some(span) => span,
            None => {
                approximate += 1;
                let content = message.content.trim();
                match rendered[cursor..].find(content) {
                    Some(at) => cursor + at..cursor + at + content.len(),
                    None => bail!(
                        "chat template ({}): assistant turn {i} does not appear in the rendered \
                         conversation, so its loss mask cannot be built; check the template",
                        template.origin
                    ),
                }
            }
        };
        cursor = span.end;
        spans.push(span);
    }
    Ok((spans, approximate))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::display::render_for_display;
    use crate::data::test_support::{tiny_info, tiny_tokenizer};
    use crate::data::tiny_tokenizer::{EOS, EOT};

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    fn options(train_on_completions: bool) -> EncodeOptions {
        EncodeOptions {
            max_seq_length: 512,
            train_on_completions,
        }
    }

    fn encode(info: &TokenizerInfo, sample: &Sample, toc: bool) -> Encoded {
        let template = ChatTemplate::resolve(None, info).unwrap();
        Encoder {
            tokenizer: info,
            template: template.as_ref(),
            options: options(toc),
        }
        .encode(sample)
        .unwrap()
    }

    fn shown(info: &TokenizerInfo, sample: &Sample, toc: bool) -> String {
        render_for_display(&encode(info, sample, toc).sample, info).unwrap()
    }

    fn conversation() -> Sample {
        Sample::Chat {
            messages: vec![
                msg("system", "You are a helpful assistant."),
                msg("user", "What is the capital of France?"),
                msg("assistant", "The capital of France is Paris."),
                msg("user", "Add two and three."),
                msg("assistant", "Two plus three is five."),
            ],
        }
    }

    #[test]
    fn text_gets_bos_and_eos_and_trains_on_everything_after_the_first_token() {
        let info = tiny_info();
        let tok = tiny_tokenizer();
        let sample = Sample::Text {
            text: "hello world".into(),
        };
        let e = encode(&info, &sample, true);
        let expected: Vec<u32> = info.encode(&format!("hello world{EOS}"), true).unwrap().ids;
        assert_eq!(e.sample.input_ids, expected);
        assert_eq!(e.sample.input_ids[0], info.bos.as_ref().unwrap().id);
        assert_eq!(
            *e.sample.input_ids.last().unwrap(),
            tok.token_to_id(EOS).unwrap()
        );
        let mut mask = vec![true; expected.len()];
        mask[0] = false;
        assert_eq!(e.sample.trainable, mask);
        assert!(!e.truncated);
    }

    #[test]
    fn text_that_already_ends_with_eos_gets_no_second_one() {
        let info = tiny_info();
        let with = encode(
            &info,
            &Sample::Text {
                text: format!("hello{EOS}"),
            },
            false,
        );
        let without = encode(
            &info,
            &Sample::Text {
                text: "hello".into(),
            },
            false,
        );
        assert_eq!(with.sample, without.sample);
    }

    #[test]
    fn completion_masks_the_prompt_only_with_train_on_completions() {
        let info = tiny_info();
        let sample = Sample::Completion {
            prompt: "What is the capital of France?".into(),
            completion: " The capital of France is Paris.".into(),
        };
        assert_eq!(
            shown(&info, &sample, true),
            "⟦<|begin_of_text|>What is the capital of France?⟧ The capital of France is Paris.<|end_of_text|>"
        );
        assert_eq!(
            shown(&info, &sample, false),
            "⟦<|begin_of_text|>⟧What is the capital of France? The capital of France is Paris.<|end_of_text|>"
        );
    }

    #[test]
    fn chat_with_train_on_completions_learns_assistant_turns_and_their_end_markers() {
        let info = tiny_info();
        assert_eq!(
            shown(&info, &conversation(), true),
            "⟦<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n⟧The capital of France is Paris.<|eot_id|>\
             ⟦<|start_header_id|>user<|end_header_id|>\n\nAdd two and three.<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n⟧Two plus three is five.<|eot_id|><|end_of_text|>"
        );
        let all = encode(&info, &conversation(), false);
        assert!(all.sample.trainable[1..].iter().all(|&t| t));
        assert_eq!(all.approximate_spans, 0);
    }

    #[test]
    fn chat_ending_with_the_eos_token_gets_no_extra_eos() {
        let mut info = tiny_info();
        let eot = tiny_tokenizer().token_to_id(EOT).unwrap();
        info.eos = Some(crate::data::tokenize::SpecialToken {
            text: EOT.into(),
            id: eot,
        });
        let e = encode(&info, &conversation(), true);
        let ids = &e.sample.input_ids;
        assert_eq!(ids[ids.len() - 1], eot);
        assert_ne!(ids[ids.len() - 2], eot);
        assert!(e.sample.trainable[ids.len() - 1]);
    }

    #[test]
    fn templates_that_rewrite_prefixes_fall_back_to_content_search() {
        let info = tiny_info();
        let template = ChatTemplate::compile(
            "{{ messages|length }}:{% for m in messages %}{{ m.content }}|{% endfor %}",
            "t",
            &info,
        )
        .unwrap();
        let encoder = Encoder {
            tokenizer: &info,
            template: Some(&template),
            options: options(true),
        };
        let e = encoder.encode(&conversation()).unwrap();
        assert_eq!(e.approximate_spans, 2);
        assert_eq!(
            render_for_display(&e.sample, &info).unwrap(),
            "⟦5:You are a helpful assistant.|What is the capital of France?|⟧The capital of France is Paris.\
             ⟦|Add two and three.|⟧Two plus three is five.⟦|⟧<|end_of_text|>"
        );
    }

    #[test]
    fn truncation_keeps_the_head_and_is_reported() {
        let info = tiny_info();
        let encoder = Encoder {
            tokenizer: &info,
            template: None,
            options: EncodeOptions {
                max_seq_length: 4,
                train_on_completions: false,
            },
        };
        let text = Sample::Text {
            text: "The quick brown fox jumps over the lazy dog.".into(),
        };
        let e = encoder.encode(&text).unwrap();
        assert!(e.truncated);
        assert_eq!(e.sample.len(), 4);
        assert_eq!(e.sample.trainable, vec![false, true, true, true]);
        let err = encoder.encode(&conversation()).unwrap_err().to_string();
        assert!(
            err.contains("no chat template; pass --chat_template"),
            "{err}"
        );
    }
}
