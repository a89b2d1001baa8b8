//! `chat`: conversations → chat samples. Reads OpenAI-style `messages` (`role`/`content`) or
//! ShareGPT `conversations` (`from`/`value`, with human→user, gpt→assistant, system→system);
//! the column, the keys and extra role names can be set in the config.

use std::collections::BTreeMap;

use ferrotune_plugin_sdk::serde_json::Value;
use ferrotune_plugin_sdk::{export_formatter, Formatter, JsonRow, Message, Sample};
use serde::Deserialize;

/// `--formatter_config` of `chat`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The column holding the message list (default: `messages`, else `conversations`).
    pub column: Option<String>,
    /// Key of a message's role (default: `role`, or `from` for ShareGPT messages).
    pub role_key: Option<String>,
    /// Key of a message's text (default: `content`, or `value` for ShareGPT messages).
    pub content_key: Option<String>,
    /// Extra role names → chat-template roles, e.g. {"bot": "assistant"}.
    pub roles: BTreeMap<String, String>,
    /// A system message put first when a conversation has none.
    pub system_prompt: Option<String>,
}

/// ShareGPT's speaker names and the usual aliases.
const DEFAULT_ROLES: [(&str, &str); 7] = [
    ("system", "system"),
    ("user", "user"),
    ("assistant", "assistant"),
    ("human", "user"),
    ("gpt", "assistant"),
    ("chatgpt", "assistant"),
    ("tool", "tool"),
];

pub struct Chat {
    config: Config,
    roles: BTreeMap<String, String>,
}

impl Formatter for Chat {
    const NAME: &'static str = "chat";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const DESCRIPTION: &'static str =
        "OpenAI `messages` or ShareGPT `conversations` → chat messages for the model's chat template";
    const CONFIG_SCHEMA: Option<&'static str> = Some(
        r#"{"type":"object","additionalProperties":false,"properties":{"column":{"type":"string"},"role_key":{"type":"string"},"content_key":{"type":"string"},"roles":{"type":"object","additionalProperties":{"type":"string"}},"system_prompt":{"type":"string"}}}"#,
    );

    type Config = Config;
    type Row = JsonRow;

    fn new(config: Config) -> Result<Self, String> {
        let mut roles: BTreeMap<String, String> = DEFAULT_ROLES
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        roles.extend(config.roles.clone());
        Ok(Chat { config, roles })
    }

    fn format(&self, row: JsonRow) -> Result<Sample, String> {
        let column = match &self.config.column {
            Some(column) => column.as_str(),
            None if row.has("messages") => "messages",
            None if row.has("conversations") => "conversations",
            None => {
                return Err(
                    "missing column \"messages\" (or ShareGPT \"conversations\"); set config \"column\""
                        .into(),
                )
            }
        };
        let items = row.array(column)?;
        if items.is_empty() {
            return Err(format!("column {column:?} is an empty list"));
        }
        let mut messages = Vec::with_capacity(items.len() + 1);
        if let Some(system) = &self.config.system_prompt {
            messages.push(Message::system(system.clone()));
        }
        for (i, item) in items.iter().enumerate() {
            messages.push(self.message(i, item)?);
        }
        if self.config.system_prompt.is_some() && messages[1..].iter().any(|m| m.role == "system") {
            messages.remove(0);
        }
        Ok(Sample::chat(messages))
    }
}

impl Chat {
    fn message(&self, i: usize, item: &Value) -> Result<Message, String> {
        let Value::Object(fields) = item else {
            return Err(format!(
                "message {i} is {}, expected an object",
                ferrotune_plugin_sdk_kind(item)
            ));
        };
        let sharegpt = !fields.contains_key("role") && fields.contains_key("from");
        let role_key =
            self.config
                .role_key
                .as_deref()
                .unwrap_or(if sharegpt { "from" } else { "role" });
        let content_key = self.config.content_key.as_deref().unwrap_or(if sharegpt {
            "value"
        } else {
            "content"
        });
        let field = |key: &str| -> Result<&str, String> {
            let value = fields
                .get(key)
                .ok_or_else(|| format!("message {i} has no {key:?}"))?;
            ferrotune_plugin_sdk::row::expect_str(value, &format!("message {i} {key:?}"))
        };
        let role = field(role_key)?;
        let role = match self.roles.get(role) {
            Some(mapped) => mapped.clone(),
            None => {
                return Err(format!(
                    "message {i} has unknown role {role:?}; map it in config \"roles\", e.g. {{\"{role}\": \"assistant\"}}"
                ))
            }
        };
        Ok(Message::new(role, field(content_key)?))
    }
}

fn ferrotune_plugin_sdk_kind(value: &Value) -> &'static str {
    ferrotune_plugin_sdk::row::kind_of(value)
}

export_formatter!(Chat);

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune_plugin_sdk::serde_json::{json, Value};
    use ferrotune_plugin_sdk::testing::Harness;

    #[test]
    fn openai_messages() {
        let h = Harness::<Chat>::new(Value::Null).unwrap();
        let row = json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]});
        assert_eq!(
            h.format(row),
            Ok(Sample::chat([
                Message::system("Be brief."),
                Message::user("Hi"),
                Message::assistant("Hello")
            ]))
        );
    }

    #[test]
    fn sharegpt_conversations_and_overrides() {
        let h = Harness::<Chat>::new(Value::Null).unwrap();
        let row = json!({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]});
        assert_eq!(
            h.format(row),
            Ok(Sample::chat([
                Message::user("Hi"),
                Message::assistant("Yo")
            ]))
        );

        let h = Harness::<Chat>::new(json!({
            "column": "dialog", "role_key": "speaker", "content_key": "text",
            "roles": {"bot": "assistant"}, "system_prompt": "You are helpful."}))
        .unwrap();
        let row =
            json!({"dialog": [{"speaker": "user", "text": "Q"}, {"speaker": "bot", "text": "A"}]});
        assert_eq!(
            h.format(row),
            Ok(Sample::chat([
                Message::system("You are helpful."),
                Message::user("Q"),
                Message::assistant("A")
            ]))
        );
    }

    #[test]
    fn malformed_rows() {
        let h = Harness::<Chat>::new(Value::Null).unwrap();
        let cases = [
            (json!({"text": "x"}), "missing column \"messages\""),
            (
                json!({"messages": []}),
                "column \"messages\" is an empty list",
            ),
            (
                json!({"messages": "hi"}),
                "column \"messages\" is a string, expected an array",
            ),
            (
                json!({"messages": [3]}),
                "message 0 is a number, expected an object",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                "message 0 has no \"content\"",
            ),
            (
                json!({"conversations": [{"from": "bing", "value": "x"}]}),
                "message 0 has unknown role \"bing\"",
            ),
            (
                json!({"messages": [{"role": "user", "content": 1}]}),
                "message 0 \"content\" is a number",
            ),
        ];
        for (row, needle) in cases {
            let err = h.format(row.clone()).unwrap_err();
            assert!(err.contains(needle), "{row}: {err}");
        }
    }
}
