//! A `Read` over a stream that arrives in pieces from another thread (the agent's upload
//! frames, a layer decoded in the background): the one copy of the buffer-and-refill loop.

use std::io::{self, Read};

/// Reads the pieces `next` returns, in order: `Ok(Some(piece))` is the next piece (empty
/// ones are passed over), `Ok(None)` the end. After the end or an error every read is the
/// end, so no reader ever sees bytes past a failure.
pub struct ChunkReader<F> {
    next: F,
    current: Vec<u8>,
    position: usize,
    finished: bool,
}

impl<F> ChunkReader<F>
where
    F: FnMut() -> io::Result<Option<Vec<u8>>>,
{
    /// A reader of the pieces `next` gives.
    pub fn new(next: F) -> Self {
        ChunkReader {
            next,
            current: Vec::new(),
            position: 0,
            finished: false,
        }
    }
}

impl<F> Read for ChunkReader<F>
where
    F: FnMut() -> io::Result<Option<Vec<u8>>>,
{
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.position == self.current.len() {
            if self.finished {
                return Ok(0);
            }
            match (self.next)() {
                Ok(Some(piece)) => {
                    self.current = piece;
                    self.position = 0;
                }
                Ok(None) => self.finished = true,
                Err(e) => {
                    self.finished = true;
                    return Err(e);
                }
            }
        }
        let n = out.len().min(self.current.len() - self.position);
        out[..n].copy_from_slice(&self.current[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_are_read_in_order_and_an_error_ends_the_stream() {
        let mut pieces = vec![
            Ok(Some(b"ab".to_vec())),
            Ok(Some(Vec::new())),
            Ok(Some(b"cde".to_vec())),
            Ok(None),
        ]
        .into_iter();
        let mut reader = ChunkReader::new(move || pieces.next().unwrap_or(Ok(None)));
        let mut got = Vec::new();
        reader.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"abcde");
        assert_eq!(reader.read(&mut [0; 4]).unwrap(), 0);

        let mut pieces = vec![
            Ok(Some(b"x".to_vec())),
            Err(io::Error::from(io::ErrorKind::ConnectionAborted)),
            Ok(Some(b"after".to_vec())),
        ]
        .into_iter();
        let mut reader = ChunkReader::new(move || pieces.next().unwrap_or(Ok(None)));
        let mut got = Vec::new();
        let err = reader.read_to_end(&mut got).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
        assert_eq!(got, b"x");
        assert_eq!(
            reader.read(&mut [0; 8]).unwrap(),
            0,
            "nothing past the failure"
        );
    }
}
