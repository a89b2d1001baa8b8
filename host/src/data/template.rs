//! Chat templates: the Jinja source from the model (`tokenizer_config.json` `chat_template`, a
//! string or a named list, or `chat_template.jinja`) or from `--chat_template` (a file or a
//! name), rendered with minijinja configured like transformers' Jinja environment:
//! `trim_blocks` + `lstrip_blocks`, loop controls, Python string/dict methods, `raise_exception`,
//! `strftime_now`, and a `tojson` that prints what Python's `json.dumps` prints.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, Error, ErrorKind};

use super::sample::Message;
use super::tokenize::TokenizerInfo;

/// Templates built into ferrotune for `--chat_template NAME`, for models that ship none.
/// Each uses the marker strings of the family it is named after.
pub const BUILTIN_TEMPLATES: &[(&str, &str)] = &[
    (
        "chatml",
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] \
         + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    ),
    (
        "llama-3",
        "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + \
         '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}\
         {% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}\
         {{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    ),
    (
        "mistral",
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + \
         message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + \
         eos_token }}{% else %}{{ raise_exception('mistral template: only user and assistant roles are \
         supported') }}{% endif %}{% endfor %}",
    ),
    (
        "gemma",
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}\
         {% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + \
         message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}\
         {{ '<start_of_turn>model\\n' }}{% endif %}",
    ),
    (
        "zephyr",
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + \
         '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
    ),
];

/// Accepted spellings of builtin names.
fn builtin_alias(name: &str) -> &str {
    match name {
        "llama3" | "llama-3.1" | "llama-31" | "llama3.1" => "llama-3",
        "qwen" | "qwen2" | "qwen-2" | "im_start" => "chatml",
        other => other,
    }
}

/// A compiled chat template plus the special-token variables it sees.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from, for messages ("tokenizer_config.json", a path, a name).
    pub origin: String,
    specials: BTreeMap<&'static str, Value>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("origin", &self.origin)
            .finish()
    }
}

impl ChatTemplate {
    /// Picks the template: `--chat_template` when given (an existing file, else a name among the
    /// model's named templates, else a builtin name), else the model's default. `Ok(None)` when
    /// the model has none and no flag was given; chat samples then fail with a clear error.
    pub fn resolve(flag: Option<&str>, tokenizer: &TokenizerInfo) -> Result<Option<Self>> {
        let Some(value) = flag else {
            return match tokenizer
                .chat_templates
                .iter()
                .find(|(n, _)| n == "default")
            {
                Some((_, source)) => {
                    Self::compile(source, "the model's chat_template", tokenizer).map(Some)
                }
                None => Ok(None),
            };
        };
        let path = Path::new(value);
        if path.is_file() {
            let source = std::fs::read_to_string(path)
                .with_context(|| format!("--chat_template {value}: cannot read the file"))?;
            return Self::compile(&source, value, tokenizer).map(Some);
        }
        if let Some((_, source)) = tokenizer.chat_templates.iter().find(|(n, _)| n == value) {
            return Self::compile(
                source,
                &format!("the model's {value:?} chat_template"),
                tokenizer,
            )
            .map(Some);
        }
        let builtin = builtin_alias(value);
        if let Some((_, source)) = BUILTIN_TEMPLATES.iter().find(|(n, _)| *n == builtin) {
            return Self::compile(source, &format!("builtin {builtin:?} template"), tokenizer)
                .map(Some);
        }
        let looks_like_file =
            value.contains('/') || value.ends_with(".jinja") || value.ends_with(".j2");
        if looks_like_file {
            bail!("--chat_template {value}: no such file; pass a readable Jinja file or a template name");
        }
        let mut names: Vec<&str> = tokenizer
            .chat_templates
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        names.extend(BUILTIN_TEMPLATES.iter().map(|(n, _)| *n));
        bail!(
            "--chat_template {value:?}: not a file nor a known template name; use one of {} or a \
             path to a Jinja file",
            names.join(", ")
        )
    }

    /// Compiles `source` in a transformers-compatible environment.
    pub fn compile(source: &str, origin: &str, tokenizer: &TokenizerInfo) -> Result<Self> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks; templates are written for it.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", rewrite_generation_tags(source))
            .map_err(|e| anyhow!("{origin}: the chat template does not compile: {e:#}"))?;
        let mut specials = BTreeMap::new();
        for (key, token) in [
            ("bos_token", &tokenizer.bos),
            ("eos_token", &tokenizer.eos),
            ("pad_token", &tokenizer.pad),
            ("unk_token", &tokenizer.unk),
        ] {
            if let Some(t) = token {
                specials.insert(key, Value::from(t.text.clone()));
            }
        }
        Ok(Self {
            env,
            origin: origin.to_string(),
            specials,
        })
    }

    /// Renders `messages` (the whole conversation, or a prefix of it).
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut ctx = self.specials.clone();
        ctx.insert("messages", Value::from_serialize(messages));
        ctx.insert("add_generation_prompt", Value::from(add_generation_prompt));
        let template = self
            .env
            .get_template("chat")
            .expect("compiled in compile()");
        template
            .render(ctx)
            .map_err(|e| anyhow!("chat template ({}): {}", self.origin, describe(&e)))
    }
}

/// minijinja's message plus the template error's own detail, on one line.
fn describe(e: &Error) -> String {
    match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        _ => format!("{e:#}").replace('\n', " "),
    }
}

/// transformers' `{% generation %}` block only marks assistant text for its own masking; we find
/// assistant spans ourselves, so the block becomes an always-true `if` (keeping the whitespace
/// control markers, so rendering is unchanged).
fn rewrite_generation_tags(source: &str) -> String {
    use std::sync::LazyLock;
    static OPEN: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"\{%([-+]?)\s*generation\s*([-+]?)%\}").unwrap());
    static CLOSE: LazyLock<regex::Regex> =
        LazyLock::new(|| regex::Regex::new(r"\{%([-+]?)\s*endgeneration\s*([-+]?)%\}").unwrap());
    let s = OPEN.replace_all(source, "{%${1} if true ${2}%}");
    CLOSE.replace_all(&s, "{%${1} endif ${2}%}").into_owned()
}

fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message))
}

/// Python's `datetime.now().strftime(fmt)` in local time. An unknown `%` directive is an error
/// (chrono would otherwise fail while printing).
fn strftime_now(format: String) -> Result<Value, Error> {
    use chrono::format::{Item, StrftimeItems};
    if StrftimeItems::new(&format).any(|item| matches!(item, Item::Error)) {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("strftime_now: unsupported format {format:?}"),
        ));
    }
    Ok(Value::from(
        chrono::Local::now().format(&format).to_string(),
    ))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, so tool schemas reach the prompt exactly as Python prints them.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match separators.as_deref() {
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair of strings",
            ))
        }
    };
    let value = if sort_keys.unwrap_or(false) {
        sorted(&value)
    } else {
        value
    };
    let mut out = Vec::new();
    let formatter = PythonJson {
        indent,
        level: 0,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        has_value: false,
    };
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    serde::Serialize::serialize(&value, &mut ser)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    Ok(Value::from_safe_string(
        String::from_utf8(out).expect("serde_json writes UTF-8"),
    ))
}

/// A copy of `value` with every map's keys in sorted order (`sort_keys=True`).
fn sorted(value: &Value) -> Value {
    use minijinja::value::ValueKind;
    match value.kind() {
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = value
                .try_iter()
                .into_iter()
                .flatten()
                .map(|k| {
                    let v = value.get_item(&k).unwrap_or_default();
                    (k.to_string(), sorted(&v))
                })
                .collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::from_iter(entries)
        }
        ValueKind::Seq => Value::from(
            value
                .try_iter()
                .into_iter()
                .flatten()
                .map(|v| sorted(&v))
                .collect::<Vec<_>>(),
        ),
        _ => value.clone(),
    }
}

/// A serde_json formatter that writes what Python's `json.dumps` writes for the given indent and
/// separators.
struct PythonJson {
    indent: Option<usize>,
    level: usize,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    /// Whether the innermost open container has an element (empty ones print as `[]`/`{}`).
    has_value: bool,
}

impl PythonJson {
    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> std::io::Result<()> {
        if let Some(n) = self.indent {
            w.write_all(b"\n")?;
            for _ in 0..n * self.level {
                w.write_all(b" ")?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + std::io::Write>(&mut self, w: &mut W, c: &[u8]) -> std::io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(c)
    }

    fn close<W: ?Sized + std::io::Write>(&mut self, w: &mut W, c: &[u8]) -> std::io::Result<()> {
        self.level -= 1;
        if self.has_value {
            self.newline(w)?;
        }
        w.write_all(c)
    }

    fn element<W: ?Sized + std::io::Write>(&self, w: &mut W, first: bool) -> std::io::Result<()> {
        if !first {
            w.write_all(self.item_sep.as_bytes())?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for PythonJson {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"[")
    }
    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"]")
    }
    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.element(w, first)
    }
    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.open(w, b"{")
    }
    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        self.close(w, b"}")
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.element(w, first)
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(self.key_sep.as_bytes())
    }
    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        if !self.ensure_ascii || fragment.is_ascii() {
            return w.write_all(fragment.as_bytes());
        }
        let mut units = [0u16; 2];
        for c in fragment.chars() {
            if c.is_ascii() {
                w.write_all(&[c as u8])?;
            } else {
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_support::tiny_info;
    use crate::data::tiny_tokenizer::LLAMA3_CHAT_TEMPLATE;

    fn msg(role: &str, content: &str) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    fn compile(source: &str) -> ChatTemplate {
        ChatTemplate::compile(source, "test", &tiny_info()).unwrap()
    }

    /// A Llama-3.2-style template: system turn with a date from `strftime_now`, trimmed
    /// contents, `tojson(indent=4)` for tools, whitespace control everywhere.
    const LLAMA32_STYLE: &str = r#"{{- bos_token }}
{%- if strftime_now is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- else %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"#;

    /// A Qwen-style ChatML template with a default system prompt and Python string methods.
    const CHATML_STYLE: &str = r#"{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- if '</think>' in content %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- endif %}
        {{- '<|im_start|>' + message.role + '\n' + content.strip() + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    #[test]
    fn llama3_template_renders_like_transformers() {
        let t = compile(LLAMA3_CHAT_TEMPLATE);
        let out = t
            .render(&[msg("user", " Hi! "), msg("assistant", "Hello.")], false)
            .unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        );
        let prompt = t.render(&[msg("user", "Hi!")], true).unwrap();
        assert!(prompt.ends_with("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"));
    }

    #[test]
    fn llama32_style_template_gets_todays_date_and_strips_whitespace() {
        let t = compile(LLAMA32_STYLE);
        let out = t
            .render(&[msg("system", "Be brief. "), msg("user", "Hi")], true)
            .unwrap();
        let today = chrono::Local::now().format("%d %b %Y").to_string();
        assert_eq!(
            out,
            format!(
                "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
                 Cutting Knowledge Date: December 2023\nToday Date: {today}\n\nBe brief.<|eot_id|>\
                 <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
                 <|start_header_id|>assistant<|end_header_id|>\n\n"
            )
        );
    }

    #[test]
    fn chatml_template_uses_python_string_methods() {
        let t = compile(CHATML_STYLE);
        let out = t
            .render(
                &[
                    msg("user", "2+2?"),
                    msg("assistant", "<think>\nadd</think>\n\n4 "),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        );
    }

    #[test]
    fn raise_exception_surfaces_the_templates_message() {
        let t =
            compile("{{ raise_exception('Conversation roles must alternate user/assistant') }}");
        let err = t
            .render(&[msg("user", "x")], false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Conversation roles must alternate user/assistant"),
            "{err}"
        );
    }

    #[test]
    fn tojson_prints_like_python_json_dumps() {
        let t = compile(
            "{{ {'b': [1, 2.5, 'é'], 'a': {'x': none, 'y': true}, 'e': []} | tojson }}|\
             {{ {'b': 1, 'a': [1, {}]} | tojson(indent=2, sort_keys=true) }}|\
             {{ 'é<' | tojson(ensure_ascii=true) }}",
        );
        let out = t.render(&[], false).unwrap();
        assert_eq!(
            out,
            "{\"b\": [1, 2.5, \"é\"], \"a\": {\"x\": null, \"y\": true}, \"e\": []}|\
             {\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": 1\n}|\"\\u00e9<\""
        );
    }

    #[test]
    fn loop_controls_and_generation_blocks_work() {
        let t = compile(
            "{% for m in messages %}{% if loop.index0 == 2 %}{% break %}{% endif %}\
             {% generation %}{{ m.content }}{% endgeneration %},{% endfor %}",
        );
        let out = t
            .render(
                &[msg("user", "a"), msg("assistant", "b"), msg("user", "c")],
                false,
            )
            .unwrap();
        assert_eq!(out, "a,b,");
    }

    #[test]
    fn strftime_now_rejects_unknown_directives() {
        let t = compile("{{ strftime_now('%Q') }}");
        let err = t.render(&[], false).unwrap_err().to_string();
        assert!(err.contains("strftime_now"), "{err}");
    }

    #[test]
    fn resolve_prefers_flag_file_then_model_names_then_builtins() {
        let mut info = tiny_info();
        info.chat_templates = vec![
            ("default".into(), "D{{ messages|length }}".into()),
            ("tool_use".into(), "T".into()),
        ];
        let none: &[Message] = &[];
        let render = |t: Option<ChatTemplate>| t.unwrap().render(none, false).unwrap();
        assert_eq!(render(ChatTemplate::resolve(None, &info).unwrap()), "D0");
        assert_eq!(
            render(ChatTemplate::resolve(Some("tool_use"), &info).unwrap()),
            "T"
        );
        let chatml = ChatTemplate::resolve(Some("chatml"), &info)
            .unwrap()
            .unwrap();
        assert_eq!(
            chatml.render(&[msg("user", "q")], true).unwrap(),
            "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.jinja");
        std::fs::write(&file, "F").unwrap();
        assert_eq!(
            render(ChatTemplate::resolve(Some(file.to_str().unwrap()), &info).unwrap()),
            "F"
        );
        let err = ChatTemplate::resolve(Some("nope"), &info)
            .unwrap_err()
            .to_string();
        assert!(err.contains("default, tool_use, chatml, llama-3"), "{err}");
        let err = ChatTemplate::resolve(Some("missing.jinja"), &info)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such file"), "{err}");
        info.chat_templates.clear();
        assert!(ChatTemplate::resolve(None, &info).unwrap().is_none());
    }

    #[test]
    fn a_template_that_does_not_compile_is_a_clear_error() {
        let err = ChatTemplate::compile("{% for %}", "tokenizer_config.json", &tiny_info())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer_config.json: the chat template does not compile"),
            "{err}"
        );
    }
}
