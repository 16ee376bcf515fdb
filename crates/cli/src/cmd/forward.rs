//! `vibebox env port-forward ENV [LOCAL:]REMOTE...`: listens on loopback
//! (`--address` to change) and carries each accepted connection to the
//! remote port inside the environment over its own `PortForward` stream,
//! like `kubectl port-forward`. Runs until Ctrl-C; the failure of one
//! connection is printed and the listeners keep going.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use vibebox_proto::environment::{
    EnvironmentState, GetEnvironmentRequest, PortForwardRequest, PortForwardStart,
    port_forward_request, port_forward_response,
};

use crate::client::{CallError, CallExt, Session};
use crate::cmd::env::resolve_env;

/// Bytes read from a local connection per message.
const CHUNK: usize = 64 * 1024;

#[derive(Args, Debug)]
pub(crate) struct PortForwardArgs {
    /// Local address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    address: IpAddr,
    /// Environment id or name.
    env: String,
    /// Ports: REMOTE (the same port locally), LOCAL:REMOTE, or :REMOTE / 0:REMOTE (a free local port).
    #[arg(required = true, value_name = "[LOCAL:]REMOTE", value_parser = parse_ports)]
    ports: Vec<Ports>,
}

/// One forwarded port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ports {
    /// 0: any free port.
    local: u16,
    remote: u16,
}

fn parse_port(text: &str, what: &str, zero_ok: bool) -> Result<u16, String> {
    match text.parse::<u16>() {
        Ok(0) if !zero_ok => Err(format!("the {what} port must be between 1 and 65535")),
        Ok(port) => Ok(port),
        Err(_) => Err(format!("{text:?} is not a {what} port (0-65535)")),
    }
}

fn parse_ports(text: &str) -> Result<Ports, String> {
    match text.split_once(':') {
        None => {
            let remote = parse_port(text, "remote", false)?;
            Ok(Ports {
                local: remote,
                remote,
            })
        }
        Some((local, remote)) => Ok(Ports {
            local: if local.is_empty() {
                0
            } else {
                parse_port(local, "local", true)?
            },
            remote: parse_port(remote, "remote", false)?,
        }),
    }
}

/// `vibebox env port-forward`.
pub(crate) async fn run(a: PortForwardArgs, session: &Session) -> Result<ExitCode> {
    let id = resolve_env(session, &a.env).await?;
    let env = session
        .environments()
        .get_environment(GetEnvironmentRequest {
            environment_id: id.clone(),
        })
        .await
        .call()?
        .environment
        .unwrap_or_default();
    if env.state() != EnvironmentState::Running {
        bail!(
            "environment {} ({}) is not running (start it with `vibebox env start {}`)",
            env.name,
            env.id,
            env.name
        );
    }
    let mut listeners = Vec::new();
    for ports in &a.ports {
        let listener = TcpListener::bind(SocketAddr::new(a.address, ports.local))
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {}",
                    SocketAddr::new(a.address, ports.local)
                )
            })?;
        let local = listener.local_addr()?;
        println!("Forwarding from {local} -> {}", ports.remote);
        listeners.push((listener, ports.remote));
    }
    for (listener, remote) in listeners {
        let (session, id) = (session.clone(), id.clone());
        tokio::spawn(accept(listener, session, id, remote));
    }
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(ExitCode::SUCCESS)
}

async fn accept(listener: TcpListener, session: Session, id: String, remote: u16) {
    loop {
        match listener.accept().await {
            Ok((conn, peer)) => {
                let (session, id) = (session.clone(), id.clone());
                tokio::spawn(async move {
                    match connection(conn, &session, id, remote).await {
                        Ok(()) => {}
                        // The local client hung up first: nothing to say.
                        Err(e) if local_hang_up(&e) => {}
                        Err(e) => eprintln!("port-forward to {remote} (from {peer}): {e:#}"),
                    }
                });
            }
            Err(e) => {
                eprintln!("accepting on {:?}: {e}", listener.local_addr().ok());
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Whether `e` is the local connection going away (not worth a line).
fn local_hang_up(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|io| {
        matches!(
            io.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        )
    })
}

fn message(m: port_forward_request::Message) -> PortForwardRequest {
    PortForwardRequest { message: Some(m) }
}

/// Carries one local connection over one stream.
async fn connection(conn: TcpStream, session: &Session, id: String, remote: u16) -> Result<()> {
    let _ = conn.set_nodelay(true);
    let (tx, rx) = mpsc::channel::<PortForwardRequest>(8);
    tx.send(message(port_forward_request::Message::Start(
        PortForwardStart {
            environment_id: id,
            port: remote.into(),
        },
    )))
    .await?;
    let mut responses = session
        .environments()
        .port_forward(ReceiverStream::new(rx))
        .await
        .call()?;
    let (mut read, mut write) = conn.into_split();
    // Local -> environment, then a half close.
    let upload = tokio::spawn(async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx
                        .send(message(port_forward_request::Message::CloseWrite(true)))
                        .await;
                    // Keep the request stream open until the response ends
                    // (dropping it is a half close too).
                    tx.closed().await;
                    return;
                }
                Ok(n) => {
                    let data = port_forward_request::Message::Data(buf[..n].to_vec());
                    if tx.send(message(data)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    // Environment -> local; the stream's end is the remote's close.
    let result = async {
        while let Some(response) = responses.message().await.map_err(CallError)? {
            match response.message {
                Some(port_forward_response::Message::Data(data)) => write.write_all(&data).await?,
                Some(port_forward_response::Message::Ready(_)) | None => {}
            }
        }
        let _ = write.shutdown().await;
        anyhow::Ok(())
    }
    .await;
    upload.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_like_kubectl() {
        assert_eq!(
            parse_ports("8080"),
            Ok(Ports {
                local: 8080,
                remote: 8080
            })
        );
        assert_eq!(
            parse_ports("9000:80"),
            Ok(Ports {
                local: 9000,
                remote: 80
            })
        );
        assert_eq!(
            parse_ports(":80"),
            Ok(Ports {
                local: 0,
                remote: 80
            })
        );
        assert_eq!(
            parse_ports("0:80"),
            Ok(Ports {
                local: 0,
                remote: 80
            })
        );
        for bad in ["0", "70000", "x", "80:", "80:0", "-1:80", "1:2:3"] {
            assert!(parse_ports(bad).is_err(), "{bad}");
        }
    }
}
