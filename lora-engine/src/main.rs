//! The `lora-engine` command line: `gen` writes random-weight checkpoints and PEFT adapters in the real
//! formats, `generate` runs a prompts file offline, `bench` measures throughput / ITL / TTFT on the CPU
//! backend.

mod cli;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match cli::Cli::parse().command {
        cli::Command::Gen(a) => cli::gen::run(a),
        cli::Command::Generate(a) => cli::generate::run(a),
        cli::Command::Bench(a) => cli::bench::run(a),
    }
}
