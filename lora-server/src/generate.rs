//! The two generation endpoints (`/v1/completions`, `/v1/chat/completions`): parse and check the body,
//! hand the request to the engine with a [`ChannelSink`], then either collect the whole answer or stream
//! it as server-sent events ending in `data: [DONE]`. A [`RequestGuard`] aborts the engine request when
//! the answer is dropped early — a client that disconnects mid-stream, a stop string — so its KV pages
//! and adapter slot are freed at once; latency and token metrics are recorded as events arrive.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::stream::{self, Stream};
use lora_engine::api::{Event, GenerationRequest, RequestId};
use lora_engine::engine::EngineHandle;
use lora_model::SamplingParams;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::error::ServerError;
use crate::request::{parse_request, Endpoint, GenParams};
use crate::response::{ResponseMeta, Usage};
use crate::sink::ChannelSink;
use crate::state::{unix_now, AppState};
use crate::text::{Assembler, Ending};

/// Aborts its engine request on drop unless the request already ended.
pub struct RequestGuard {
    engine: EngineHandle,
    id: RequestId,
    live: bool,
}

impl RequestGuard {
    /// The request ended on the engine's side: nothing to abort.
    fn ended(&mut self) {
        self.live = false;
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if self.live {
            // The engine may have finished it in the meantime; an abort of a finished request is a no-op.
            let _ = self.engine.abort(self.id);
        }
    }
}

/// Latency bookkeeping of one request.
struct Timing {
    arrived: Instant,
    last_token: Option<Instant>,
}

impl Timing {
    fn on_token(&mut self, state: &AppState) {
        let now = Instant::now();
        match self.last_token {
            None => state.metrics.observe_ttft((now - self.arrived).as_secs_f64()),
            Some(t) => state.metrics.observe_itl((now - t).as_secs_f64()),
        }
        self.last_token = Some(now);
    }
}

/// A request handed to the engine, with everything needed to answer it.
struct Running {
    state: Arc<AppState>,
    guard: RequestGuard,
    rx: UnboundedReceiver<Event>,
    asm: Assembler,
    meta: ResponseMeta,
    params: GenParams,
    prompt: Vec<u32>,
    /// Label of the metrics (`model` of the request).
    label: String,
    timing: Timing,
    recorded: bool,
}

impl Running {
    /// Next event, or an abort when the engine dropped the sink without a last event.
    async fn next_event(&mut self) -> Event {
        match self.rx.recv().await {
            Some(e) => e,
            None => Event::Failed("the engine dropped the request".into()),
        }
    }

    /// Records the request's metrics once.
    fn record(&mut self, ending: &Ending) {
        if self.recorded {
            return;
        }
        self.recorded = true;
        let m = &self.state.metrics;
        m.record_request(&self.label, ending.finish_reason(), self.asm.prompt_tokens, self.asm.completion_tokens);
        m.observe_e2e(self.timing.arrived.elapsed().as_secs_f64());
    }

    fn usage(&self) -> Usage {
        Usage { prompt_tokens: self.asm.prompt_tokens, completion_tokens: self.asm.completion_tokens }
    }

    /// Runs one event through the assembler; on the last one, closes the guard (the engine ended it) or
    /// lets the drop abort it (a stop string).
    fn step(&mut self, event: Event) -> crate::text::Piece {
        let engine_ended = matches!(event, Event::Finished { .. } | Event::Failed(_));
        if matches!(event, Event::Token(_)) {
            self.timing.on_token(&self.state);
        }
        let piece = self.asm.on_event(event);
        if let Some(ending) = &piece.ending {
            if engine_ended {
                self.guard.ended();
            } else {
                // A stop string: the engine would go on, so abort it now.
                self.guard.ended();
                let _ = self.state.engine.abort(self.guard.id);
            }
            self.record(&ending.clone());
        }
        piece
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A stream dropped before its end: the client went away.
        if !self.recorded {
            self.record(&Ending::Aborted);
        }
    }
}

/// Parses, checks and submits a request.
fn start(state: &Arc<AppState>, body: &[u8], endpoint: Endpoint) -> Result<Running, ServerError> {
    let arrived = Instant::now();
    if !state.accepting.load(Ordering::Relaxed) {
        return Err(ServerError::ShuttingDown);
    }
    let req = parse_request(body, endpoint)?;
    let adapter = state.resolve_model(&req.model);
    let prompt = state.prompt_tokens(&req.prompt)?;
    let max_tokens = state.completion_budget(endpoint, prompt.len(), req.params.max_tokens)?;
    let number = state.next_request_number();
    let p = &req.params;
    let seed = p.seed.unwrap_or_else(|| number.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ state.started);
    let gen = GenerationRequest {
        prompt: prompt.clone(),
        adapter: adapter.clone(),
        sampling: SamplingParams { temperature: p.temperature, top_k: p.top_k, top_p: p.top_p, seed },
        max_tokens,
        stop_token_ids: p.stop_token_ids.clone(),
        ignore_eos: p.ignore_eos,
    };
    let mut silent = p.stop_token_ids.clone();
    if !p.ignore_eos {
        silent.extend_from_slice(state.tokenizer.eos_ids());
        silent.extend_from_slice(&state.engine.model_config().eos_token_ids);
    }
    let (sink, rx) = ChannelSink::pair();
    let id = state.engine.submit(gen, Box::new(sink)).map_err(|e| match ServerError::from(e) {
        // The adapter went away between the check and the submit.
        ServerError::ModelNotFound(_) => ServerError::ModelNotFound(req.model.clone()),
        other => other,
    })?;
    let prefix = match endpoint {
        Endpoint::Completions => "cmpl",
        Endpoint::Chat => "chatcmpl",
    };
    Ok(Running {
        guard: RequestGuard { engine: state.engine.clone(), id, live: true },
        rx,
        asm: Assembler::new(&state.tokenizer, prompt.len(), p.stop.clone(), silent),
        meta: ResponseMeta {
            endpoint,
            id: format!("{prefix}-{number}"),
            created: unix_now(),
            model: req.model.clone(),
        },
        label: req.model,
        params: req.params,
        prompt,
        timing: Timing { arrived, last_token: None },
        recorded: false,
        state: state.clone(),
    })
}

/// Handles a body for `endpoint`: a JSON answer or an SSE stream.
pub async fn generate(state: Arc<AppState>, body: Bytes, endpoint: Endpoint) -> Response {
    let run = match start(&state, &body, endpoint) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if run.params.stream {
        Sse::new(sse_stream(run)).into_response()
    } else {
        match collect(run).await {
            Ok(v) => Json(v).into_response(),
            Err(e) => e.into_response(),
        }
    }
}

/// Waits for the whole answer.
async fn collect(mut run: Running) -> Result<serde_json::Value, ServerError> {
    let mut text = String::new();
    loop {
        let event = run.next_event().await;
        let piece = run.step(event);
        text.push_str(&piece.text);
        match piece.ending {
            None => continue,
            Some(Ending::Failed(msg)) => return Err(ServerError::Engine(msg)),
            Some(Ending::Aborted) if !run.state.accepting.load(Ordering::Relaxed) => {
                return Err(ServerError::ShuttingDown)
            }
            Some(ending) => {
                let ids = run.params.return_token_ids.then_some((run.prompt.as_slice(), run.asm.tokens.as_slice()));
                return Ok(run.meta.full(&text, ending.finish_reason(), run.usage(), ids));
            }
        }
    }
}

/// Where a stream is.
enum Phase {
    /// The chat role chunk comes first.
    Role,
    /// Tokens flow.
    Tokens,
    /// The usage chunk (when asked).
    Usage,
    /// `[DONE]`.
    Done,
    /// Nothing more.
    End,
}

struct StreamState {
    run: Running,
    phase: Phase,
    /// Token ids not yet sent (with `return_token_ids`).
    unsent_ids: Vec<u32>,
    first_chunk: bool,
}

fn data(v: &serde_json::Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

/// The SSE stream of a request: chunks as text arrives, a last chunk with the finish reason, the usage
/// chunk if asked, `[DONE]`. Dropping it (the client went away) drops the guard: the engine aborts.
fn sse_stream(run: Running) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let phase = if run.meta.endpoint == Endpoint::Chat { Phase::Role } else { Phase::Tokens };
    let init = StreamState { run, phase, unsent_ids: Vec::new(), first_chunk: true };
    stream::unfold(init, |mut st| async move {
        loop {
            match st.phase {
                Phase::Role => {
                    st.phase = Phase::Tokens;
                    st.first_chunk = false;
                    let prompt_ids = st.run.params.return_token_ids.then_some(st.run.prompt.as_slice());
                    let chunk = st.run.meta.chunk(Some(""), true, None, None, prompt_ids);
                    return Some((Ok(data(&chunk)), st));
                }
                Phase::Tokens => {
                    let event = st.run.next_event().await;
                    let piece = st.run.step(event);
                    let want_ids = st.run.params.return_token_ids;
                    if let (true, Some(t)) = (want_ids, piece.token) {
                        st.unsent_ids.push(t);
                    }
                    let finish = piece.ending.as_ref().map(Ending::finish_reason);
                    if piece.ending.is_some() {
                        st.phase = if st.run.params.include_usage { Phase::Usage } else { Phase::Done };
                    }
                    // A token whose text is held back (an incomplete UTF-8 sequence, a special token) gets no
                    // chunk of its own, unless the client asked for token ids: then every token is streamed.
                    if piece.text.is_empty() && finish.is_none() && !(want_ids && piece.token.is_some()) {
                        continue;
                    }
                    if let Some(Ending::Failed(msg)) = &piece.ending {
                        let err = ServerError::Engine(msg.clone()).body();
                        let v = serde_json::to_value(err).unwrap_or_default();
                        return Some((Ok(data(&v)), st));
                    }
                    let ids = std::mem::take(&mut st.unsent_ids);
                    let prompt_ids = (want_ids && st.first_chunk).then_some(st.run.prompt.as_slice());
                    let text = (!piece.text.is_empty()).then_some(piece.text.as_str());
                    let chunk = st.run.meta.chunk(text, false, finish, want_ids.then_some(ids.as_slice()), prompt_ids);
                    st.first_chunk = false;
                    return Some((Ok(data(&chunk)), st));
                }
                Phase::Usage => {
                    st.phase = Phase::Done;
                    let chunk = st.run.meta.usage_chunk(st.run.usage());
                    return Some((Ok(data(&chunk)), st));
                }
                Phase::Done => {
                    st.phase = Phase::End;
                    return Some((Ok(SseEvent::default().data("[DONE]")), st));
                }
                Phase::End => return None,
            }
        }
    })
}
