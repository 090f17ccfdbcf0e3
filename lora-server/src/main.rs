//! `lora-server`: the OpenAI-compatible server (being built).

fn main() {}
