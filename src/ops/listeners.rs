//! This process's listening sockets, as its file table holds them: which configured addresses
//! really accept connections yet (readiness waits for all of them) and which descriptors hold
//! them (a reload sends those to its successor).

use std::net::SocketAddr;
use std::os::fd::{BorrowedFd, RawFd};
use std::time::Duration;

/// This process's listening TCP sockets, each with the address it is bound to. `None` when the
/// file table cannot be read (no `/proc`), so a caller can tell "none" from "cannot tell".
pub fn listening_sockets() -> Option<Vec<(RawFd, SocketAddr)>> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, SockaddrStorage};
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    let mut sockets = Vec::new();
    for entry in entries.flatten() {
        let Ok(fd) = entry.file_name().to_string_lossy().parse::<RawFd>() else {
            continue;
        };
        // SAFETY: the fd was open when listed and is only borrowed for these two calls; if
        // another thread closed it since, the calls fail or describe whatever took its number,
        // which at worst makes a caller look again.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        if !matches!(getsockopt(&borrowed, sockopt::AcceptConn), Ok(true)) {
            continue;
        }
        let Ok(name) = getsockname::<SockaddrStorage>(fd) else {
            continue;
        };
        let bound = if let Some(v4) = name.as_sockaddr_in() {
            SocketAddr::from(std::net::SocketAddrV4::from(*v4))
        } else if let Some(v6) = name.as_sockaddr_in6() {
            SocketAddr::from(std::net::SocketAddrV6::from(*v6))
        } else {
            continue;
        };
        sockets.push((fd, bound));
    }
    Some(sockets)
}

/// Whether each of `wanted` is one of `bound`, each socket standing for one address. A wanted
/// port 0 (the system picks one) is met by any socket on its IP that no other address took.
pub fn all_listening(wanted: &[SocketAddr], bound: &[SocketAddr]) -> bool {
    let mut free: Vec<SocketAddr> = bound.to_vec();
    // Exact addresses first, so a port-0 address cannot take a socket an exact one needs.
    let exact = wanted.iter().filter(|w| w.port() != 0);
    let any_port = wanted.iter().filter(|w| w.port() == 0);
    for (w, exact) in exact.map(|w| (w, true)).chain(any_port.map(|w| (w, false))) {
        let found = free
            .iter()
            .position(|b| if exact { b == w } else { b.ip() == w.ip() });
        match found {
            Some(i) => {
                free.swap_remove(i);
            }
            None => return false,
        }
    }
    true
}

/// How long to wait for the listeners before giving up: Pingora 0.9 tries a port in use again
/// once a second, 30 times, then gives up on that service without ending the process.
pub const LISTEN_DEADLINE: Duration = Duration::from_secs(40);

/// Waits until each of `wanted` is a listening socket of this process, looking every few
/// milliseconds. Pingora tells a service's dependents that it is ready before it binds its
/// listeners, so without this `/ready` (and systemd's `READY=1`) could say yes before the
/// proxy port accepts. Returns at once when the file table cannot be read; fails with what is
/// still missing after `give_up_after`.
pub async fn until_listening(wanted: &[SocketAddr], give_up_after: Duration) -> Result<(), String> {
    const LOOK_EVERY: Duration = Duration::from_millis(5);
    const WARN_AFTER: Duration = Duration::from_secs(10);
    let started = std::time::Instant::now();
    let mut warned = false;
    loop {
        let Some(sockets) = listening_sockets() else {
            log::warn!("cannot read /proc/self/fd: readiness does not wait for the listeners");
            return Ok(());
        };
        let bound: Vec<SocketAddr> = sockets.into_iter().map(|(_, addr)| addr).collect();
        if all_listening(wanted, &bound) {
            return Ok(());
        }
        let waited = started.elapsed();
        if waited >= give_up_after {
            return Err(format!(
                "not listening on all of {wanted:?} after {give_up_after:?} (listening: {bound:?})"
            ));
        }
        if !warned && waited >= WARN_AFTER {
            log::warn!(
                "still not listening on all of {wanted:?} after {WARN_AFTER:?} \
                 (listening: {bound:?}); /ready answers 503 until then"
            );
            warned = true;
        }
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{
        bind, getsockname, listen, socket, AddressFamily, Backlog, SockFlag, SockType, SockaddrIn,
    };
    use std::os::fd::AsRawFd;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_address_needs_a_socket_of_its_own() {
        let bound = [addr("127.0.0.1:8080"), addr("127.0.0.1:9901")];
        assert!(all_listening(&[addr("127.0.0.1:8080")], &bound));
        assert!(all_listening(
            &[addr("127.0.0.1:9901"), addr("127.0.0.1:8080")],
            &bound
        ));
        assert!(!all_listening(&[addr("127.0.0.1:8443")], &bound));
        assert!(!all_listening(&[addr("0.0.0.0:8080")], &bound));
        assert!(!all_listening(&[addr("[::1]:8080")], &bound));
        assert!(all_listening(&[], &[]));
    }

    #[test]
    fn port_zero_takes_any_port_left_on_its_ip() {
        let bound = [addr("127.0.0.1:8080"), addr("127.0.0.1:40001")];
        assert!(all_listening(
            &[addr("127.0.0.1:0"), addr("127.0.0.1:8080")],
            &bound
        ));
        // Both sockets are taken: the exact address first, whatever the order given.
        assert!(all_listening(
            &[addr("127.0.0.1:0"), addr("127.0.0.1:0")],
            &bound
        ));
        assert!(!all_listening(
            &[
                addr("127.0.0.1:0"),
                addr("127.0.0.1:0"),
                addr("127.0.0.1:8080")
            ],
            &bound
        ));
        assert!(!all_listening(&[addr("10.0.0.1:0")], &bound));
    }

    /// Bound as Pingora binds a listener, before it listens: the state the wait is for.
    fn bound_not_listening() -> (std::os::fd::OwnedFd, SocketAddr) {
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
        let name: SockaddrIn = getsockname(fd.as_raw_fd()).unwrap();
        let at = SocketAddr::from(std::net::SocketAddrV4::from(name));
        (fd, at)
    }

    #[test]
    fn a_bound_socket_counts_once_it_listens() {
        let (fd, at) = bound_not_listening();
        let own = |a: SocketAddr| listening_sockets().unwrap().iter().any(|(_, b)| *b == a);
        assert!(!own(at));
        listen(&fd, Backlog::new(8).unwrap()).unwrap();
        assert!(own(at));
        assert!(listening_sockets()
            .unwrap()
            .iter()
            .any(|(raw, b)| *raw == fd.as_raw_fd() && *b == at));
    }

    #[tokio::test]
    async fn readiness_waits_until_the_port_listens() {
        let (fd, at) = bound_not_listening();
        let wanted = [at];
        let mut waiting = std::pin::pin!(until_listening(&wanted, LISTEN_DEADLINE));
        // Bound but not listening: a connection would be refused, so no answer yet.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut waiting)
                .await
                .is_err(),
            "ready before {at} listens"
        );
        listen(&fd, Backlog::new(8).unwrap()).unwrap();
        tokio::time::timeout(Duration::from_secs(10), &mut waiting)
            .await
            .expect("not ready once the port listens")
            .expect("listening within the deadline");
        std::net::TcpStream::connect(at).expect("the port accepts");
    }

    #[tokio::test]
    async fn a_port_that_never_listens_fails_the_wait() {
        let (_fd, at) = bound_not_listening();
        let err = until_listening(&[at], Duration::from_millis(50))
            .await
            .expect_err("never listening");
        assert!(err.contains(&at.to_string()), "{err}");
    }
}
