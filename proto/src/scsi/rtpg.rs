//! REPORT TARGET PORT GROUPS parameter data (SPC-4 §6.36), for implicit ALUA.

/// ASYMMETRIC ACCESS STATE of a target port group (SPC-4 table 203).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AluaState {
    ActiveOptimized = 0x0,
    ActiveNonOptimized = 0x1,
    Standby = 0x2,
    Unavailable = 0x3,
    Offline = 0xE,
    Transitioning = 0xF,
}

/// One target port group as reported to initiators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortGroup {
    /// TARGET PORT GROUP identifier (matches VPD 0x83's target port group designator).
    pub id: u16,
    pub state: AluaState,
    /// PREF: this group is preferred for access.
    pub preferred: bool,
    /// STATUS CODE 02h: the state was last changed by implicit (target) behaviour.
    pub changed_implicitly: bool,
    /// RELATIVE TARGET PORT IDENTIFIERs of the ports in the group.
    pub relative_port_ids: Vec<u16>,
}

/// States we can put a group in: T_SUP, U_SUP, S_SUP, AN_SUP, AO_SUP (not O_SUP or
/// LBD_SUP).
const SUPPORTED_STATES: u8 = 0x80 | 0x08 | 0x04 | 0x02 | 0x01;

/// Builds the parameter data. `extended` selects PARAMETER DATA FORMAT 001b, which
/// adds the IMPLICIT TRANSITION TIME (seconds) to the header. The caller truncates to
/// the ALLOCATION LENGTH.
pub fn report_target_port_groups(
    groups: &[PortGroup],
    extended: bool,
    implicit_transition_time_s: u8,
) -> Vec<u8> {
    let mut out = vec![0u8; if extended { 8 } else { 4 }];
    if let Some(hdr) = out.get_mut(4..8) {
        hdr.copy_from_slice(&[0x10, implicit_transition_time_s, 0, 0]);
    }
    for g in groups {
        out.push(if g.preferred { 0x80 } else { 0 } | g.state as u8);
        out.push(SUPPORTED_STATES);
        out.extend_from_slice(&g.id.to_be_bytes());
        out.push(0);
        out.push(if g.changed_implicitly { 0x02 } else { 0x00 });
        out.push(0);
        // TARGET PORT COUNT is one byte; a group never has anywhere near 255 ports.
        let ports = g
            .relative_port_ids
            .get(..255)
            .unwrap_or(&g.relative_port_ids);
        out.push(ports.len() as u8);
        for p in ports {
            out.extend_from_slice(&[0, 0]);
            out.extend_from_slice(&p.to_be_bytes());
        }
    }
    // RETURN DATA LENGTH counts the bytes after itself.
    let len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
    if let Some(hdr) = out.get_mut(..4) {
        hdr.copy_from_slice(&len.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_groups_golden() {
        let groups = [
            PortGroup {
                id: 1,
                state: AluaState::ActiveOptimized,
                preferred: true,
                changed_implicitly: false,
                relative_port_ids: vec![1],
            },
            PortGroup {
                id: 2,
                state: AluaState::Standby,
                preferred: false,
                changed_implicitly: true,
                relative_port_ids: vec![2, 3],
            },
        ];
        let d = report_target_port_groups(&groups, false, 10);
        assert_eq!(
            d,
            vec![
                0, 0, 0, 28, // return data length
                0x80, 0x8F, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, // group 1
                0x02, 0x8F, 0, 2, 0, 2, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3, // group 2
            ]
        );
        let e = report_target_port_groups(&groups, true, 10);
        assert_eq!(&e[..8], &[0, 0, 0, 32, 0x10, 10, 0, 0]);
        assert_eq!(&e[8..], &d[4..]);
    }
}
