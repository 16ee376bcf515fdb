//! `gate connect HOST PORT`: one TCP connection over stdio. Two threads
//! copy with large buffers; each direction's end is passed on as a half
//! close. A failed connect prints one line on stderr and exits 1 before
//! anything is written to stdout.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::time::Duration;

const BUFFER: usize = 64 * 1024;

pub(crate) fn run(args: &[String]) -> i32 {
    let [host, port] = args else {
        eprintln!("usage: gate connect HOST PORT");
        return 2;
    };
    let Ok(port) = port.parse::<u16>() else {
        eprintln!("invalid port {port:?}");
        return 2;
    };
    let addrs = match (host.as_str(), port).to_socket_addrs() {
        Ok(a) => a.collect::<Vec<_>>(),
        Err(e) => {
            eprintln!("cannot resolve {host}: {e}");
            return 1;
        }
    };
    let mut last = None;
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let Some(stream) = stream else {
        let why = last.map(|e| e.to_string()).unwrap_or_default();
        eprintln!("connect to port {port} failed: {why}");
        return 1;
    };
    let _ = stream.set_nodelay(true);
    let Ok(upstream) = stream.try_clone() else {
        eprintln!("cannot clone the connection");
        return 1;
    };
    // stdin -> connection, then half close.
    let writer = std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut conn = upstream;
        let mut buf = vec![0u8; BUFFER];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = conn.shutdown(Shutdown::Write);
    });
    // connection -> stdout.
    let mut conn = stream;
    let mut stdout = std::io::stdout().lock();
    let mut buf = vec![0u8; BUFFER];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stdout.write_all(&buf[..n]).is_err() || stdout.flush().is_err() {
                    break;
                }
            }
        }
    }
    let _ = stdout.flush();
    drop(stdout);
    // The remote side is done: nothing more can be delivered, so the
    // process ends even if stdin stays open.
    let _ = conn.shutdown(Shutdown::Both);
    if writer.is_finished() {
        let _ = writer.join();
    }
    0
}
