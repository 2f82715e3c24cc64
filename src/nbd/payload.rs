//! Reading a WRITE's payload off the connection: exactly the payload's bytes, never past
//! it (the next request's header may follow), into a recycled buffer for large payloads
//! ([`crate::block::buffers`]) and a fresh allocation for small ones.
//!
//! Must never: return a payload that the stream did not fill completely (a payload cut
//! short is an error, and its buffer is never shown to anyone).

use std::io;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::aligned::Shelf as _;
use crate::block::buffers::{BufferPool, MIN_RECYCLED};

/// Every way reading a payload fails.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PayloadError {
    /// The stream ended before the payload was complete.
    #[error("stream ended after {received} of {length} payload bytes")]
    Truncated { received: usize, length: usize },
    /// Reading from the stream, or allocating a buffer, failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Reads exactly `length` payload bytes from `reader`.
pub(crate) async fn read_payload<R: AsyncRead + Unpin>(
    pool: &BufferPool,
    reader: &mut R,
    length: usize,
) -> Result<Bytes, PayloadError> {
    if length < MIN_RECYCLED {
        return read_fresh(reader, length).await;
    }
    let mut buffer = pool.take(length);
    let mut filled = 0;
    while filled < length {
        match reader
            .read(&mut buffer.as_mut_slice()[filled..length])
            .await
        {
            Ok(0) => {
                // Old and partial content is not handed out: the buffer goes back.
                pool.give_back(buffer);
                return Err(PayloadError::Truncated {
                    received: filled,
                    length,
                });
            }
            Ok(n) => filled += n,
            Err(e) => {
                pool.give_back(buffer);
                return Err(PayloadError::Io(e));
            }
        }
    }
    Ok(pool.lend(buffer, length))
}

/// Reads a small payload into a new allocation, straight into uninitialised capacity.
async fn read_fresh<R: AsyncRead + Unpin>(
    reader: &mut R,
    length: usize,
) -> Result<Bytes, PayloadError> {
    let mut buf = BytesMut::with_capacity(length);
    let mut limited = reader.take(length as u64);
    while buf.len() < length {
        if limited.read_buf(&mut buf).await? == 0 {
            return Err(PayloadError::Truncated {
                received: buf.len(),
                length,
            });
        }
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    async fn read(pool: &BufferPool, stream: &[u8], length: usize) -> Result<Bytes, PayloadError> {
        let mut reader = stream;
        read_payload(pool, &mut reader, length).await
    }

    #[tokio::test]
    async fn the_reader_stops_at_the_payload() {
        let pool = BufferPool::new(MIB);
        for length in [4096, MIN_RECYCLED, MIB] {
            let mut stream = vec![1u8; length];
            stream.extend_from_slice(b"next header");
            let mut reader = &stream[..];
            let payload = read_payload(&pool, &mut reader, length).await.unwrap();
            assert_eq!(payload.len(), length);
            assert!(payload.iter().all(|&b| b == 1));
            assert_eq!(reader, b"next header");
        }
    }

    #[tokio::test]
    async fn a_recycled_payload_shows_only_its_own_bytes() {
        let pool = BufferPool::new(4 * MIB);
        let first = read(&pool, &vec![0xaa; MIB], MIB).await.unwrap();
        let first_ptr = first.as_ptr();
        drop(first);
        // A shorter payload in the same buffer: nothing of the previous one past its end.
        let stream: Vec<u8> = (0..MIB - 3584).map(|i| (i % 251) as u8).collect();
        let second = read(&pool, &stream, stream.len()).await.unwrap();
        assert_eq!(second.as_ptr(), first_ptr, "the buffer was not reused");
        assert_eq!(&second[..], &stream[..]);
    }

    #[tokio::test]
    async fn a_truncated_payload_is_an_error_and_shows_nothing() {
        let pool = BufferPool::new(4 * MIB);
        drop(read(&pool, &vec![0xbb; MIB], MIB).await.unwrap());
        for length in [4096, MIB] {
            match read(&pool, &vec![0xcc; length / 2], length).await {
                Err(PayloadError::Truncated {
                    received,
                    length: l,
                }) => assert_eq!((received, l), (length / 2, length)),
                other => panic!("expected Truncated, got {other:?}"),
            }
        }
        // The buffer went back to the shelf, and the next payload overwrites it whole.
        assert_eq!(pool.idle(), (1, MIB));
        let next = read(&pool, &vec![0xdd; MIB], MIB).await.unwrap();
        assert!(next.iter().all(|&b| b == 0xdd));
    }
}
