//! `--health-check`: asks a running gateway's admin port for `/healthz` and exits 0 or 1.
//!
//! For container `HEALTHCHECK`s in images with no shell or curl (distroless): the binary checks
//! itself. A plain blocking HTTP/1.1 exchange with a deadline is all it needs.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

/// How long the whole check may take.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// The address to reach an admin listener bound to `listen` from the same host: an unspecified
/// address (`0.0.0.0`, `::`) is reached through loopback.
pub fn local_address(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

/// `Ok` when `GET /healthz` on `admin` answers 200 within `timeout`.
pub fn check(admin: SocketAddr, timeout: Duration) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&admin, timeout)
        .map_err(|error| format!("cannot connect to {admin}: {error}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|error| error.to_string())?;
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .map_err(|error| format!("cannot send to {admin}: {error}"))?;
    let mut head = [0u8; 64];
    let mut read = 0;
    while read < 12 {
        match stream.read(&mut head[read..]) {
            Ok(0) => break,
            Ok(count) => read += count,
            Err(error) => return Err(format!("no answer from {admin}: {error}")),
        }
    }
    let status_line = String::from_utf8_lossy(&head[..read]);
    match status_line.split(' ').nth(1) {
        Some("200") => Ok(()),
        Some(status) => Err(format!("{admin}/healthz answered {status}")),
        None => Err(format!("{admin}/healthz gave no HTTP status")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_reached_through_loopback() {
        let v4: SocketAddr = "0.0.0.0:9090".parse().expect("addr");
        let v6: SocketAddr = "[::]:9090".parse().expect("addr");
        let set: SocketAddr = "10.1.2.3:9090".parse().expect("addr");
        assert_eq!(local_address(v4), "127.0.0.1:9090".parse().expect("addr"));
        assert_eq!(local_address(v6), "[::1]:9090".parse().expect("addr"));
        assert_eq!(local_address(set), set);
    }

    #[test]
    fn nothing_listening_is_unhealthy() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        assert!(check(addr, Duration::from_millis(500)).is_err());
    }
}
