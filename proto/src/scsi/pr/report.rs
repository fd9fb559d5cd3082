//! PERSISTENT RESERVE IN: the parameter data of each service action.

use super::*;

/// Builds the PERSISTENT RESERVE IN parameter data (SPC-4 §6.15). Returns the full
/// payload: the caller truncates to the ALLOCATION LENGTH, and the ADDITIONAL LENGTH
/// fields always describe the untruncated data. `_alloc_len` is accepted for call-site
/// symmetry and not used. Never fails today (the `Result` leaves room for it); a PR IN
/// that conflicts with an SPC-2 reservation is caught by [`check_access`].
pub fn pr_in(state: &PrState, action: PrInAction, _alloc_len: u16) -> Result<Vec<u8>, Sense> {
    let mut v = Vec::new();
    match action {
        PrInAction::ReadKeys => {
            v.extend_from_slice(&state.generation.to_be_bytes());
            let len = state.registrations.len() * 8;
            v.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
            for r in &state.registrations {
                v.extend_from_slice(&r.key.to_be_bytes());
            }
        }
        PrInAction::ReadReservation => {
            v.extend_from_slice(&state.generation.to_be_bytes());
            match (&state.reservation, state.reservation_key()) {
                (Some(res), Some(key)) => {
                    v.extend_from_slice(&16u32.to_be_bytes());
                    v.extend_from_slice(&key.to_be_bytes());
                    v.extend_from_slice(&[0; 4]); // obsolete
                    v.push(0);
                    v.push(res.pr_type.code()); // SCOPE 0 (LU_SCOPE) in the high nibble
                    v.extend_from_slice(&[0; 2]); // obsolete
                }
                _ => v.extend_from_slice(&0u32.to_be_bytes()),
            }
        }
        PrInAction::ReportCapabilities => {
            v.extend_from_slice(&8u16.to_be_bytes());
            // CRH=0, SIP_C=0, ATP_C=0, PTPL_C=1.
            v.push(0x01);
            // TMV=1, ALLOW COMMANDS=011b (TEST UNIT READY and PERSISTENT RESERVE IN
            // allowed through WR_EX / EX_AC reservations), PTPL_A.
            v.push(0x80 | (0b011 << 4) | u8::from(state.aptpl));
            // Type mask: WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX | EX_AC_AR.
            v.push(0x80 | 0x40 | 0x20 | 0x08 | 0x02);
            v.push(0x01);
            v.extend_from_slice(&[0; 2]);
        }
        PrInAction::ReadFullStatus => {
            v.extend_from_slice(&state.generation.to_be_bytes());
            v.extend_from_slice(&[0; 4]); // patched below
            for r in &state.registrations {
                let tid = r.nexus.transport_id();
                let holder = state.is_holder(&r.nexus);
                v.extend_from_slice(&r.key.to_be_bytes());
                v.extend_from_slice(&[0; 4]);
                v.push(u8::from(holder)); // ALL_TG_PT=0, R_HOLDER
                v.push(match (&state.reservation, holder) {
                    (Some(res), true) => res.pr_type.code(),
                    _ => 0,
                });
                v.extend_from_slice(&[0; 4]);
                v.extend_from_slice(&r.nexus.target_port.to_be_bytes());
                v.extend_from_slice(&u32::try_from(tid.len()).unwrap_or(0).to_be_bytes());
                v.extend_from_slice(&tid);
            }
            let len = u32::try_from(v.len() - 8).unwrap_or(u32::MAX);
            if let Some(field) = v.get_mut(4..8) {
                field.copy_from_slice(&len.to_be_bytes());
            }
        }
    }
    Ok(v)
}
