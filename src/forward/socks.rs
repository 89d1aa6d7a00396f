//! The server side of SOCKS5 (RFC 1928) that `-D` needs: no authentication, CONNECT only, to an
//! IPv4 or IPv6 address or a domain name (resolved on the VM, as with `ssh -D`, so names only the
//! VM knows work and nothing leaks to the local resolver).
//!
//! Every read is of a fixed size or a length byte (at most 255), so a client cannot make it
//! buffer more than a few hundred bytes; the caller bounds the time with a timeout.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0x00;
const NO_ACCEPTABLE: u8 = 0xff;
const CONNECT: u8 = 0x01;
const ATYP_V4: u8 = 0x01;
const ATYP_NAME: u8 = 0x03;
const ATYP_V6: u8 = 0x04;

/// SOCKS5 reply codes (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    Succeeded = 0x00,
    GeneralFailure = 0x01,
    NotAllowed = 0x02,
    HostUnreachable = 0x04,
    ConnectionRefused = 0x05,
    CommandNotSupported = 0x07,
    AddressNotSupported = 0x08,
}

/// What the client asked to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// An address in text form or a domain name, for the VM to resolve.
    pub host: String,
    pub port: u16,
}

/// Read the greeting and the request. On a request we cannot serve, the refusal is sent before
/// the error returns; on success the caller must [`reply`] once it knows the outcome.
pub async fn accept<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> Result<Request> {
    let [version, n] = read_array(s).await?;
    if version != VERSION {
        bail!("not a SOCKS5 client (version byte {version}; SOCKS4 is not supported)");
    }
    let mut methods = [0u8; 255];
    let methods = &mut methods[..usize::from(n)];
    s.read_exact(methods)
        .await
        .context("short SOCKS5 greeting")?;
    if !methods.contains(&NO_AUTH) {
        s.write_all(&[VERSION, NO_ACCEPTABLE]).await?;
        bail!("the SOCKS5 client offers no method without authentication");
    }
    s.write_all(&[VERSION, NO_AUTH]).await?;

    let [version, cmd, _reserved, atyp] = read_array(s).await?;
    if version != VERSION {
        bail!("bad SOCKS5 request (version byte {version})");
    }
    let host = match atyp {
        ATYP_V4 => Ipv4Addr::from(read_array::<4, _>(s).await?).to_string(),
        ATYP_V6 => Ipv6Addr::from(read_array::<16, _>(s).await?).to_string(),
        ATYP_NAME => {
            let [len] = read_array(s).await?;
            let mut name = [0u8; 255];
            let name = &mut name[..usize::from(len)];
            s.read_exact(name).await.context("short SOCKS5 request")?;
            match std::str::from_utf8(name) {
                Ok(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_graphic()) => n.to_string(),
                _ => {
                    reply(s, Reply::AddressNotSupported).await?;
                    bail!("the SOCKS5 client sent an unusable host name");
                }
            }
        }
        other => {
            reply(s, Reply::AddressNotSupported).await?;
            bail!("the SOCKS5 client sent address type {other}");
        }
    };
    let port = u16::from_be_bytes(read_array(s).await?);
    if cmd != CONNECT {
        reply(s, Reply::CommandNotSupported).await?;
        bail!("the SOCKS5 client asked for command {cmd}; only CONNECT is supported");
    }
    Ok(Request { host, port })
}

/// Send the reply to a request. The bound address is 0.0.0.0:0: the real one is on the VM, and
/// clients do not use it for CONNECT.
pub async fn reply<S: AsyncWrite + Unpin>(s: &mut S, code: Reply) -> Result<()> {
    s.write_all(&[VERSION, code as u8, 0, ATYP_V4, 0, 0, 0, 0, 0, 0])
        .await
        .context("cannot answer the SOCKS5 client")?;
    s.flush().await?;
    Ok(())
}

async fn read_array<const N: usize, S: AsyncRead + Unpin>(s: &mut S) -> Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b).await.context("short SOCKS5 message")?;
    Ok(b)
}

// Tests only: unwrap on in-memory pipes the test built, where a failure is the test failing.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Run the server side on `client_bytes`; return its result and everything it wrote.
    async fn serve(client_bytes: &[u8]) -> (Result<Request>, Vec<u8>) {
        let (mut ours, mut theirs) = tokio::io::duplex(1024);
        theirs.write_all(client_bytes).await.unwrap();
        theirs.shutdown().await.unwrap();
        let got = accept(&mut ours).await;
        if got.is_ok() {
            reply(&mut ours, Reply::Succeeded).await.unwrap();
        }
        drop(ours);
        let mut written = Vec::new();
        theirs.read_to_end(&mut written).await.unwrap();
        (got, written)
    }

    const OK: [u8; 10] = [5, 0, 0, 1, 0, 0, 0, 0, 0, 0];

    #[tokio::test]
    async fn connect_to_ipv4_ipv6_and_names() {
        let (r, w) = serve(&[5, 1, 0, 5, 1, 0, 1, 127, 0, 0, 1, 0x1f, 0x90]).await;
        let want = Request {
            host: "127.0.0.1".into(),
            port: 8080,
        };
        assert_eq!(r.unwrap(), want);
        assert_eq!(w, [&[5u8, 0][..], &OK].concat());

        let mut v6 = vec![5, 2, 2, 0, 5, 1, 0, 4];
        v6.extend_from_slice(&Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&[0, 80]);
        let (r, _) = serve(&v6).await;
        assert_eq!(r.unwrap().host, "::1");

        let mut name = vec![5, 1, 0, 5, 1, 0, 3, 9];
        name.extend_from_slice(b"localhost");
        name.extend_from_slice(&[0x01, 0xbb]);
        let (r, _) = serve(&name).await;
        let want = Request {
            host: "localhost".into(),
            port: 443,
        };
        assert_eq!(r.unwrap(), want);
    }

    #[tokio::test]
    async fn refusals_are_answered_before_the_error() {
        // Only username/password offered.
        let (r, w) = serve(&[5, 1, 2]).await;
        assert!(r.is_err());
        assert_eq!(w, [5, 0xff]);
        // BIND instead of CONNECT.
        let (r, w) = serve(&[5, 1, 0, 5, 2, 0, 1, 1, 2, 3, 4, 0, 1]).await;
        assert!(r.unwrap_err().to_string().contains("only CONNECT"));
        assert_eq!(w[2..4], [5, Reply::CommandNotSupported as u8]);
        // Unknown address type.
        let (r, w) = serve(&[5, 1, 0, 5, 1, 0, 9]).await;
        assert!(r.is_err());
        assert_eq!(w[2..4], [5, Reply::AddressNotSupported as u8]);
        // Empty and non-printable names.
        let (r, _) = serve(&[5, 1, 0, 5, 1, 0, 3, 0, 0, 80]).await;
        assert!(r.is_err());
        let (r, _) = serve(&[5, 1, 0, 5, 1, 0, 3, 2, b'a', b'\n', 0, 80]).await;
        assert!(r.is_err());
    }

    #[tokio::test]
    async fn truncated_or_foreign_input_fails_without_waiting_for_more() {
        // SOCKS4 (version 4).
        let (r, w) = serve(&[4, 1, 0, 80, 127, 0, 0, 1, 0]).await;
        assert!(r.unwrap_err().to_string().contains("SOCKS4"));
        assert!(w.is_empty());
        // Cut inside the method list, inside a name, inside the port.
        for bytes in [
            &[5u8, 3, 0][..],
            &[5, 1, 0, 5, 1, 0, 3, 200, b'a'][..],
            &[5, 1, 0, 5, 1, 0, 1, 1, 2, 3, 4, 0][..],
        ] {
            let (r, _) = serve(bytes).await;
            assert!(r.is_err(), "{bytes:?}");
        }
    }
}
