//! The API client: one HTTP/1.1 request per TLS connection (joins, renewals and admin calls are
//! rare), with connect and request timeouts.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::ErrorBody;

/// Errors of API calls.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed or timed out.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The TLS handshake failed (e.g. the CA pin did not match).
    #[error("TLS handshake with {addr} failed: {reason}")]
    Tls {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{status}: {message}")]
    Status {
        /// HTTP status.
        status: u16,
        /// The server's message.
        message: String,
    },
    /// Anything else (protocol, decoding, timeout).
    #[error("{0}")]
    Other(String),
}

/// A client of one meshd API server.
#[derive(Clone)]
pub struct ApiClient {
    addr: String,
    server_name: ServerName<'static>,
    tls: Arc<ClientConfig>,
    timeout: Duration,
}

impl ApiClient {
    /// A client for `server` (`host:port`) with `tls`.
    pub fn new(server: &str, tls: Arc<ClientConfig>) -> Result<Self, ClientError> {
        let (host, _port) = split_host_port(server).ok_or_else(|| {
            ClientError::Other(format!("--server {server:?}: expected HOST:PORT"))
        })?;
        let server_name = ServerName::try_from(host.to_owned()).map_err(|_| {
            ClientError::Other(format!(
                "--server {server:?}: {host:?} is not a valid host name or address"
            ))
        })?;
        Ok(ApiClient {
            addr: server.to_owned(),
            server_name,
            tls,
            timeout: Duration::from_secs(15),
        })
    }

    /// Sends a request; decodes a JSON answer.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(self.timeout, self.call_inner(method, path, body))
            .await
            .map_err(|_| {
                ClientError::Other(format!(
                    "{} {path}: no answer within {:?}",
                    self.addr, self.timeout
                ))
            })?
    }

    /// A TCP + TLS connection with an HTTP/1.1 sender on it.
    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        let tcp = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|e| ClientError::Connect {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
        let tls = connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| ClientError::Tls {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| ClientError::Other(e.to_string()))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn call_inner<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let mut sender = self.connect().await?;
        let bytes = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::Other(e.to_string()))?,
            None => Vec::new(),
        };
        if bytes.len() > super::MAX_BODY {
            return Err(ClientError::Other(format!(
                "{path}: a request of {} bytes exceeds the API's {}-byte limit",
                bytes.len(),
                super::MAX_BODY
            )));
        }
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.addr.as_str())
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| ClientError::Other(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Other(e.to_string()))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), 4 * 1024 * 1024)
            .collect()
            .await
            .map_err(|e| ClientError::Other(format!("reading the answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Status {
                status: status.as_u16(),
                message,
            });
        }
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Other(format!("malformed answer: {e}")))
    }
}

impl ApiClient {
    /// Opens `GET /v1/peers/watch` and streams its events. The channel ends (after an `Err`) when
    /// the connection breaks or stays silent for longer than three heartbeats; the caller keeps its
    /// peers and reconnects.
    pub async fn watch_peers(
        &self,
    ) -> Result<tokio::sync::mpsc::Receiver<Result<super::PeerEvent, ClientError>>, ClientError>
    {
        let setup = async {
            let mut sender = self.connect().await?;
            let req = Request::builder()
                .method(Method::GET)
                .uri("/v1/peers/watch")
                .header("host", self.addr.as_str())
                .body(Full::new(Bytes::new()))
                .map_err(|e| ClientError::Other(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| ClientError::Other(e.to_string()))?;
            Ok::<_, ClientError>(resp)
        };
        let resp = tokio::time::timeout(self.timeout, setup)
            .await
            .map_err(|_| {
                ClientError::Other(format!(
                    "{}: no answer within {:?}",
                    self.addr, self.timeout
                ))
            })??;
        let status = resp.status();
        if !status.is_success() {
            let body = Limited::new(resp.into_body(), 64 * 1024)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let message = serde_json::from_slice::<ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(ClientError::Status {
                status: status.as_u16(),
                message,
            });
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let mut body = resp.into_body();
        tokio::spawn(async move {
            let mut buf: Vec<u8> = Vec::new();
            loop {
                let frame = match tokio::time::timeout(Duration::from_secs(45), body.frame()).await
                {
                    Err(_) => {
                        let _ = tx
                            .send(Err(ClientError::Other(
                                "peer stream silent for 45 s".into(),
                            )))
                            .await;
                        return;
                    }
                    Ok(None) => {
                        let _ = tx
                            .send(Err(ClientError::Other(
                                "peer stream closed by the server".into(),
                            )))
                            .await;
                        return;
                    }
                    Ok(Some(Err(e))) => {
                        let _ = tx
                            .send(Err(ClientError::Other(format!("peer stream: {e}"))))
                            .await;
                        return;
                    }
                    Ok(Some(Ok(f))) => f,
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                if buf.len() > 64 * 1024 * 1024 {
                    let _ = tx
                        .send(Err(ClientError::Other(
                            "peer stream: a line over 64 MiB".into(),
                        )))
                        .await;
                    return;
                }
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let ev = serde_json::from_slice::<super::PeerEvent>(&line[..line.len() - 1])
                        .map_err(|e| {
                            ClientError::Other(format!("peer stream: malformed event: {e}"))
                        });
                    let stop = ev.is_err();
                    if tx.send(ev).await.is_err() || stop {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

/// Splits `host:port` or `[v6]:port`.
pub fn split_host_port(s: &str) -> Option<(&str, u16)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once("]:")?;
        return Some((h, p.parse().ok()?));
    }
    let (h, p) = s.rsplit_once(':')?;
    if h.is_empty() || h.contains(':') {
        return None;
    }
    Some((h, p.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("10.0.0.1:7443"), Some(("10.0.0.1", 7443)));
        assert_eq!(split_host_port("[::1]:7443"), Some(("::1", 7443)));
        assert_eq!(split_host_port("cp1:7443"), Some(("cp1", 7443)));
        assert_eq!(split_host_port("cp1"), None);
        assert_eq!(split_host_port("::1:7443"), None);
    }
}
