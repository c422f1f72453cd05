use super::*;
use crate::testkit::Rng;

/// An owned [`Event`], to compare whole runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    Head(u16, Framing, bool),
    Body(Vec<u8>),
    End(bool),
}

/// Feeds `bytes` in pieces of `split` bytes (as a socket might deliver
/// them), keeping unused input as a caller must, then the close if `eof`.
/// Body pieces are merged, so runs with different splits compare equal.
fn drive(conn: &mut ClientConn, bytes: &[u8], split: usize, eof: bool) -> Result<Vec<Ev>, ProtoError> {
    let mut out: Vec<Ev> = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let push = |out: &mut Vec<Ev>, ev: Event<'_>| match ev {
        Event::Head(h) => out.push(Ev::Head(h.status, h.framing, h.keep_alive)),
        Event::Data(d) => {
            assert!(!d.is_empty());
            if let Some(Ev::Body(b)) = out.last_mut() {
                b.extend_from_slice(d);
            } else {
                out.push(Ev::Body(d.to_vec()));
            }
        }
        Event::End { keep_alive } => out.push(Ev::End(keep_alive)),
    };
    loop {
        // Bounded: every round either uses bytes, emits, or takes more input.
        let mut rounds = 0;
        loop {
            rounds += 1;
            assert!(rounds < 1_000_000, "no progress");
            let (used, ev) = conn.feed(&buf)?;
            let got = ev.is_some();
            if let Some(ev) = ev {
                push(&mut out, ev);
            }
            buf.drain(..used);
            if !got && used == 0 {
                break;
            }
        }
        if fed == bytes.len() {
            break;
        }
        let n = split.max(1).min(bytes.len() - fed);
        buf.extend_from_slice(&bytes[fed..fed + n]);
        fed += n;
    }
    if eof {
        if let Some(ev) = conn.eof()? {
            push(&mut out, ev);
        }
    }
    Ok(out)
}

fn expect(n: usize) -> ClientConn {
    let mut c = ClientConn::new();
    for _ in 0..n {
        c.sent();
    }
    c
}

fn run(bytes: &[u8], requests: usize, eof: bool) -> Result<Vec<Ev>, ProtoError> {
    let whole = drive(&mut expect(requests), bytes, usize::MAX, eof);
    for split in [1, 2, 3, 7, 64] {
        assert_eq!(drive(&mut expect(requests), bytes, split, eof), whole, "split {split}");
    }
    whole
}

#[test]
fn content_length_bodies_pipelined() {
    let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 404 Not Found\r\ncontent-length:0\r\n\r\n\
HTTP/1.1 206 Partial\r\nContent-Length: 3\r\nContent-Range: bytes 7-9/10\r\nConnection: close\r\n\r\nabc";
    let evs = run(bytes, 3, false).unwrap();
    assert_eq!(
        evs,
        vec![
            Ev::Head(200, Framing::Length(5), true),
            Ev::Body(b"hello".to_vec()),
            Ev::End(true),
            Ev::Head(404, Framing::Length(0), true),
            Ev::End(true),
            Ev::Head(206, Framing::Length(3), false),
            Ev::Body(b"abc".to_vec()),
            Ev::End(false),
        ]
    );
    let mut c = expect(1);
    let head = b"HTTP/1.1 206 P\r\nContent-Length: 3\r\nContent-Range: bytes 7-9/10\r\n\r\n";
    match c.feed(head).unwrap() {
        (n, Some(Event::Head(h))) => {
            assert_eq!(n, head.len());
            assert_eq!(h.range_start, Some(7));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn chunked_with_extensions_and_trailer() {
    let bytes = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;name=v\r\nhello\r\nA \r\n0123456789\r\n0\r\nX-T: 1\r\n\r\n\
HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nz";
    let evs = run(bytes, 2, false).unwrap();
    assert_eq!(
        evs,
        vec![
            Ev::Head(200, Framing::Chunked, true),
            Ev::Body(b"hello0123456789".to_vec()),
            Ev::End(true),
            Ev::Head(200, Framing::Length(1), true),
            Ev::Body(b"z".to_vec()),
            Ev::End(true),
        ]
    );
}

#[test]
fn until_close_bodies_end_at_eof_and_http10_closes() {
    let evs = run(b"HTTP/1.0 200 OK\r\n\r\nall of it", 1, true).unwrap();
    assert_eq!(evs, vec![Ev::Head(200, Framing::UntilClose, false), Ev::Body(b"all of it".to_vec()), Ev::End(false)]);
    let evs = run(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", 1, false).unwrap();
    assert_eq!(evs.last(), Some(&Ev::End(false)));
    let evs = run(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx", 1, false).unwrap();
    assert_eq!(evs.last(), Some(&Ev::End(true)));
}

#[test]
fn interim_and_bodiless_responses() {
    let bytes = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n";
    let evs = run(bytes, 2, false).unwrap();
    assert_eq!(
        evs,
        vec![
            Ev::Head(204, Framing::Length(0), true),
            Ev::End(true),
            Ev::Head(304, Framing::Length(99), true),
            Ev::End(true)
        ]
    );
}

#[test]
fn truncation_is_an_error_naming_where() {
    let cut_body = run(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", 1, true);
    assert_eq!(cut_body, Err(ProtoError::Truncated { in_body: true }));
    let cut_chunk = run(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", 1, true);
    assert_eq!(cut_chunk, Err(ProtoError::Truncated { in_body: true }));
    let cut_head = run(b"HTTP/1.1 200 OK\r\nContent-Len", 1, true);
    assert_eq!(cut_head, Err(ProtoError::Truncated { in_body: false }));
    // A pipelined second response that never came.
    let second = run(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 2, true);
    assert_eq!(second, Err(ProtoError::Truncated { in_body: false }));
    // Nothing expected: a close is just a close.
    assert_eq!(run(b"", 0, true), Ok(vec![]));
}

#[test]
fn hostile_heads_are_refused() {
    let cases: &[(&[u8], ProtoError)] = &[
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n", ProtoError::BadContentLength),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\n", ProtoError::BadContentLength),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", ProtoError::BadContentLength),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\n", ProtoError::BadContentLength),
        (b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\n", ProtoError::BadContentLength),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            ProtoError::UnsupportedEncoding("gzip, chunked".into()),
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            ProtoError::UnsupportedEncoding("chunked".into()),
        ),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", ProtoError::BadChunk("bad chunk size")),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n",
            ProtoError::BadChunk("bad chunk size"),
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
            ProtoError::BadChunk("no CRLF after chunk data"),
        ),
    ];
    for (bytes, want) in cases {
        assert_eq!(run(bytes, 1, false).err().as_ref(), Some(want), "{}", String::from_utf8_lossy(bytes));
    }
    assert!(matches!(run(b"HTTP/9.9 200 OK\r\n\r\n", 1, false), Err(ProtoError::BadHead(_))));
    assert!(matches!(run(b"garbage\r\n\r\n", 1, false), Err(ProtoError::BadHead(_))));
    assert_eq!(run(b"HTTP/1.1 200 OK\r\n\r\n", 0, false), Err(ProtoError::Unsolicited));
    // Length and chunked: chunked wins, and the connection is not reused.
    let evs = run(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 1, false);
    assert_eq!(evs, Ok(vec![Ev::Head(200, Framing::Chunked, false), Ev::End(false)]));
}

#[test]
fn heads_and_lines_are_bounded() {
    let mut big = b"HTTP/1.1 200 OK\r\n".to_vec();
    while big.len() <= MAX_HEAD {
        big.extend_from_slice(b"X-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
    }
    assert_eq!(drive(&mut expect(1), &big, 4096, false), Err(ProtoError::HeadTooLarge));
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        many.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(run(&many, 1, false), Err(ProtoError::HeadTooLarge));
    let mut long_ext = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
    long_ext.extend(std::iter::repeat_n(b'x', 2 * MAX_CHUNK_LINE));
    assert_eq!(run(&long_ext, 1, false), Err(ProtoError::BadChunk("line too long")));
    let mut trailer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n".to_vec();
    for _ in 0..MAX_TRAILER {
        trailer.extend_from_slice(b"T: 1\r\n");
    }
    assert_eq!(run(&trailer, 1, false), Err(ProtoError::BadChunk("line too long")));
}

#[test]
fn requests_are_serialised_and_injection_refused() {
    let mut out = Vec::new();
    write_get(&mut out, "cache.example:8080", "/nar/x.nar.zst", 0, &[]).unwrap();
    let text = String::from_utf8(out.clone()).unwrap();
    assert!(text.starts_with("GET /nar/x.nar.zst HTTP/1.1\r\nHost: cache.example:8080\r\nUser-Agent: nixless/"));
    assert!(text.ends_with("\r\n\r\n") && !text.contains("Range"));
    out.clear();
    write_get(&mut out, "h", "/a", 42, &[("Authorization".into(), "Bearer t".into())]).unwrap();
    let text = String::from_utf8(out.clone()).unwrap();
    assert!(text.contains("\r\nRange: bytes=42-\r\nAuthorization: Bearer t\r\n\r\n"), "{text}");
    for (host, target, extra) in [
        ("h", "/a b", vec![]),
        ("h", "/a\r\nX: y", vec![]),
        ("h", "a", vec![]),
        ("h\r\n", "/a", vec![]),
        ("", "/a", vec![]),
        ("h", "/a", vec![("X: y".to_string(), "z".to_string())]),
        ("h", "/a", vec![("X".to_string(), "z\r\nY: 1".to_string())]),
    ] {
        let mut out = Vec::new();
        assert!(write_get(&mut out, host, target, 0, &extra).is_err(), "{host:?} {target:?} {extra:?}");
        assert!(out.is_empty());
        assert!(write_put(&mut out, host, target, "text/plain", b"x", &extra).is_err());
        assert!(out.is_empty());
    }
}

/// A PUT announces its length and carries the body after the head, the
/// credentials among the fields; a content type cannot smuggle a field.
#[test]
fn puts_carry_their_body_and_length() {
    let mut out = Vec::new();
    let auth = [("Authorization".to_string(), "Basic eDp5".to_string())];
    write_put(&mut out, "gw:9091", "/metrics/job/nixless/host/h", "text/plain; version=0.0.4", b"a 1\n", &auth)
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("PUT /metrics/job/nixless/host/h HTTP/1.1\r\nHost: gw:9091\r\nUser-Agent: nixless/"));
    assert!(
        text.ends_with(
            "\r\nAuthorization: Basic eDp5\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: 4\r\n\r\na 1\n"
        ),
        "{text}"
    );
    let mut out = Vec::new();
    assert!(write_put(&mut out, "h", "/a", "text/plain\r\nX: y", b"", &[]).is_err());
    assert!(out.is_empty());
    // An empty body still says so: without a length the server waits for one.
    write_put(&mut out, "h", "/a", "t/p", b"", &[]).unwrap();
    assert!(String::from_utf8(out).unwrap().ends_with("Content-Length: 0\r\n\r\n"));
}

/// Random bytes, and valid responses with random bytes flipped, cut or
/// spliced, fed in random pieces: never a panic, never a hang, and any
/// body delivered is within what a head announced.
#[test]
fn hostile_bytes_never_panic_or_hang() {
    let seeds: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nT: x\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\nrest",
        b"HTTP/1.1 206 P\r\nContent-Range: bytes 1-2/3\r\nContent-Length: 2\r\n\r\nab",
    ];
    let alphabet = b"HTTP/1.0 2345\r\n:;chunkedContent-Length0123456789abcdefTransfer-Encoding, \t";
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    for round in 0..20_000 {
        let mut bytes = match round % 3 {
            0 => (0..rng.below(300)).map(|_| rng.next() as u8).collect::<Vec<u8>>(),
            1 => (0..rng.below(300)).map(|_| alphabet[rng.below(alphabet.len())]).collect(),
            _ => seeds[rng.below(seeds.len())].to_vec(),
        };
        for _ in 0..rng.below(4) {
            if bytes.is_empty() {
                break;
            }
            let i = rng.below(bytes.len());
            match rng.below(3) {
                0 => bytes[i] = alphabet[rng.below(alphabet.len())],
                1 => bytes.truncate(i),
                _ => {
                    let other = seeds[rng.below(seeds.len())];
                    bytes.splice(i..i, other.iter().copied());
                }
            }
        }
        let requests = rng.below(3);
        let split = 1 + rng.below(40);
        let mut c = expect(requests);
        if let Ok(evs) = drive(&mut c, &bytes, split, rng.below(2) == 0) {
            let mut announced = 0u64;
            for ev in &evs {
                match ev {
                    Ev::Head(_, Framing::Length(n), _) => announced = *n,
                    Ev::Head(..) => announced = u64::MAX,
                    Ev::Body(b) => assert!(b.len() as u64 <= announced, "round {round}"),
                    Ev::End(_) => {}
                }
            }
        }
    }
}
