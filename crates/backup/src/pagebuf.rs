//! Buffers for chunks on their way to a target: their bytes start on a page
//! boundary and can be padded to whole pages, so a local target writes them
//! with direct I/O (no copy into the page cache); room for a sealed file's
//! header is kept in front of the chunk's bytes, so sealing needs no copy
//! either. A [`Pool`] hands the same buffers out again: a backup touches the
//! same few pages over and over, not fresh ones for every chunk.

use std::sync::{Arc, Mutex};

/// The alignment (and granularity) of direct I/O this code relies on.
pub const PAGE: usize = 4096;

/// Bytes starting on a page boundary, in memory that is never reallocated.
pub struct PageBuf {
    /// `PAGE` bytes more than the capacity, so that an aligned start exists.
    mem: Vec<u8>,
    /// Where the aligned bytes start in `mem`.
    off: usize,
    len: usize,
    /// Where the memory goes back to when the buffer is dropped.
    home: Option<Arc<Pool>>,
}

impl PageBuf {
    /// An empty buffer holding up to `capacity` bytes (rounded up to pages).
    pub fn new(capacity: usize) -> PageBuf {
        PageBuf::from_mem(vec![0u8; capacity.div_ceil(PAGE) * PAGE + PAGE], None)
    }

    fn from_mem(mem: Vec<u8>, home: Option<Arc<Pool>>) -> PageBuf {
        let off = mem.as_ptr().align_offset(PAGE).min(PAGE);
        PageBuf {
            mem,
            off,
            len: 0,
            home,
        }
    }

    /// How many bytes it can hold: a whole number of pages.
    pub fn capacity(&self) -> usize {
        (self.mem.len() - PAGE) / PAGE * PAGE
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets the length, within the capacity; bytes beyond the old length
    /// hold whatever the memory held.
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity());
    }

    /// Appends as much of `bytes` as there is room for; how much that was.
    pub fn fill(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.capacity() - self.len);
        let at = self.off + self.len;
        self.mem[at..at + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        n
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.mem[self.off..self.off + self.len]
    }

    /// Room past the length, up to the capacity.
    #[cfg(test)]
    pub fn spare_mut(&mut self) -> &mut [u8] {
        let end = self.off + self.capacity();
        &mut self.mem[self.off + self.len..end]
    }

    /// The bytes, zero-padded to a whole number of pages (for direct I/O,
    /// after which the file is cut to [`len`](Self::len)).
    pub fn padded(&mut self) -> &[u8] {
        let end = self.off + self.len.div_ceil(PAGE) * PAGE;
        self.mem[self.off + self.len..end].fill(0);
        &self.mem[self.off..end]
    }
}

impl AsRef<[u8]> for PageBuf {
    fn as_ref(&self) -> &[u8] {
        &self.mem[self.off..self.off + self.len]
    }
}

impl std::ops::Deref for PageBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_ref()
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        if let Some(pool) = self.home.take() {
            pool.give_back(std::mem::take(&mut self.mem));
        }
    }
}

/// Buffers of one size, handed out again once dropped; at most `keep` wait
/// unused, so an idle pool holds a bounded amount of memory.
pub struct Pool {
    capacity: usize,
    keep: usize,
    free: Mutex<Vec<Vec<u8>>>,
}

impl Pool {
    /// A pool of buffers holding `capacity` bytes each.
    pub fn new(capacity: usize, keep: usize) -> Arc<Pool> {
        Arc::new(Pool {
            capacity: capacity.div_ceil(PAGE) * PAGE,
            keep,
            free: Mutex::new(Vec::new()),
        })
    }

    /// An empty buffer: one given back earlier, or a new one.
    pub fn take(self: &Arc<Self>) -> PageBuf {
        let old = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mem = old.unwrap_or_else(|| vec![0u8; self.capacity + PAGE]);
        PageBuf::from_mem(mem, Some(self.clone()))
    }

    fn give_back(&self, mem: Vec<u8>) {
        if mem.len() != self.capacity + PAGE {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.keep {
            free.push(mem);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_start_on_a_page_and_pad_with_zeros() {
        let pool = Pool::new(3 * PAGE + 5, 2);
        let mut b = pool.take();
        assert_eq!(b.capacity(), 4 * PAGE);
        assert_eq!(b.as_ptr() as usize % PAGE, 0);
        assert_eq!(b.fill(&[7u8; 5000]), 5000);
        // Stale bytes past the length are not written out as padding.
        b.spare_mut()[..10].fill(9);
        let padded = b.padded();
        assert_eq!(padded.len(), 2 * PAGE);
        assert!(padded[..5000].iter().all(|&x| x == 7));
        assert!(padded[5000..].iter().all(|&x| x == 0));
        // Never more than the capacity.
        assert_eq!(b.fill(&vec![1u8; 4 * PAGE]), 4 * PAGE - 5000);
        assert_eq!(b.len(), 4 * PAGE);
        b.set_len(1 << 30);
        assert_eq!(b.len(), 4 * PAGE);
    }

    #[test]
    fn dropped_buffers_are_handed_out_again_up_to_the_limit() {
        let pool = Pool::new(PAGE, 1);
        let (a, b) = (pool.take(), pool.take());
        let at = a.mem.as_ptr();
        drop(a);
        drop(b); // beyond `keep`: freed
        assert_eq!(pool.free.lock().unwrap().len(), 1);
        let c = pool.take();
        assert_eq!(c.mem.as_ptr(), at);
        assert!(c.is_empty());
        assert_eq!(c.as_ptr() as usize % PAGE, 0);
    }
}
