//! Access checks under persistent reservations, and SPC-2 RESERVE / RELEASE.

use super::*;

/// How a command behaves in the presence of a persistent reservation (SPC-4 table 62,
/// SBC-3 table 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Allowed under every reservation.
    Always,
    /// Allowed for non-holders of WR_EX, and for non-registrants of WR_EX_RO / WR_EX_AR.
    Read,
    /// Only holders (and registrants of RO/AR types).
    Write,
}

fn access_class(cmd: &Command) -> Access {
    match cmd {
        Command::TestUnitReady
        | Command::RequestSense { .. }
        | Command::Inquiry { .. }
        | Command::ReadCapacity10
        | Command::ReadCapacity16 { .. }
        | Command::ReportTargetPortGroups { .. }
        | Command::ReportLuns { .. }
        | Command::PersistentReserveIn { .. }
        | Command::PersistentReserveOut { .. }
        | Command::PreventAllowMediumRemoval { prevent: 0 } => Access::Always,
        Command::StartStopUnit(s) if s.start && s.power_condition == 0 => Access::Always,
        Command::Read { .. }
        | Command::Verify { .. }
        | Command::PreFetch { .. }
        | Command::GetLbaStatus { .. }
        | Command::ReadDefectData { .. }
        | Command::ModeSense(_)
        | Command::ReportSupportedOpcodes { .. }
        | Command::ReportSupportedTmfs { .. } => Access::Read,
        _ => Access::Write,
    }
}

/// Commands another I_T nexus may still run while an SPC-2 reservation is held (SPC-2
/// §5.5.1 and SBC-2 table B.1 column "reserved by another initiator").
fn allowed_under_spc2(cmd: &Command) -> bool {
    match cmd {
        Command::Inquiry { .. }
        | Command::RequestSense { .. }
        | Command::ReportLuns { .. }
        | Command::ReportTargetPortGroups { .. }
        | Command::ReadCapacity10
        | Command::ReadCapacity16 { .. }
        | Command::Release { .. }
        | Command::PreventAllowMediumRemoval { prevent: 0 } => true,
        Command::StartStopUnit(s) => s.start && s.power_condition == 0,
        _ => false,
    }
}

/// Decides whether `cmd` from `nexus` may run, before it is executed.
///
/// PERSISTENT RESERVE OUT is always let through here when only persistent reservations
/// exist: [`pr_out`] makes the key checks that decide its conflicts. RESERVE and
/// RELEASE conflict while any registration exists (CRH=0); the remaining SPC-2 rules
/// for them live in [`reserve6`] / [`release6`], which agree with this function.
pub fn check_access(state: &PrState, nexus: &Nexus, cmd: &Command) -> Result<(), Conflict> {
    match cmd {
        Command::Reserve { .. } | Command::Release { .. } => {
            if !state.registrations.is_empty() {
                return Err(Conflict);
            }
            return match (&state.spc2, cmd) {
                (Some(h), Command::Reserve { .. }) if h != nexus => Err(Conflict),
                _ => Ok(()),
            };
        }
        Command::PersistentReserveIn { .. } | Command::PersistentReserveOut { .. }
            if state.spc2.is_some() =>
        {
            return Err(Conflict);
        }
        _ => {}
    }
    if let Some(h) = &state.spc2 {
        return if h == nexus || allowed_under_spc2(cmd) {
            Ok(())
        } else {
            Err(Conflict)
        };
    }
    let Some(res) = &state.reservation else {
        return Ok(());
    };
    let class = access_class(cmd);
    if class == Access::Always || state.is_holder(nexus) {
        return Ok(());
    }
    let registered = state.key_of(nexus).is_some();
    let shared_with_registrants = res.pr_type.registrants_only() || res.pr_type.all_registrants();
    let allowed = match class {
        Access::Always => true,
        _ if shared_with_registrants && registered => true,
        Access::Read => !res.pr_type.exclusive_access(),
        Access::Write => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(Conflict)
    }
}

/// RESERVE (6) / (10) (SPC-2 §7.21): conflicts while any persistent registration exists
/// or another I_T nexus holds the SPC-2 reservation; re-reserving is GOOD.
pub fn reserve6(state: &mut PrState, nexus: &Nexus) -> Result<(), Conflict> {
    if !state.registrations.is_empty() {
        return Err(Conflict);
    }
    match &state.spc2 {
        Some(h) if h != nexus => Err(Conflict),
        _ => {
            state.spc2 = Some(nexus.clone());
            Ok(())
        }
    }
}

/// RELEASE (6) / (10) (SPC-2 §7.17): releases the holder's reservation; from any other
/// I_T nexus it is GOOD and does nothing. Conflicts while persistent registrations exist.
pub fn release6(state: &mut PrState, nexus: &Nexus) -> Result<(), Conflict> {
    if !state.registrations.is_empty() {
        return Err(Conflict);
    }
    if state.spc2.as_ref() == Some(nexus) {
        state.spc2 = None;
    }
    Ok(())
}

/// I_T nexus loss: drops that nexus's SPC-2 reservation. Persistent registrations and
/// reservations survive (SPC-4 5.12.1).
pub fn nexus_lost(state: &mut PrState, nexus: &Nexus) {
    if state.spc2.as_ref() == Some(nexus) {
        state.spc2 = None;
    }
}

/// LOGICAL UNIT RESET (and target / hard reset): drops the SPC-2 reservation only.
pub fn lun_reset(state: &mut PrState) {
    state.spc2 = None;
}
