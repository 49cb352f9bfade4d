//! systemd's readiness protocol (`sd_notify`, for `Type=notify` and `Type=notify-reload` units):
//! one datagram per state change to the socket `$NOTIFY_SOCKET` names.
//!
//! The binary sends `READY=1` once every port accepts, `RELOADING=1` with `MONOTONIC_USEC=` when a
//! SIGHUP re-read of the secrets begins and `READY=1` when it is done, and `STOPPING=1` when
//! shutdown begins. Without `$NOTIFY_SOCKET` (not under systemd) every call does nothing. A path
//! starting with `@` is an abstract socket, as systemd documents. Sending never blocks: a
//! datagram that cannot be sent is logged and dropped (systemd then times the start out, which is
//! what an operator should see).
//!
//! Once `STOPPING=1` is sent, nothing else is: a reload that ends during the drain (a SIGHUP while
//! stopping) must not tell systemd the service is ready again.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::{Arc, Mutex};

/// The environment variable naming systemd's notification socket.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Sends state changes to systemd, when it asked for them. Cheap to clone.
#[derive(Clone, Default)]
pub struct Notifier {
    socket: Option<Arc<Socket>>,
}

struct Socket {
    datagram: UnixDatagram,
    address: SocketAddr,
    /// Whether `STOPPING=1` was sent; held while sending, so no state can follow it.
    stopped: Mutex<bool>,
}

impl Notifier {
    /// The notifier `socket` (the value of `$NOTIFY_SOCKET`) asks for; `None`: one that does
    /// nothing.
    pub fn new(socket: Option<&str>) -> Self {
        let Some(name) = socket.filter(|name| !name.is_empty()) else {
            return Self::default();
        };
        match connect(name) {
            Ok((datagram, address)) => Self {
                socket: Some(Arc::new(Socket {
                    datagram,
                    address,
                    stopped: Mutex::new(false),
                })),
            },
            Err(error) => {
                tracing::warn!(%error, socket = name, "cannot use $NOTIFY_SOCKET: systemd is not told when the gateway is ready");
                Self::default()
            }
        }
    }

    /// Every port accepts (and, after a reload, the reload is done).
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// A reload (SIGHUP) begins.
    pub fn reloading(&self) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|now| {
                u64::try_from(now.tv_sec()).unwrap_or(0) * 1_000_000
                    + u64::try_from(now.tv_nsec()).unwrap_or(0) / 1_000
            })
            .unwrap_or(0);
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
    }

    /// Shutdown begins: the last state sent.
    pub fn stopping(&self) {
        self.send_and_stop("STOPPING=1", true);
    }

    fn send(&self, state: &str) {
        self.send_and_stop(state, false);
    }

    /// Sends `state` unless `STOPPING=1` was sent; `stop`: this is that state.
    fn send_and_stop(&self, state: &str, stop: bool) {
        let Some(socket) = &self.socket else {
            return;
        };
        let mut stopped = socket
            .stopped
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *stopped {
            return;
        }
        *stopped = stop;
        if let Err(error) = socket.datagram.send_to_addr(state.as_bytes(), &socket.address) {
            tracing::warn!(%error, "cannot notify systemd");
        }
    }
}

/// An unbound datagram socket and the address `name` means (`@…`: abstract).
fn connect(name: &str) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    let address = match name.strip_prefix('@') {
        Some(abstract_name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name.as_bytes())?
        }
        None => SocketAddr::from_pathname(name)?,
    };
    let datagram = UnixDatagram::unbound()?;
    datagram.set_nonblocking(true)?;
    Ok((datagram, address))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_arrive_as_datagrams_on_a_path_and_an_abstract_socket() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("notify");
        let receiver = UnixDatagram::bind(&path).expect("bind");
        let notifier = Notifier::new(path.to_str());
        notifier.ready();
        let mut buffer = [0u8; 256];
        let length = receiver.recv(&mut buffer).expect("a datagram");
        assert_eq!(&buffer[..length], b"READY=1");
        notifier.reloading();
        let length = receiver.recv(&mut buffer).expect("a datagram");
        let text = std::str::from_utf8(&buffer[..length]).expect("text");
        assert!(text.starts_with("RELOADING=1\nMONOTONIC_USEC="), "{text}");
        assert!(
            text.rsplit('=')
                .next()
                .is_some_and(|usec| usec.parse::<u64>().is_ok_and(|usec| usec > 0))
        );

        use std::os::linux::net::SocketAddrExt;
        let name = format!("plextera-gateway-test-{}", std::process::id());
        let receiver =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).expect("addr"))
                .expect("bind");
        let notifier = Notifier::new(Some(&format!("@{name}")));
        notifier.stopping();
        let length = receiver.recv(&mut buffer).expect("a datagram");
        assert_eq!(&buffer[..length], b"STOPPING=1");
        // A reload that ends during the drain says nothing more.
        notifier.reloading();
        notifier.ready();
        notifier.stopping();
        receiver.set_nonblocking(true).expect("nonblocking");
        assert!(receiver.recv(&mut buffer).is_err(), "nothing after STOPPING=1");
        // Not under systemd: nothing to do, nothing fails.
        Notifier::new(None).ready();
    }
}
