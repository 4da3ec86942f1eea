//! A minimal SOCKS5 client (RFC 1928 CONNECT with RFC 1929 user/password), for the
//! bulk, latency and scale work iperf3 and friends cannot route through SOCKS.

use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where to connect: straight to the target, or through a SOCKS5 proxy.
#[derive(Clone, Debug)]
pub enum Dial {
    Direct(SocketAddr),
    Socks5 {
        proxy: u16,
        user: &'static str,
        pass: &'static str,
        target: SocketAddr,
    },
}

impl Dial {
    pub async fn connect(&self) -> Result<TcpStream> {
        match self {
            Dial::Direct(addr) => {
                let s = TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("connect {addr}"))?;
                s.set_nodelay(true)?;
                Ok(s)
            }
            Dial::Socks5 {
                proxy,
                user,
                pass,
                target,
            } => socks5(*proxy, user, pass, *target).await,
        }
    }
}

async fn socks5(proxy: u16, user: &str, pass: &str, target: SocketAddr) -> Result<TcpStream> {
    let mut s = TcpStream::connect(("127.0.0.1", proxy))
        .await
        .with_context(|| format!("connect to the SOCKS5 proxy on port {proxy}"))?;
    s.set_nodelay(true)?;
    s.write_all(&[5, 1, 2]).await?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await?;
    if choice != [5, 2] {
        bail!("SOCKS5 proxy chose method {choice:?}, not user/password");
    }
    let mut auth = vec![1, user.len() as u8];
    auth.extend_from_slice(user.as_bytes());
    auth.push(pass.len() as u8);
    auth.extend_from_slice(pass.as_bytes());
    s.write_all(&auth).await?;
    let mut status = [0u8; 2];
    s.read_exact(&mut status).await?;
    if status[1] != 0 {
        bail!("SOCKS5 authentication refused ({})", status[1]);
    }
    let SocketAddr::V4(v4) = target else {
        bail!("only IPv4 targets are used on loopback");
    };
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    s.write_all(&req).await?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await?;
    if reply[1] != 0 {
        bail!("SOCKS5 CONNECT to {target} refused with reply {}", reply[1]);
    }
    Ok(s)
}
