//! The `lora-engine` command line: `gen`, `generate`, `bench`.

fn main() {}
