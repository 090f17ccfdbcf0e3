//! Stop strings on streamed text: [`StopMatcher`] takes text deltas as the detokenizer yields them and
//! returns what is safe to emit — it holds back any tail that could still grow into a stop string, and
//! when a stop string appears it cuts the text before it (the stop string itself is never emitted, as in
//! OpenAI's API).

/// What [`StopMatcher::push`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pushed {
    /// Text that can be sent now.
    pub text: String,
    /// A stop string was reached: the request ends, `text` is the last of it.
    pub stopped: bool,
}

/// Matches stop strings across deltas.
#[derive(Clone, Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
    done: bool,
}

impl StopMatcher {
    /// A matcher for `stops` (none: every delta passes through at once).
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
            done: false,
        }
    }

    /// Adds a delta; returns the text that may be emitted now.
    pub fn push(&mut self, delta: &str) -> Pushed {
        if self.done {
            return Pushed { text: String::new(), stopped: true };
        }
        self.pending.push_str(delta);
        let first_stop = self.stops.iter().filter_map(|s| self.pending.find(s.as_str())).min();
        if let Some(at) = first_stop {
            self.done = true;
            let text = self.pending[..at].to_string();
            self.pending.clear();
            return Pushed { text, stopped: true };
        }
        let keep = self.held_tail();
        let cut = self.pending.len() - keep;
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        Pushed { text, stopped: false }
    }

    /// The text still held back (at the end of the request: it was no stop string after all).
    pub fn finish(&mut self) -> String {
        self.done = true;
        std::mem::take(&mut self.pending)
    }

    /// Bytes at the end of `pending` that are a proper prefix of some stop string (the longest such tail).
    fn held_tail(&self) -> usize {
        let p = &self.pending;
        p.char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.len() > p.len() - i && s.starts_with(&p[i..])))
            .map_or(0, |i| p.len() - i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `deltas`, returns (all emitted text, whether it stopped).
    fn run(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for d in deltas {
            let p = m.push(d);
            out.push_str(&p.text);
            if p.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    /// The oracle: cut the whole text at the first occurrence of any stop string.
    fn oracle(stops: &[&str], deltas: &[&str]) -> (String, bool) {
        let text: String = deltas.concat();
        match stops.iter().filter_map(|s| text.find(s)).min() {
            Some(at) => (text[..at].to_string(), true),
            None => (text, false),
        }
    }

    #[test]
    fn matches_the_whole_text_oracle_for_every_split() {
        let text = "Ahoy matey, END of story.\nNext ENDING";
        let stop_sets: [&[&str]; 5] = [&[], &["END"], &["\n"], &["story", "of"], &["zzz", "y."]];
        for stops in stop_sets {
            for a in 0..text.len() {
                for b in a..text.len() {
                    let deltas = [&text[..a], &text[a..b], &text[b..]];
                    assert_eq!(run(stops, &deltas), oracle(stops, &deltas), "{stops:?} {deltas:?}");
                }
            }
        }
    }

    #[test]
    fn holds_back_only_a_possible_stop_prefix() {
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("abcST").text, "abc");
        assert_eq!(m.push("x").text, "STx");
        assert_eq!(m.push("ST").text, "");
        assert_eq!(m.push("OP tail"), Pushed { text: String::new(), stopped: true });
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        assert_eq!(run(&["é!"], &["caf", "é", "é!"]), ("café".to_string(), true));
        assert_eq!(run(&["日本"], &["ab日", "x本"]), ("ab日x本".to_string(), false));
    }
}
