//! The input buffer of the stream decoders ([`crate::app::StreamDecoder`],
//! [`crate::tcp::FrameDecoder`]): reads append to its end, the decoder consumes from its front,
//! and consumed bytes are dropped once per read rather than once per value.

/// Bytes received and not consumed yet, with room for the next read.
#[derive(Debug, Default)]
pub struct ReadBuffer {
    pub(crate) buf: Vec<u8>,
    /// Start of the bytes not consumed yet.
    pub(crate) pos: usize,
}

impl ReadBuffer {
    /// Drops consumed bytes and returns the buffer for the next read, with at least
    /// `min_spare` bytes of spare capacity (reads append to it).
    pub fn read_buf(&mut self, min_spare: usize) -> &mut Vec<u8> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(min_spare);
        &mut self.buf
    }

    /// Appends bytes (tests and fuzzing).
    pub fn feed(&mut self, bytes: &[u8]) {
        self.read_buf(bytes.len()).extend_from_slice(bytes);
    }

    /// Bytes received but not consumed yet.
    pub fn buffered(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// The bytes not consumed yet.
    pub(crate) fn rest(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }
}
