//! Batch-size buckets: the token counts a step is padded up to, one captured graph each.

use crate::GraphError;

/// A sorted set of bucket sizes whose largest is the token capacity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buckets {
    sizes: Vec<u32>,
}

impl Buckets {
    /// Buckets from a list (any order, duplicates ignored); the capacity `max_tokens` is added when missing
    /// and sizes above it are an error, as is a zero size.
    pub fn new(sizes: &[u32], max_tokens: u32) -> Result<Self, GraphError> {
        if max_tokens == 0 {
            return Err(GraphError::Config("token capacity must be at least 1".into()));
        }
        if let Some(bad) = sizes.iter().find(|&&s| s == 0 || s > max_tokens) {
            return Err(GraphError::Config(format!("bucket {bad} outside 1..={max_tokens}")));
        }
        let mut sizes = sizes.to_vec();
        sizes.push(max_tokens);
        sizes.sort_unstable();
        sizes.dedup();
        Ok(Buckets { sizes })
    }

    /// The usual decode buckets: 1, 2, 4, then every multiple of 8, up to `max_tokens`.
    pub fn default_for(max_tokens: u32) -> Result<Self, GraphError> {
        let mut sizes: Vec<u32> = [1, 2, 4].into_iter().filter(|&s| s <= max_tokens).collect();
        sizes.extend((8..=max_tokens).step_by(8));
        Buckets::new(&sizes, max_tokens)
    }

    /// The smallest bucket holding `tokens` tokens.
    pub fn choose(&self, tokens: u32) -> Result<u32, GraphError> {
        if tokens == 0 {
            return Err(GraphError::BadStep("a step needs at least one token".into()));
        }
        self.sizes
            .iter()
            .copied()
            .find(|&s| s >= tokens)
            .ok_or_else(|| GraphError::BadStep(format!("{tokens} tokens exceed the capacity of {}", self.capacity())))
    }

    /// All sizes, ascending.
    pub fn sizes(&self) -> &[u32] {
        &self.sizes
    }

    /// The largest bucket (the token capacity).
    pub fn capacity(&self) -> u32 {
        *self.sizes.last().expect("Buckets::new always holds the capacity")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choose_picks_smallest_fitting_bucket() {
        let b = Buckets::new(&[16, 1, 4, 8, 4], 32).unwrap();
        assert_eq!(b.sizes(), &[1, 4, 8, 16, 32]);
        assert_eq!(b.choose(1).unwrap(), 1);
        assert_eq!(b.choose(2).unwrap(), 4);
        assert_eq!(b.choose(9).unwrap(), 16);
        assert_eq!(b.choose(17).unwrap(), 32);
        assert_eq!(b.choose(32).unwrap(), 32);
        assert!(matches!(b.choose(33), Err(GraphError::BadStep(_))));
        assert!(matches!(b.choose(0), Err(GraphError::BadStep(_))));
    }

    #[test]
    fn default_buckets() {
        assert_eq!(Buckets::default_for(40).unwrap().sizes(), &[1, 2, 4, 8, 16, 24, 32, 40]);
        assert_eq!(Buckets::default_for(3).unwrap().sizes(), &[1, 2, 3]);
        assert_eq!(Buckets::default_for(20).unwrap().sizes(), &[1, 2, 4, 8, 16, 20]);
    }

    #[test]
    fn bad_buckets_are_errors() {
        assert!(Buckets::new(&[0, 4], 8).is_err());
        assert!(Buckets::new(&[16], 8).is_err());
        assert!(Buckets::new(&[], 0).is_err());
    }
}
