//! The pipeline against transformers itself (`tests/python/hf_data_parity.py`): the same
//! tokenizer files and samples must give the same chat-template text, the same token ids (BOS/EOS
//! as the worker's SFTTrainer adds them) and, for chat, the same assistant-token mask as
//! transformers' `{% generation %}` masks. Needs `python3` with `transformers`; skipped without
//! it, except under `CI=true` where `.ci/run` installs it and a missing package fails.

use std::path::Path;
use std::process::Command;

use serde_json::{json, Value};

use super::encode::{EncodeOptions, Encoder};
use super::sample::{Message, Sample};
use super::template::ChatTemplate;
use super::test_support::write_model_dir;
use super::tokenize::TokenizerInfo;

/// Llama-3's template with transformers' `{% generation %}` marks around what the assistant
/// writes (its answer and `<|eot_id|>`).
const LLAMA3_WITH_GENERATION: &str = "{{ bos_token }}{% for message in messages %}\
{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\
{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}\
{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}";

/// Python string methods, filters, `tojson` of an insertion-ordered dict, loop controls.
const FEATURES: &str = "{%- for message in messages %}\n\
    {%- if message.role == 'system' %}\n\
        {{- '<<SYS>>' + message.content.strip() | upper + '<</SYS>>\\n' }}\n\
    {%- elif message.role == 'user' %}\n\
        {{- '[U] ' + message['content'].replace('x', 'y') + ' ' + {'n': loop.index, 'c': message.content.split(' ')[:2], 'é': none} | tojson + '\\n' }}\n\
    {%- else %}\n\
        {%- if loop.last %}{% break %}{% endif %}\n\
        {{- '[A] ' + message.content.title() + eos_token + '\\n' }}\n\
    {%- endif %}\n\
{%- endfor %}\n";

fn transformers_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import transformers"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("python3 with transformers is required under CI=true (.ci/run installs it)");
    }
    if !ok {
        eprintln!("skipped: python3 with transformers is not installed");
    }
    ok
}

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

fn model_dir_with_template(dir: &Path, template: &str) {
    write_model_dir(dir);
    let path = dir.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["chat_template"] = Value::String(template.to_string());
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

fn transformers_output(model_dir: &Path, cases: &Value) -> Vec<Value> {
    let cases_path = model_dir.join("cases.json");
    std::fs::write(&cases_path, cases.to_string()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/hf_data_parity.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(model_dir)
        .arg(&cases_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "hf_data_parity.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn text_and_chat_match_transformers() {
    if !transformers_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    model_dir_with_template(dir.path(), LLAMA3_WITH_GENERATION);
    let info = TokenizerInfo::load(dir.path()).unwrap();
    let template = ChatTemplate::resolve(None, &info).unwrap().unwrap();
    let encoder = Encoder {
        tokenizer: &info,
        template: Some(&template),
        options: EncodeOptions {
            max_seq_length: 4096,
            train_on_completions: true,
        },
    };
    let texts = [
        "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n    ### Instruction:\n    Add two and three.\n\n    ### Input:\n    \n\n    ### Response:\n    Two plus three is five.",
        "héllo wörld — ünïcode, tabs\tand  double  spaces\n",
        "already ends with eos<|end_of_text|>",
    ];
    let conversations = [
        vec![
            msg("system", "You are a helpful assistant."),
            msg("user", "What is the capital of France?"),
            msg("assistant", "The capital of France is Paris."),
            msg("user", " Add two and three. "),
            msg("assistant", "Two plus three is five.\n"),
        ],
        vec![msg("user", "hello"), msg("assistant", "hello there")],
    ];
    let mut cases: Vec<Value> = texts.iter().map(|t| json!({ "text": t })).collect();
    cases.extend(conversations.iter().map(|m| json!({ "messages": m })));
    let reference = transformers_output(dir.path(), &Value::Array(cases));

    for (text, hf) in texts.iter().zip(&reference) {
        let ours = encoder
            .encode(&Sample::Text {
                text: text.to_string(),
            })
            .unwrap();
        assert_eq!(ours.sample.input_ids, ids(&hf["ids"]), "text {text:?}");
    }
    let eos = info.eos.as_ref().unwrap().id;
    for (messages, hf) in conversations.iter().zip(&reference[texts.len()..]) {
        assert_eq!(
            template.render(messages, false).unwrap(),
            hf["rendered"].as_str().unwrap()
        );
        let ours = encoder
            .encode(&Sample::Chat {
                messages: messages.clone(),
            })
            .unwrap()
            .sample;
        let hf_ids = ids(&hf["ids"]);
        let n = hf_ids.len();
        // transformers' chat ids end with the template; ferrotune appends the EOS it lacks.
        assert_eq!(&ours.input_ids[..n], &hf_ids[..]);
        assert_eq!(&ours.input_ids[n..], &[eos]);
        let hf_mask: Vec<bool> = hf["assistant_masks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_u64() == Some(1))
            .collect();
        assert_eq!(&ours.trainable[..n], &hf_mask[..], "assistant mask");
        assert!(
            ours.trainable[n],
            "the appended EOS after the answer is learned"
        );
    }
}

#[test]
fn template_features_render_like_transformers() {
    if !transformers_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    model_dir_with_template(dir.path(), FEATURES);
    let info = TokenizerInfo::load(dir.path()).unwrap();
    let template = ChatTemplate::resolve(None, &info).unwrap().unwrap();
    let conversation = vec![
        msg("system", "  be brief "),
        msg("user", "hello xx there"),
        msg("assistant", "hello there, friend"),
        msg("user", "x"),
        msg("assistant", "dropped by break"),
    ];
    let reference = transformers_output(dir.path(), &json!([{ "messages": conversation }]));
    let ours = template.render(&conversation, false).unwrap();
    assert_eq!(ours, reference[0]["rendered"].as_str().unwrap());
    assert!(
        ours.contains(r#"{"n": 2, "c": ["hello", "xx"], "é": null}"#),
        "{ours}"
    );
}
