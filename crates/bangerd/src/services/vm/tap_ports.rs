//! Published TCP ports of a TAP-networked VM. slirp's `hostfwd` has no TAP counterpart,
//! so the daemon listens on each published host address itself and relays every
//! connection to the guest's address over the bridge (the guard lets the host open
//! connections to its guests; guests cannot open them to the host).
//!
//! The listeners are bound when the VM starts, before its VMM, so a taken host port fails
//! the start naming it; they close when the VM stops (`release_tap`), and a restarted
//! daemon binds them again for the VMs it re-adopts. Bounded: at most
//! [`MAX_RELAYED_CONNECTIONS`] open connections per published port (one more is closed at
//! once), and a guest that does not accept within [`GUEST_CONNECT_TIMEOUT`] closes the
//! client's connection.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use banger_api::{PortProtocol, PublishedPort};

/// Open relayed connections per published port.
pub const MAX_RELAYED_CONNECTIONS: usize = 256;
/// How long the guest has to accept a relayed connection.
pub const GUEST_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a listener looks at its stop flag between connections.
const ACCEPT_POLL: Duration = Duration::from_millis(100);

/// The connections a listener relays now, by a number of their own: both ends of each,
/// to shut down when the VM stops (a relay removes its entry when it ends).
type OpenRelays = Arc<Mutex<HashMap<u64, [TcpStream; 2]>>>;

/// One published port's listener and the connections it relays.
struct Relay {
    stop: Arc<AtomicBool>,
    open: OpenRelays,
    /// The accept loop, which owns the listener: joined on close, so the host port is
    /// free once the VM's stop returns.
    listener: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    fn close(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(listener) = self.listener.take() {
            let _ = listener.join();
        }
        for (_, ends) in self.open.lock().unwrap().drain() {
            for end in ends {
                let _ = end.shutdown(Shutdown::Both);
            }
        }
    }
}

/// The relays of every TAP VM with published ports, by VM id.
#[derive(Default)]
pub struct TapPorts {
    by_vm: Mutex<HashMap<String, Vec<Relay>>>,
}

impl std::fmt::Debug for TapPorts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.by_vm.lock().map_or(0, |m| m.len());
        write!(f, "TapPorts({n} VMs)")
    }
}

impl TapPorts {
    /// Listens on the host address of each of `ports` (TCP) for VM `vm_id`, relaying to
    /// `guest_ip`. Binds all of them or none: the error names the port that is taken.
    pub fn publish(
        &self,
        vm_id: &str,
        guest_ip: Ipv4Addr,
        ports: &[PublishedPort],
    ) -> anyhow::Result<()> {
        self.unpublish(vm_id);
        let mut listeners = Vec::new();
        for port in ports.iter().filter(|p| p.protocol == PortProtocol::Tcp) {
            let addr = SocketAddr::new(port.host_ip, port.host_port);
            let listener = TcpListener::bind(addr)
                .with_context(|| format!("-p {port}: host address {addr} is not free"))?;
            listener
                .set_nonblocking(true)
                .with_context(|| format!("-p {port}: listen on {addr}"))?;
            listeners.push((
                listener,
                SocketAddr::new(guest_ip.into(), port.guest_port),
                port.to_string(),
            ));
        }
        let relays = listeners
            .into_iter()
            .map(|(listener, guest, port)| {
                let (stop, open): (Arc<AtomicBool>, OpenRelays) = Default::default();
                let (loop_stop, loop_open) = (Arc::clone(&stop), Arc::clone(&open));
                let span = tracing::Span::current();
                let listener = std::thread::spawn(move || {
                    let _entered = span.enter();
                    accept_loop(listener, guest, &port, &loop_stop, &loop_open);
                });
                Relay {
                    stop,
                    open,
                    listener: Some(listener),
                }
            })
            .collect();
        self.by_vm.lock().unwrap().insert(vm_id.to_owned(), relays);
        Ok(())
    }

    /// Closes VM `vm_id`'s listeners and the connections they relay.
    pub fn unpublish(&self, vm_id: &str) {
        // Taken out first: the other VMs' relays are not held up while these close.
        let relays = self.by_vm.lock().unwrap().remove(vm_id);
        for relay in relays.into_iter().flatten() {
            relay.close();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    guest: SocketAddr,
    port: &str,
    stop: &AtomicBool,
    open: &OpenRelays,
) {
    let active = Arc::new(AtomicUsize::new(0));
    let mut next_id = 0u64;
    while !stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(e) => {
                tracing::warn!(%port, error = %e, "published port: accept failed");
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        if active.load(Ordering::SeqCst) >= MAX_RELAYED_CONNECTIONS {
            tracing::warn!(%port, "published port: {MAX_RELAYED_CONNECTIONS} connections open (MAX_RELAYED_CONNECTIONS); one more closed");
            continue;
        }
        active.fetch_add(1, Ordering::SeqCst);
        next_id += 1;
        let (active, open, id) = (Arc::clone(&active), Arc::clone(open), next_id);
        let (span, port) = (tracing::Span::current(), port.to_owned());
        std::thread::spawn(move || {
            let _entered = span.enter();
            if let Err(e) = relay(client, guest, id, &open) {
                tracing::warn!(%port, %guest, error = %e, "published port: cannot relay a connection to the guest");
            }
            open.lock().unwrap().remove(&id);
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

/// Copies bytes both ways between `client` and the guest until both sides are done.
fn relay(client: TcpStream, guest: SocketAddr, id: u64, open: &OpenRelays) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let upstream = TcpStream::connect_timeout(&guest, GUEST_CONNECT_TIMEOUT)?;
    open.lock()
        .unwrap()
        .insert(id, [client.try_clone()?, upstream.try_clone()?]);
    let (mut client_read, mut upstream_write) = (client.try_clone()?, upstream.try_clone()?);
    let inbound = std::thread::spawn(move || {
        let _ = io::copy(&mut client_read, &mut upstream_write);
        let _ = upstream_write.shutdown(Shutdown::Write);
    });
    let (mut upstream_read, mut client_write) = (upstream, client);
    let _ = io::copy(&mut upstream_read, &mut client_write);
    let _ = client_write.shutdown(Shutdown::Write);
    let _ = inbound.join();
    Ok(())
}
