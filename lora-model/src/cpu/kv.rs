//! The paged KV cache in host memory: keys (after RoPE) and values as f32, laid out
//! `[page][layer][kv_head][slot_in_page][head_dim]` so that one head's positions within a page are
//! contiguous. Position `p` of a sequence lives in page `pages[p / page_size]`, slot `p % page_size`.

/// Keys and values of every page.
#[derive(Debug)]
pub(crate) struct KvCache {
    pub page_size: usize,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvCache {
    /// A zeroed cache (`num_pages · page_size` positions of every layer).
    pub(crate) fn new(num_pages: usize, page_size: usize, layers: usize, kv_heads: usize, head_dim: usize) -> Self {
        let n = num_pages * page_size * layers * kv_heads * head_dim;
        KvCache { page_size, layers, kv_heads, head_dim, k: vec![0.0; n], v: vec![0.0; n] }
    }

    /// Offset of (page, layer, head, slot).
    #[inline]
    fn offset(&self, page: usize, layer: usize, head: usize, slot: usize) -> usize {
        (((page * self.layers + layer) * self.kv_heads + head) * self.page_size + slot) * self.head_dim
    }

    /// Stores the keys and values (`kv_heads · head_dim` each) of one position.
    pub(crate) fn write(&mut self, page: usize, slot: usize, layer: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        for h in 0..self.kv_heads {
            let o = self.offset(page, layer, h, slot);
            self.k[o..o + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            self.v[o..o + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }

    /// The keys and values of `head` in `layer` for the first `len` slots of `page`
    /// (`len · head_dim` values each).
    #[inline]
    pub(crate) fn page_run(&self, page: usize, layer: usize, head: usize, len: usize) -> (&[f32], &[f32]) {
        let o = self.offset(page, layer, head, 0);
        let n = len * self.head_dim;
        (&self.k[o..o + n], &self.v[o..o + n])
    }

    /// Bytes of host memory the cache holds.
    pub(crate) fn bytes(&self) -> u64 {
        4 * (self.k.len() + self.v.len()) as u64
    }
}
