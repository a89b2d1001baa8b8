//! What a formatter returns for one row (the guest side of the WIT `sample` variant).

/// One training example before the host applies the chat template and the tokenizer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sample {
    /// Plain text; the loss covers all of it.
    Text { text: String },
    /// Prompt and completion. The host trains on `prompt + completion` (concatenated with
    /// nothing in between), and with `--train_on_completions` only on the completion.
    Completion { prompt: String, completion: String },
    /// Chat messages; the host applies the model's chat template.
    Chat { messages: Vec<Message> },
}

impl Sample {
    pub fn text(text: impl Into<String>) -> Self {
        Sample::Text { text: text.into() }
    }

    pub fn completion(prompt: impl Into<String>, completion: impl Into<String>) -> Self {
        Sample::Completion {
            prompt: prompt.into(),
            completion: completion.into(),
        }
    }

    pub fn chat(messages: impl IntoIterator<Item = Message>) -> Self {
        Sample::Chat {
            messages: messages.into_iter().collect(),
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Message::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Message::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new("assistant", content)
    }
}
