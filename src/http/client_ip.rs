//! The real client address behind trusted proxies (nginx).
//!
//! `X-Forwarded-For` is believed only when the direct peer is listed in
//! `DUET_TRUSTED_PROXIES`; then the rightmost address that is not itself a
//! trusted proxy is the client. Anyone else could forge the header.

use std::net::IpAddr;

use actix_web::http::header::HeaderMap;

use crate::config::IpNet;

/// `peer` is the TCP peer (unknown only for a socket without an address).
pub fn client_ip(peer: Option<IpAddr>, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = peer.unwrap_or(IpAddr::from([0, 0, 0, 0]));
    from_parts(peer, headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()), trusted)
}

/// The client behind an HTTP request.
pub fn request_ip(req: &actix_web::HttpRequest, trusted: &[IpNet]) -> IpAddr {
    client_ip(req.peer_addr().map(|a| a.ip()), req.headers(), trusted)
}

fn from_parts(peer: IpAddr, forwarded: Option<&str>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let Some(list) = forwarded else { return peer };
    let mut client = peer;
    for hop in list.rsplit(',') {
        match hop.trim().parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(ip) {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        IpNet { addr: a.parse().expect("ip"), prefix: p.parse().expect("prefix") }
    }

    #[test]
    fn forwarded_only_from_trusted_peers() {
        let trusted = [net("127.0.0.1")];
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert_eq!(from_parts(ip("127.0.0.1"), Some("203.0.113.5"), &trusted), ip("203.0.113.5"));
        assert_eq!(from_parts(ip("198.51.100.1"), Some("203.0.113.5"), &trusted), ip("198.51.100.1"));
        // A client-supplied left part cannot win over what the proxy appended.
        assert_eq!(from_parts(ip("127.0.0.1"), Some("1.1.1.1, 203.0.113.5"), &trusted), ip("203.0.113.5"));
        assert_eq!(from_parts(ip("127.0.0.1"), None, &trusted), ip("127.0.0.1"));
        assert_eq!(from_parts(ip("127.0.0.1"), Some("garbage"), &trusted), ip("127.0.0.1"));
    }
}
