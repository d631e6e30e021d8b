//! A TCP proxy in front of the broker that can go silent, as a network path does when it starts
//! dropping packets: what is sent through it is neither delivered nor refused, and nothing comes
//! back. Only the connections open at that moment go silent; later ones are forwarded.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::rabbit::amqp_url;

/// Forwards to the broker at `AMQP_URL` until [`stall`](Self::stall)ed; stops when dropped.
pub struct StallingProxy {
    address: SocketAddr,
    /// Cancelled to silence the connections open now, then replaced for the next ones.
    stall: Arc<Mutex<CancellationToken>>,
    accepting: JoinHandle<()>,
}

impl StallingProxy {
    /// Listens on a free local port.
    pub async fn start() -> Self {
        let broker = url::Url::parse(&amqp_url()).unwrap();
        let upstream = format!(
            "{}:{}",
            broker.host_str().unwrap(),
            broker.port().unwrap_or(5672)
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let stall = Arc::new(Mutex::new(CancellationToken::new()));
        let current = Arc::clone(&stall);
        let accepting = tokio::spawn(async move {
            // Dropped with this task when the proxy is: that ends every connection too.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let stalled = current.lock().unwrap().clone();
                connections.spawn(forward(client, upstream.clone(), stalled));
            }
        });
        Self {
            address,
            stall,
            accepting,
        }
    }

    /// `AMQP_URL` with the proxy as its host and port.
    pub fn amqp_url(&self) -> String {
        let mut url = url::Url::parse(&amqp_url()).unwrap();
        url.set_host(Some(&self.address.ip().to_string())).unwrap();
        url.set_port(Some(self.address.port())).unwrap();
        url.to_string()
    }

    /// From now on the connections open now forward nothing, either way, and stay open.
    pub fn stall(&self) {
        let mut current = self.stall.lock().unwrap();
        current.cancel();
        *current = CancellationToken::new();
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

async fn forward(client: TcpStream, upstream: String, stalled: CancellationToken) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    tokio::select! {
        // Checked first on every wake-up, so that nothing sent after the stall gets through.
        biased;
        () = stalled.cancelled() => {
            // Swallow what the client sends until it hangs up; the broker hears none of it.
            let mut sink = vec![0; 64 * 1024];
            while matches!(client_read.read(&mut sink).await, Ok(n) if n > 0) {}
        }
        _ = tokio::io::copy(&mut client_read, &mut server_write) => {}
        _ = tokio::io::copy(&mut server_read, &mut client_write) => {}
    }
}
