//! The framed, versioned protocol between the host and sandbox worker processes.
//!
//! Every message travels in one frame:
//!
//! ```text
//! ┌──────────────┬───────────────┬──────────┬────────────────────────────┐
//! │ length: u32  │ version: u16  │ tag: u8  │ body: postcard (length-3)  │
//! │ little end.  │ little endian │          │                            │
//! └──────────────┴───────────────┴──────────┴────────────────────────────┘
//! ```
//!
//! `length` counts the bytes after itself. A frame longer than [`MAX_FRAME`], a version other
//! than [`VERSION`], an unknown tag, a body that does not decode, or a stream that ends inside
//! a frame is a [`WireError`]: the decoder never panics and never waits for bytes that a
//! declared length does not promise.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Protocol version spoken by this build.
pub const VERSION: u16 = 1;

/// Largest frame accepted (payloads above this are refused before reading them).
pub const MAX_FRAME: u32 = 16 << 20;

const HEADER: usize = 3;

/// A protocol error.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    /// The declared length is above [`MAX_FRAME`] (or below the header size).
    #[error("frame length {len} outside 3..={max}")]
    BadLength {
        /// Declared length.
        len: u32,
        /// The limit.
        max: u32,
    },
    /// The stream ended inside a frame.
    #[error("truncated frame: expected {expected} bytes, got {got}")]
    Truncated {
        /// Bytes the frame declared.
        expected: usize,
        /// Bytes that arrived.
        got: usize,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version {found}, expected {expected}")]
    Version {
        /// What the frame said.
        found: u16,
        /// What we speak.
        expected: u16,
    },
    /// The type tag is not one of ours.
    #[error("unknown message tag {0}")]
    UnknownTag(u8),
    /// The body does not decode as the tagged type.
    #[error("malformed message body: {0}")]
    Body(String),
    /// Reading or writing the pipe failed.
    #[error("pipe error: {0}")]
    Io(String),
}

/// Host → worker: run one job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    /// Job number, echoed in the answer.
    pub job: u64,
    /// Agent kind to run.
    pub kind: String,
    /// Lane the worker serves (0 = A, 1 = B, 2 = C), visible to the agent.
    pub lane: u8,
    /// Time limit in milliseconds.
    pub timeout_ms: u64,
    /// The task payload.
    pub payload: Bytes,
}

/// Worker → host: the worker is up and serves these kinds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ready {
    /// Kinds it can run.
    pub kinds: Vec<String>,
}

/// How a job ended in the worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobResult {
    /// The handler's output.
    Ok(Bytes),
    /// The handler's error.
    Error(String),
    /// The handler panicked (the worker rebuilt the agent).
    Panic(String),
    /// The worker's own timer fired first.
    Timeout,
    /// The worker cannot run this kind.
    UnknownKind(String),
}

/// Worker → host: a job's result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Done {
    /// The job number from [`Run`].
    pub job: u64,
    /// What happened.
    pub result: JobResult,
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Tag 1.
    Run(Run),
    /// Tag 2: finish the current job and exit.
    Shutdown,
    /// Tag 3.
    Ready(Ready),
    /// Tag 4.
    Done(Done),
}

impl Frame {
    fn tag(&self) -> u8 {
        match self {
            Frame::Run(_) => 1,
            Frame::Shutdown => 2,
            Frame::Ready(_) => 3,
            Frame::Done(_) => 4,
        }
    }
}

fn body<T: Serialize>(v: &T) -> Result<Vec<u8>, WireError> {
    postcard::to_allocvec(v).map_err(|e| WireError::Body(e.to_string()))
}

/// Encodes a frame, length prefix included.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, WireError> {
    let payload = match frame {
        Frame::Run(r) => body(r)?,
        Frame::Shutdown => Vec::new(),
        Frame::Ready(r) => body(r)?,
        Frame::Done(d) => body(d)?,
    };
    let len = u32::try_from(HEADER + payload.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME)
        .ok_or(WireError::BadLength {
            len: u32::MAX,
            max: MAX_FRAME,
        })?;
    let mut out = Vec::with_capacity(4 + len as usize);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.push(frame.tag());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes one frame from the bytes after its length prefix.
pub fn decode(frame: &[u8]) -> Result<Frame, WireError> {
    if frame.len() < HEADER {
        return Err(WireError::Truncated {
            expected: HEADER,
            got: frame.len(),
        });
    }
    let version = u16::from_le_bytes([frame[0], frame[1]]);
    if version != VERSION {
        return Err(WireError::Version {
            found: version,
            expected: VERSION,
        });
    }
    let body = &frame[HEADER..];
    fn de<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, WireError> {
        let (v, rest) = postcard::take_from_bytes(b).map_err(|e| WireError::Body(e.to_string()))?;
        if rest.is_empty() {
            Ok(v)
        } else {
            Err(WireError::Body(format!("{} trailing bytes", rest.len())))
        }
    }
    match frame[2] {
        1 => Ok(Frame::Run(de(body)?)),
        2 if body.is_empty() => Ok(Frame::Shutdown),
        2 => Err(WireError::Body("shutdown carries no body".into())),
        3 => Ok(Frame::Ready(de(body)?)),
        4 => Ok(Frame::Done(de(body)?)),
        t => Err(WireError::UnknownTag(t)),
    }
}

/// Decodes a whole buffer holding exactly one length-prefixed frame.
pub fn decode_prefixed(buf: &[u8]) -> Result<Frame, WireError> {
    if buf.len() < 4 {
        return Err(WireError::Truncated {
            expected: 4,
            got: buf.len(),
        });
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
    check_len(len)?;
    let rest = &buf[4..];
    if rest.len() < len as usize {
        return Err(WireError::Truncated {
            expected: len as usize,
            got: rest.len(),
        });
    }
    if rest.len() > len as usize {
        return Err(WireError::Body(format!(
            "{} bytes after the frame",
            rest.len() - len as usize
        )));
    }
    decode(rest)
}

fn check_len(len: u32) -> Result<(), WireError> {
    if (HEADER as u32..=MAX_FRAME).contains(&len) {
        Ok(())
    } else {
        Err(WireError::BadLength {
            len,
            max: MAX_FRAME,
        })
    }
}

/// Reads one frame. `Ok(None)` is a clean end of stream between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, WireError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r
            .read(&mut len[got..])
            .await
            .map_err(|e| WireError::Io(e.to_string()))?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(WireError::Truncated { expected: 4, got })
            };
        }
        got += n;
    }
    let len = u32::from_le_bytes(len);
    check_len(len)?;
    let mut buf = vec![0u8; len as usize];
    let mut got = 0;
    while got < buf.len() {
        let n = r
            .read(&mut buf[got..])
            .await
            .map_err(|e| WireError::Io(e.to_string()))?;
        if n == 0 {
            return Err(WireError::Truncated {
                expected: buf.len(),
                got,
            });
        }
        got += n;
    }
    decode(&buf).map(Some)
}

/// Writes one frame and flushes.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), WireError> {
    let bytes = encode(frame)?;
    w.write_all(&bytes)
        .await
        .map_err(|e| WireError::Io(e.to_string()))?;
    w.flush().await.map_err(|e| WireError::Io(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Frame> {
        vec![
            Frame::Run(Run {
                job: 7,
                kind: "compute".into(),
                lane: 2,
                timeout_ms: 1500,
                payload: Bytes::from_static(b"\x00\xffpayload"),
            }),
            Frame::Shutdown,
            Frame::Ready(Ready {
                kinds: vec!["echo".into(), "io".into()],
            }),
            Frame::Done(Done {
                job: u64::MAX,
                result: JobResult::Panic("boom".into()),
            }),
            Frame::Done(Done {
                job: 1,
                result: JobResult::Ok(Bytes::new()),
            }),
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in samples() {
            let bytes = encode(&f).unwrap();
            assert_eq!(decode_prefixed(&bytes), Ok(f));
        }
    }

    #[test]
    fn a_wrong_version_or_tag_is_refused() {
        let mut bytes = encode(&Frame::Shutdown).unwrap();
        bytes[4] = 9;
        assert_eq!(
            decode_prefixed(&bytes),
            Err(WireError::Version {
                found: 9,
                expected: VERSION
            })
        );
        let mut bytes = encode(&Frame::Shutdown).unwrap();
        bytes[6] = 77;
        assert_eq!(decode_prefixed(&bytes), Err(WireError::UnknownTag(77)));
        let huge = (MAX_FRAME + 1).to_le_bytes();
        // The length is judged before any body is awaited.
        assert!(matches!(
            decode_prefixed(&huge),
            Err(WireError::BadLength { .. })
        ));
        let mut huge = huge.to_vec();
        huge.extend_from_slice(&[0; 8]);
        assert!(matches!(
            decode_prefixed(&huge),
            Err(WireError::BadLength { .. })
        ));
    }

    #[tokio::test]
    async fn a_stream_cut_inside_a_frame_is_truncated_not_a_hang() {
        let bytes = encode(&samples()[0]).unwrap();
        for cut in 1..bytes.len() {
            let mut r = &bytes[..cut];
            let got = read_frame(&mut r).await;
            assert!(
                matches!(got, Err(WireError::Truncated { .. })),
                "cut {cut}: {got:?}"
            );
        }
        let mut empty: &[u8] = &[];
        assert_eq!(read_frame(&mut empty).await, Ok(None));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic the decoder: they decode or give a typed error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_prefixed(&bytes);
            let _ = decode(&bytes);
        }

        /// Flipping any byte of a valid frame gives the same frame back or a typed error.
        #[test]
        fn corrupted_frames_fail_cleanly(which in 0usize..5, pos in any::<prop::sample::Index>(), val in any::<u8>()) {
            let mut bytes = encode(&samples()[which]).unwrap();
            let i = pos.index(bytes.len());
            bytes[i] = val;
            let _ = decode_prefixed(&bytes);
        }

        /// Any run job survives the round trip.
        #[test]
        fn run_frames_round_trip(job in any::<u64>(), kind in "[a-z_]{0,20}", lane in 0u8..3,
                                 timeout_ms in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let f = Frame::Run(Run { job, kind, lane, timeout_ms, payload: Bytes::from(payload) });
            prop_assert_eq!(decode_prefixed(&encode(&f).unwrap()), Ok(f));
        }
    }
}
