//! The routes that read and manage one user's inbox: its state, its erasure (GDPR), and the
//! devices that hold positions in it.

use ferry_router::Engine;
use ferry_shared::{DeviceId, UserId};
use hyper::StatusCode;
use serde::Serialize;

use super::reply::{ApiError, Reply, empty, json};

#[derive(Serialize)]
struct InboxBody<'a> {
    user: &'a str,
    epoch: &'a str,
    head: u64,
    floor: u64,
    /// `null` when the inbox holds no message.
    oldest: Option<u64>,
    count: u64,
}

#[derive(Serialize)]
struct Deleted {
    deleted: bool,
}

#[derive(Serialize)]
struct Devices {
    devices: Vec<Device>,
}

#[derive(Serialize)]
struct Device {
    device: String,
    acked: u64,
    last_seen_ms: u64,
    holding: bool,
}

/// `GET /v1/users/{user}/inbox`: 404 when the inbox has no epoch (never opened, expired,
/// deleted or lost).
pub async fn info(engine: &dyn Engine, user: &UserId) -> Result<Reply, ApiError> {
    let Some(info) = engine
        .inbox_info(user)
        .await
        .map_err(ApiError::from_store)?
    else {
        return Err(ApiError::NotFound(format!("{user} has no inbox")));
    };
    let body = InboxBody {
        user: user.as_str(),
        epoch: &info.epoch,
        head: info.head,
        floor: info.floor,
        oldest: info.oldest,
        count: info.count,
    };
    Ok(json(StatusCode::OK, &body))
}

/// `DELETE /v1/users/{user}/inbox`: erases the inbox; its connected sessions are sent to
/// reconnect into a new epoch.
pub async fn delete(engine: &dyn Engine, user: &UserId) -> Result<Reply, ApiError> {
    let deleted = engine
        .delete_inbox(user)
        .await
        .map_err(ApiError::from_store)?;
    Ok(json(StatusCode::OK, &Deleted { deleted }))
}

/// `GET /v1/users/{user}/devices`.
pub async fn devices(engine: &dyn Engine, user: &UserId) -> Result<Reply, ApiError> {
    let devices = engine
        .devices(user)
        .await
        .map_err(ApiError::from_store)?
        .into_iter()
        .map(|d| Device {
            device: d.device,
            acked: d.acked,
            last_seen_ms: d.last_seen_ms,
            holding: d.holding,
        })
        .collect();
    Ok(json(StatusCode::OK, &Devices { devices }))
}

/// `DELETE /v1/users/{user}/devices/{device}`: 204, or 404 for a device the store does not know.
pub async fn remove_device(
    engine: &dyn Engine,
    user: &UserId,
    device: &DeviceId,
) -> Result<Reply, ApiError> {
    let removed = engine
        .remove_device(user, device)
        .await
        .map_err(ApiError::from_store)?;
    if !removed {
        return Err(ApiError::NotFound(format!("{user} has no device {device}")));
    }
    Ok(empty(StatusCode::NO_CONTENT))
}
