//! [`ChannelSink`]: the [`TokenSink`] the server hands the engine with every request. It forwards each
//! event into a tokio channel without blocking the step thread (an unbounded channel: events are a few
//! bytes and a request's count is bounded by its `max_tokens`), and answers `false` once the receiver is
//! gone — a client that disconnected, a handler that stopped at a stop string — so the engine aborts the
//! request and frees its KV pages and adapter slot at the next step.

use lora_engine::api::{Event, TokenSink};
use tokio::sync::mpsc;

/// Forwards events into an unbounded tokio channel.
pub struct ChannelSink {
    tx: mpsc::UnboundedSender<Event>,
}

impl ChannelSink {
    /// A sink and the receiving end for the handler.
    pub fn pair() -> (ChannelSink, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (ChannelSink { tx }, rx)
    }
}

impl TokenSink for ChannelSink {
    fn send(&mut self, event: Event) -> bool {
        self.tx.send(event).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_until_the_receiver_is_dropped() {
        let (mut sink, mut rx) = ChannelSink::pair();
        assert!(sink.send(Event::Token(7)));
        assert_eq!(rx.try_recv().ok(), Some(Event::Token(7)));
        drop(rx);
        assert!(!sink.send(Event::Token(8)), "a dropped receiver must abort the request");
    }
}
