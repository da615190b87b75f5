//! A small HTTP/1.1 client for the speech API tests: one request per connection, chunked
//! bodies decoded.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use serde_json::Value;

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// A chunked body ended with its final chunk.
    pub complete: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

pub fn request(addr: &str, raw: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    s.write_all(raw).unwrap();
    read_response(&mut BufReader::new(s))
}

/// One response from a connection that may carry more (keep-alive).
pub fn read_response(r: &mut BufReader<TcpStream>) -> Response {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (n, v) = l.split_once(':').unwrap();
        headers.push((n.trim().to_string(), v.trim().to_string()));
    }
    let mut res = Response {
        status,
        headers,
        body: Vec::new(),
        complete: false,
    };
    if res.header("transfer-encoding") == Some("chunked") {
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap() == 0 {
                break; // cut short
            }
            let n = usize::from_str_radix(line.trim_end(), 16).unwrap();
            if n == 0 {
                // The (empty) trailer ends the body.
                line.clear();
                r.read_line(&mut line).unwrap();
                res.complete = true;
                break;
            }
            let mut data = vec![0; n + 2];
            r.read_exact(&mut data).unwrap();
            res.body.extend_from_slice(&data[..n]);
        }
    } else if let Some(n) = res.header("content-length") {
        // Keep-alive: the body is exactly that long.
        res.body = vec![0; n.parse().unwrap()];
        r.read_exact(&mut res.body).unwrap();
    } else {
        r.read_to_end(&mut res.body).unwrap();
    }
    res
}

pub fn post(addr: &str, body: &str) -> Response {
    post_to(addr, "/v1/audio/speech", body)
}

pub fn post_to(addr: &str, path: &str, body: &str) -> Response {
    request(
        addr,
        format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

pub fn get(addr: &str, path: &str) -> Response {
    request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
    )
}
