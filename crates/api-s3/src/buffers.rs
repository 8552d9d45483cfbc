//! Block buffers: the memory budget of all requests together, and the reuse of its
//! buffers.
//!
//! A buffer is taken with a permit of the budget's semaphore and goes back to the free
//! list when dropped, so at most `block_memory / block_size` buffers ever exist,
//! whatever the number of requests, and the allocator never sees the churn of
//! megabyte-sized allocations (which glibc would otherwise keep, freed but resident).

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use s3s::{S3Result, s3_error};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct BlockBuffers {
    budget: Arc<Semaphore>,
    free: Mutex<Vec<Vec<u8>>>,
    block_size: usize,
}

impl BlockBuffers {
    /// A pool of `permits` buffers of `block_size` bytes (allocated on first use).
    pub fn new(permits: usize, block_size: usize) -> Arc<Self> {
        Arc::new(BlockBuffers {
            budget: Arc::new(Semaphore::new(permits)),
            free: Mutex::new(Vec::new()),
            block_size,
        })
    }

    /// Waits for a buffer within the budget. It is empty, with room for one block.
    pub async fn take(self: &Arc<Self>) -> S3Result<BlockBuf> {
        let permit = self
            .budget
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| s3_error!(ServiceUnavailable, "The server is shutting down"))?;
        let buf = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.block_size));
        Ok(BlockBuf {
            buf,
            home: self.clone(),
            _permit: permit,
        })
    }

    /// Buffers that can be taken now without waiting.
    pub fn available(&self) -> usize {
        self.budget.available_permits()
    }
}

/// One block buffer; back to its pool (and its permit to the budget) when dropped.
pub struct BlockBuf {
    buf: Vec<u8>,
    home: Arc<BlockBuffers>,
    _permit: OwnedSemaphorePermit,
}

impl Deref for BlockBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl DerefMut for BlockBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl AsRef<[u8]> for BlockBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for BlockBuf {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        // A buffer that grew past the block size (an old, larger block) is not kept.
        if buf.capacity() <= self.home.block_size * 2 {
            self.home
                .free
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffers_are_reused_and_bounded() {
        let pool = BlockBuffers::new(2, 1024);
        let mut a = pool.take().await.unwrap();
        a.extend_from_slice(&[1; 1000]);
        let ptr = a.as_ptr();
        let _b = pool.take().await.unwrap();
        assert_eq!(pool.available(), 0);
        // A third waits until one is returned.
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), pool.take()).await;
        assert!(waiting.is_err());
        drop(a);
        let c = pool.take().await.unwrap();
        assert!(c.is_empty());
        assert_eq!(c.as_ptr(), ptr, "the returned buffer is reused");
    }
}
