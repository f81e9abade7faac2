//! `POST /v1/join/rejoin`: a registered node whose certificates expired gets new ones, keeping its
//! name, addresses, subnet and WireGuard key.
//!
//! Authorization takes two things, both checked before anything changes:
//! * a valid bootstrap token (an operator's decision to let a node back in), consumed by the
//!   rejoin like a join consumes it;
//! * a proof of possession of the node's registered identity key: a signature, by the key whose
//!   SubjectPublicKeyInfo hash the registry records (`identity_sha256`), over the cluster CA's pin,
//!   the token id, the node name and the new CSRs ([`crate::rejoin::rejoin_message`]). The key's
//!   certificate may have expired: the registry, not the certificate, says whose key it is.
//!
//! A token alone therefore never hands over an existing node's name, subnet and place in the mesh;
//! a stolen old key alone never renews anything. A refusal changes nothing (the token is not used).

use std::net::SocketAddr;
use std::time::SystemTime;

use base64::Engine;
use hyper::StatusCode;

use super::{
    admit_token, get_node, identity_hash, log, sign_node_csrs, token_rejected, ApiError, ApiState,
};
use crate::api::JoinResponse;
use crate::registry;
use crate::rejoin::{rejoin_message, RejoinRequest};
use crate::tokens::Token;

fn refused(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "rejoin refused: no proof of node {name:?}'s registered identity key (a rejoin keeps a \
             node's name, subnet and WireGuard key only for the holder of that key; a new machine \
             joins with `meshd join` under a new name)"
        ),
    )
}

/// Handles a rejoin; see the module documentation.
pub(super) async fn rejoin(
    state: &ApiState,
    r: RejoinRequest,
    peer: SocketAddr,
) -> Result<JoinResponse, ApiError> {
    let now = SystemTime::now();
    let token = Token::parse(&r.token).map_err(|_| {
        log(format!("rejoin refused from {peer}: malformed token"));
        token_rejected()
    })?;
    log(format!(
        "rejoin request from {peer}: node {:?}, token {}",
        r.node_name, token.id
    ));
    registry::validate_node_name(&r.node_name)
        .map_err(|e| ApiError::bad(format!("node_name: {e}")))?;
    let store = state.store.as_ref();
    admit_token(store, &token, now).await?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let spki = b64
        .decode(r.identity_spki.as_bytes())
        .map_err(|_| ApiError::bad("identity_spki: not base64"))?;
    let sig = b64
        .decode(r.proof.as_bytes())
        .map_err(|_| ApiError::bad("proof: not base64"))?;
    let spki_hash = pki::keys::spki_sha256_hex(&spki);
    let msg = rejoin_message(state.ca.spki_sha256(), &token.id, &r.node_name, &r.csrs);
    let is_registered_key = |rec: &registry::NodeRecord| {
        !rec.identity_sha256.is_empty()
            && subtle::ConstantTimeEq::ct_eq(rec.identity_sha256.as_bytes(), spki_hash.as_bytes())
                .unwrap_u8()
                == 1
    };
    let rec = match get_node(store, &r.node_name).await {
        Ok((rec, _)) => rec,
        Err(_) => {
            log(format!(
                "rejoin refused: node {:?} is not registered (token {})",
                r.node_name, token.id
            ));
            return Err(refused(&r.node_name));
        }
    };
    if !is_registered_key(&rec) {
        log(format!(
            "rejoin refused: node {}: the key offered is not its registered identity (token {})",
            r.node_name, token.id
        ));
        return Err(refused(&r.node_name));
    }
    match pki::proof::verify(&spki, &msg, &sig) {
        Ok(true) => {}
        Ok(false) | Err(_) => {
            log(format!(
                "rejoin refused: node {}: the proof does not verify with its registered key (token {})",
                r.node_name, token.id
            ));
            return Err(refused(&r.node_name));
        }
    }
    // Sign before changing anything: a CSR for another identity is refused here.
    let certs = sign_node_csrs(state, &r.node_name, &rec.addresses, &r.csrs, now)?;
    let new_identity = identity_hash(&certs)?;
    use crate::store::{Compare, TxnOp};
    for _ in 0..16 {
        let (tkv, trec) = admit_token(store, &token, now).await?;
        let (mut rec, nkv) = get_node(store, &r.node_name)
            .await
            .map_err(|_| refused(&r.node_name))?;
        // Checked again inside the transaction's snapshot: a renewal that raced us moved the
        // identity, and the proof no longer speaks for the node.
        if !is_registered_key(&rec) {
            return Err(refused(&r.node_name));
        }
        rec.identity_sha256 = new_identity.clone();
        rec.last_renewal = None;
        let compares = [
            Compare {
                key: tkv.key.clone(),
                mod_revision: tkv.mod_revision,
            },
            Compare {
                key: nkv.key.clone(),
                mod_revision: nkv.mod_revision,
            },
        ];
        let ops = [
            TxnOp::Put {
                key: tkv.key.clone(),
                value: serde_json::to_vec(&trec.consumed()).map_err(ApiError::internal)?,
                lease: (tkv.lease != 0).then_some(tkv.lease),
            },
            TxnOp::Put {
                key: nkv.key.clone(),
                value: serde_json::to_vec(&rec).map_err(ApiError::internal)?,
                lease: None,
            },
        ];
        if store
            .txn(&compares, &ops)
            .await
            .map_err(ApiError::internal)?
            .is_some()
        {
            log(format!(
                "node {} rejoined from {peer} with a new identity key: subnet {}, token {}",
                r.node_name, rec.subnet, token.id
            ));
            return Ok(JoinResponse {
                subnet: rec.subnet,
                node: rec,
                certs,
                ca_pem: state.ca.cert_pem().to_owned(),
                network: state.network.clone(),
                apiserver_url: state.settings.apiserver_url(),
                cluster_name: state.settings.cluster_name.clone(),
            });
        }
    }
    Err(ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too much contention rejoining the node; retry",
    ))
}
