//! Bodies of the snapshot messages (kept apart from the data path's messages).

use super::{put_u64, Message, Reader, WireError};
use crate::snapshot::{SnapOp, SnapshotName, NAME_BYTES_MAX};

/// Snapshots one LUN may hold (per node): bounds the list message, the catalogue and the
/// work of reconciling it.
pub const SNAPSHOTS_PER_LUN_MAX: usize = 1024;

/// The body of a snapshot message (any other message is a caller's bug).
pub(super) fn put_body(msg: &Message, out: &mut Vec<u8>) {
    match msg {
        Message::Snapshot {
            lun_key,
            op,
            guid,
            name,
        } => put_snapshot_body(*lun_key, *op, *guid, name, out),
        Message::SnapshotList { lun_key, guids } => put_list_body(*lun_key, guids, out),
        _ => unreachable!("not a snapshot message"),
    }
}

fn put_snapshot_body(lun_key: u64, op: SnapOp, guid: u64, name: &SnapshotName, out: &mut Vec<u8>) {
    let name = name.as_str().as_bytes();
    assert!(name.len() <= NAME_BYTES_MAX, "snapshot names are parsed");
    put_u64(out, lun_key);
    out.push(op.code());
    put_u64(out, guid);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
}

fn put_list_body(lun_key: u64, guids: &[u64], out: &mut Vec<u8>) {
    assert!(
        guids.len() <= SNAPSHOTS_PER_LUN_MAX,
        "catalogues are bounded"
    );
    put_u64(out, lun_key);
    out.extend_from_slice(&(guids.len() as u32).to_le_bytes());
    for &g in guids {
        put_u64(out, g);
    }
}

pub(super) fn parse_snapshot(r: &mut Reader<'_>) -> Result<Message, WireError> {
    let lun_key = r.u64()?;
    let op = SnapOp::from_code(r.u8()?).ok_or(WireError::BadField("snapshot op"))?;
    let guid = r.u64()?;
    let len = usize::from(r.u8()?);
    let name = std::str::from_utf8(r.take(len)?)
        .ok()
        .and_then(|s| SnapshotName::parse(s).ok())
        .ok_or(WireError::BadField("snapshot name"))?;
    Ok(Message::Snapshot {
        lun_key,
        op,
        guid,
        name,
    })
}

pub(super) fn parse_list(r: &mut Reader<'_>) -> Result<Message, WireError> {
    let lun_key = r.u64()?;
    let mut count = [0u8; 4];
    count.copy_from_slice(r.take(4)?);
    let count = u32::from_le_bytes(count) as usize;
    if count > SNAPSHOTS_PER_LUN_MAX {
        return Err(WireError::BadField("snapshot list length"));
    }
    let guids = (0..count).map(|_| r.u64()).collect::<Result<_, _>>()?;
    Ok(Message::SnapshotList { lun_key, guids })
}
