//! Running the server: start the engine and load the adapters ([`crate::startup`]), bind the socket,
//! serve the routes, and shut down gracefully on Ctrl-C or SIGTERM — new requests get 503 at once,
//! running ones get a grace period (`--shutdown-timeout`) to finish, then the engine aborts what is left (their streams end
//! with `finish_reason: "abort"`) and its step thread is joined.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lora_engine::engine::Engine;

use crate::cli::Args;
use crate::error::ServerError;
use crate::metrics::ServerMetrics;
use crate::routes::router;
use crate::startup::{choose_model, load_startup_adapters, start_engine};
use crate::state::AppState;

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// Builds the engine and the state from the command line (model, engine, adapters). Dropping the
/// [`Engine`] stops its step thread.
pub fn build_state(args: &Args) -> Result<(Engine, Arc<AppState>), ServerError> {
    let model = choose_model(args)?;
    let (engine, cfg) = start_engine(args, &model.weights)?;
    // On an error the engine is dropped here, which stops its thread.
    load_startup_adapters(args, &engine, model.is_default)?;
    let base_name = args.served_model_name.clone().unwrap_or_else(|| model.name.clone());
    let metrics = ServerMetrics::new()?;
    let state = Arc::new(AppState::new(
        engine.handle(),
        model.tokenizer,
        model.chat_template,
        base_name,
        model.root,
        cfg.max_model_len,
        args.api_key.clone(),
        metrics,
    ));
    Ok((engine, state))
}

/// Runs the server until a shutdown signal.
pub async fn run(args: Args) -> Result<(), ServerError> {
    let (engine, state) = tokio::task::block_in_place(|| build_state(&args))?;
    let addr = format!("{}:{}", args.host, args.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| ServerError::Startup(format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr().map_err(|e| ServerError::Startup(format!("socket address: {e}")))?;
    if state.api_key.is_none() {
        tracing::warn!("no --api-key: the server is open to anyone who can reach {local}");
    }
    let names: Vec<String> = state.stats().await?.adapters.into_iter().map(|a| a.name).collect();
    tracing::info!("serving `{}` with adapters [{}]", state.base_name, names.join(", "));
    // The one line on stdout: tests and scripts read the address from it.
    println!("lora-server listening on http://{local}");
    let app = router(state.clone());
    let st = state.clone();
    let grace = Duration::from_secs(args.shutdown_timeout);
    let on_signal = async move {
        shutdown_signal().await;
        tracing::info!("shutdown: refusing new requests, {}s for running ones", grace.as_secs());
        st.accepting.store(false, Ordering::Relaxed);
        let late = st.clone();
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            tracing::info!("shutdown: aborting the requests still running");
            let engine = late.engine.clone();
            let _ = tokio::task::spawn_blocking(move || engine.shutdown(false)).await;
        });
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(on_signal)
        .await
        .map_err(|e| ServerError::Startup(format!("server: {e}")))?;
    // Whatever is still running finishes (the grace timer aborts it if it takes too long).
    let _ = tokio::task::spawn_blocking(move || engine.shutdown(true)).await;
    tracing::info!("shut down");
    Ok(())
}
