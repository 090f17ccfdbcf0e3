//! From engine events to text: [`Assembler`] runs one request's events through the tokenizer's
//! incremental decoder ([`StreamDecoder`], which holds back a token whose bytes do not yet form whole
//! characters) and the [`StopMatcher`], deciding what text to send and when the request ends (EOS, a
//! stop token, `max_tokens`, a stop string, an abort or a failure).

use lora_engine::api::{Event, FinishReason};
use lora_model::tokenizer::{StreamDecoder, Tokenizer};

use crate::stop::StopMatcher;

/// How a request ended, as the OpenAI response says it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// EOS, a stop token or a stop string: `"stop"`.
    Stop,
    /// `max_tokens` or the context: `"length"`.
    Length,
    /// Aborted by the engine (shutdown).
    Aborted,
    /// The engine failed the request.
    Failed(String),
}

impl Ending {
    /// `finish_reason`.
    pub fn finish_reason(&self) -> &'static str {
        match self {
            Ending::Stop => "stop",
            Ending::Length => "length",
            Ending::Aborted => "abort",
            Ending::Failed(_) => "error",
        }
    }
}

/// What one event produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Piece {
    /// Text to send now.
    pub text: String,
    /// The token this event carried, if any.
    pub token: Option<u32>,
    /// Set when the request is over (the text above is its last).
    pub ending: Option<Ending>,
}

/// One request's text assembly.
pub struct Assembler {
    detok: StreamDecoder,
    /// Ids the tokenizer can decode (a model's vocabulary may be padded beyond it).
    vocab: usize,
    stop: StopMatcher,
    /// Tokens whose text is never shown (EOS unless `ignore_eos`, stop token ids).
    silent: Vec<u32>,
    /// Tokens received.
    pub tokens: Vec<u32>,
    /// Prompt tokens (from the engine's last event, else the caller's count).
    pub prompt_tokens: u32,
    /// Completion tokens (the engine's count when it finished the request, else the tokens received).
    pub completion_tokens: u32,
    done: bool,
}

impl Assembler {
    /// An assembler for a request of `prompt_tokens` tokens; `silent` tokens (EOS, stop token ids) end
    /// the request without text.
    pub fn new(tokenizer: &Tokenizer, prompt_tokens: usize, stops: Vec<String>, silent: Vec<u32>) -> Self {
        Assembler {
            detok: tokenizer.stream_decoder(true),
            vocab: tokenizer.vocab_size(),
            stop: StopMatcher::new(stops),
            silent,
            tokens: Vec::new(),
            prompt_tokens: u32::try_from(prompt_tokens).unwrap_or(u32::MAX),
            completion_tokens: 0,
            done: false,
        }
    }

    /// Whether the request is over.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Runs one event.
    pub fn on_event(&mut self, event: Event) -> Piece {
        if self.done {
            return Piece { text: String::new(), token: None, ending: None };
        }
        match event {
            Event::Token(t) => {
                self.tokens.push(t);
                self.completion_tokens = u32::try_from(self.tokens.len()).unwrap_or(u32::MAX);
                if self.silent.contains(&t) || t as usize >= self.vocab {
                    return Piece { text: String::new(), token: Some(t), ending: None };
                }
                // A decode failure (an id the tokenizer lacks) yields no text rather than ending the request.
                let delta = self.detok.push(t).unwrap_or_default();
                let pushed = self.stop.push(&delta);
                if pushed.stopped {
                    self.done = true;
                    return Piece { text: pushed.text, token: Some(t), ending: Some(Ending::Stop) };
                }
                Piece { text: pushed.text, token: Some(t), ending: None }
            }
            Event::Finished { reason, prompt_tokens, completion_tokens } => {
                self.done = true;
                self.prompt_tokens = prompt_tokens;
                self.completion_tokens = completion_tokens;
                let tail = self.detok.finish().unwrap_or_default();
                let pushed = self.stop.push(&tail);
                let mut text = pushed.text;
                let ending = if pushed.stopped {
                    Ending::Stop
                } else {
                    text.push_str(&self.stop.finish());
                    match reason {
                        FinishReason::Stop => Ending::Stop,
                        FinishReason::Length => Ending::Length,
                        FinishReason::Aborted => Ending::Aborted,
                    }
                };
                Piece { text, token: None, ending: Some(ending) }
            }
            Event::Failed(msg) => {
                self.done = true;
                Piece { text: String::new(), token: None, ending: Some(Ending::Failed(msg)) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(events: Vec<Event>, stops: &[&str]) -> (String, Option<Ending>, u32) {
        let tok = Tokenizer::byte_level_fallback();
        let mut a = Assembler::new(&tok, 1, stops.iter().map(|s| s.to_string()).collect(), tok.eos_ids().to_vec());
        let mut text = String::new();
        for e in events {
            let piece = a.on_event(e);
            text.push_str(&piece.text);
            if piece.ending.is_some() {
                return (text, piece.ending, a.completion_tokens);
            }
        }
        (text, None, a.completion_tokens)
    }

    fn token_events(text: &str) -> Vec<Event> {
        let tok = Tokenizer::byte_level_fallback();
        tok.encode(text, false).unwrap().into_iter().map(Event::Token).collect()
    }

    #[test]
    fn text_is_the_whole_decode_and_eos_is_silent() {
        let tok = Tokenizer::byte_level_fallback();
        let text = "Arr, héllo 日本!";
        let mut ev = token_events(text);
        let n = ev.len() as u32;
        ev.push(Event::Token(tok.eos_ids()[0]));
        ev.push(Event::Finished { reason: FinishReason::Stop, prompt_tokens: 1, completion_tokens: n + 1 });
        assert_eq!(run(ev, &[]), (text.to_string(), Some(Ending::Stop), n + 1));
    }

    #[test]
    fn stop_strings_cut_and_held_text_is_flushed() {
        let mut ev = token_events("Arr matey");
        ev.push(Event::Finished { reason: FinishReason::Length, prompt_tokens: 1, completion_tokens: 9 });
        // A stop string ends the request where it starts, counting the tokens received.
        assert_eq!(run(ev.clone(), &[" ma"]), ("Arr".into(), Some(Ending::Stop), 6));
        // A held-back prefix that never completes is flushed at the end.
        assert_eq!(run(ev, &["eyz"]), ("Arr matey".into(), Some(Ending::Length), 9));
        assert_eq!(run(vec![Event::Failed("boom".into())], &[]).1, Some(Ending::Failed("boom".into())));
    }
}
