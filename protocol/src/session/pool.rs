//! Buffers a session keeps for reuse.

/// Bytes of buffers a session keeps for reuse, and the largest buffer it keeps (a connection's
/// inbox grows to what it buffers, at most its window with flow control).
const POOL_BYTES: usize = 2 * 1024 * 1024;
const POOL_BUFFER_MAX: usize = 1024 * 1024;

/// Buffers of a session kept for reuse: a connection's inbox and send queue take one when they
/// start holding bytes and give it back once drained, so data flows without allocating and an
/// idle connection holds none. The writer empties the pool every ping interval in which it
/// was not used, so an idle session holds none either.
#[derive(Default)]
pub(super) struct Pool {
    bufs: Vec<Vec<u8>>,
    /// Capacity of the buffers in `bufs`.
    bytes: usize,
    used: bool,
}

impl Pool {
    pub(super) fn take(&mut self) -> Vec<u8> {
        self.used = true;
        let b = self.bufs.pop().unwrap_or_default();
        self.bytes -= b.capacity();
        b
    }

    pub(super) fn put(&mut self, mut b: Vec<u8>) {
        let cap = b.capacity();
        if cap > 0 && cap <= POOL_BUFFER_MAX && self.bytes + cap <= POOL_BYTES {
            b.clear();
            self.bytes += cap;
            self.bufs.push(b);
        }
    }

    /// Free the pooled buffers if none was taken since the last call.
    pub(super) fn trim_if_idle(&mut self) {
        if !std::mem::take(&mut self.used) {
            self.bufs = Vec::new();
            self.bytes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_returned_buffer_is_handed_out_again_emptied() {
        let mut pool = Pool::default();
        let mut b = pool.take();
        assert_eq!(
            b.capacity(),
            0,
            "an empty pool hands out an unallocated buffer"
        );
        b.extend_from_slice(&[7; 1000]);
        let cap = b.capacity();
        pool.put(b);
        let again = pool.take();
        assert!(again.is_empty());
        assert_eq!(again.capacity(), cap);
    }

    #[test]
    fn the_pool_keeps_neither_huge_buffers_nor_more_than_its_bound() {
        let mut pool = Pool::default();
        pool.put(Vec::with_capacity(POOL_BUFFER_MAX + 1));
        assert_eq!(pool.bytes, 0, "a buffer over the per-buffer limit is freed");
        for _ in 0..(POOL_BYTES / POOL_BUFFER_MAX + 2) {
            pool.put(Vec::with_capacity(POOL_BUFFER_MAX));
        }
        assert!(pool.bytes <= POOL_BYTES);
        pool.put(Vec::new());
        assert!(
            pool.bufs.iter().all(|b| b.capacity() > 0),
            "empty buffers are not kept"
        );
    }

    #[test]
    fn an_idle_pool_is_emptied_a_used_one_is_kept() {
        let mut pool = Pool::default();
        pool.put(Vec::with_capacity(4096));
        let b = pool.take();
        pool.put(b);
        pool.trim_if_idle();
        assert_eq!(pool.bufs.len(), 1, "used since the last trim: kept");
        pool.trim_if_idle();
        assert!(
            pool.bufs.is_empty() && pool.bytes == 0,
            "idle for a whole period: freed"
        );
    }
}
