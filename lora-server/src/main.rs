//! `lora-server`: the OpenAI-compatible multi-LoRA server binary (see `docs/server.md`).

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let args = lora_server::cli::Args::parse();
    lora_server::server::run(args).await?;
    Ok(())
}
