//! The KV page allocator: a free list over the backend's `num_pages` pages. Pages are handed out to
//! sequences' page tables and returned when a sequence finishes, is aborted or is preempted; an owner
//! bitmap makes double allocation and double free detectable (they are bugs, reported as `false`).

/// Free list of KV pages.
#[derive(Clone, Debug)]
pub struct PageAllocator {
    page_size: u32,
    /// Free page ids; popped from the end (lowest ids first, for readable tests).
    free: Vec<u32>,
    /// `in_use[p]`: page `p` belongs to some sequence.
    in_use: Vec<bool>,
}

impl PageAllocator {
    /// `num_pages` free pages of `page_size` tokens.
    pub fn new(num_pages: u32, page_size: u32) -> Self {
        PageAllocator { page_size, free: (0..num_pages).rev().collect(), in_use: vec![false; num_pages as usize] }
    }

    /// Tokens per page.
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Pages in all.
    pub fn total(&self) -> u32 {
        self.in_use.len() as u32
    }

    /// Free pages.
    pub fn free(&self) -> u32 {
        self.free.len() as u32
    }

    /// Pages in use.
    pub fn used(&self) -> u32 {
        self.total() - self.free()
    }

    /// Pages needed to hold `positions` positions.
    pub fn pages_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.page_size as usize)
    }

    /// Appends `n` pages to `table`, or returns `false` and changes nothing when fewer are free.
    pub fn grow(&mut self, table: &mut Vec<u32>, n: usize) -> bool {
        if n > self.free.len() {
            return false;
        }
        for _ in 0..n {
            if let Some(p) = self.free.pop() {
                self.in_use[p as usize] = true;
                table.push(p);
            }
        }
        true
    }

    /// Returns every page of `table` to the free list and empties it. Returns `false` if some page was
    /// not allocated (a bookkeeping bug; the page is then left alone).
    pub fn release(&mut self, table: &mut Vec<u32>) -> bool {
        let mut ok = true;
        for p in table.drain(..) {
            match self.in_use.get_mut(p as usize) {
                Some(used) if *used => {
                    *used = false;
                    self.free.push(p);
                }
                _ => ok = false,
            }
        }
        ok
    }

    /// Whether page `p` is allocated.
    pub fn is_allocated(&self, p: u32) -> bool {
        self.in_use.get(p as usize).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grow_and_release_round_trip() {
        let mut pages = PageAllocator::new(4, 16);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        assert!(pages.grow(&mut a, 3));
        assert!(!pages.grow(&mut b, 2), "only one page is left");
        assert!(b.is_empty());
        assert!(pages.grow(&mut b, 1));
        assert_eq!(pages.free(), 0);
        let mut all: Vec<u32> = a.iter().chain(&b).copied().collect();
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 3]);
        assert!(pages.release(&mut a));
        assert_eq!(pages.free(), 3);
        let mut again = vec![b[0]];
        assert!(pages.release(&mut b));
        assert!(!pages.release(&mut again), "a double free is reported");
        assert_eq!(pages.free(), 4);
        assert_eq!(pages.pages_for(0), 0);
        assert_eq!(pages.pages_for(17), 2);
    }
}
