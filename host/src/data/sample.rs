//! What a formatter makes of one dataset row (the host side of the WIT `sample` type).

use serde::{Deserialize, Serialize};

/// One training example before templating and tokenisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Sample {
    /// Plain text; the loss covers all of it.
    Text { text: String },
    /// A prompt and its completion; with `--train_on_completions` only the completion is learned.
    Completion { prompt: String, completion: String },
    /// Chat messages; the host applies the model's chat template. With `--train_on_completions`
    /// only assistant turns are learned.
    Chat { messages: Vec<Message> },
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}
