//! Serial number arithmetic (RFC 1982, as RFC 7143 section 4.2.2.1 requires for CmdSN,
//! StatSN, DataSN and R2TSN) and the target's CmdSN window.

/// `a < b` in 32-bit serial number arithmetic.
pub fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < (1 << 31)
}

/// `a <= b` in serial number arithmetic.
pub fn sn_le(a: u32, b: u32) -> bool {
    a == b || sn_lt(a, b)
}

/// Where a non-immediate command's CmdSN falls relative to the window the target
/// advertised. RFC 7143 section 4.2.2.1: outside the window the command is silently
/// ignored; inside but ahead of ExpCmdSN it waits for the gap to fill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmdSnPlace {
    /// Exactly ExpCmdSN: deliver now.
    Next,
    /// Inside the window but later than ExpCmdSN: hold until the gap is filled.
    Ahead,
    /// Outside [ExpCmdSN, MaxCmdSN]: drop silently.
    Outside,
}

/// The target's command window for one session.
///
/// MaxCmdSN opens as commands *finish*, not as they arrive (`open_for`): at most `depth`
/// commands are in the target at once, however many an initiator would queue. It never
/// moves back (initiators keep the largest MaxCmdSN they saw), so a command that used up
/// room without a CmdSN (an immediate one) only delays the next opening.
#[derive(Debug, Clone)]
pub struct CmdWindow {
    exp_cmd_sn: u32,
    depth: u32,
    max_cmd_sn: u32,
}

impl CmdWindow {
    /// A window starting at `first_cmd_sn` (the login's CmdSN) of `depth` commands.
    pub fn new(first_cmd_sn: u32, depth: u32) -> Self {
        assert!((1..(1 << 30)).contains(&depth), "window depth out of range");
        Self {
            exp_cmd_sn: first_cmd_sn,
            depth,
            max_cmd_sn: first_cmd_sn.wrapping_add(depth - 1),
        }
    }

    /// Opens the window as far as `busy` commands still in the target leave room for
    /// (never closing it: MaxCmdSN does not decrease).
    pub fn open_for(&mut self, busy: u32) {
        let room = self.depth.saturating_sub(busy);
        // room 0: ExpCmdSN - 1, the closed window.
        let want = self.exp_cmd_sn.wrapping_add(room).wrapping_sub(1);
        if sn_lt(self.max_cmd_sn, want) {
            self.max_cmd_sn = want;
        }
    }

    /// The next CmdSN the target expects.
    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
    }

    /// The highest CmdSN the initiator may send now.
    pub fn max_cmd_sn(&self) -> u32 {
        self.max_cmd_sn
    }

    /// Classifies a non-immediate command's CmdSN.
    pub fn place(&self, cmd_sn: u32) -> CmdSnPlace {
        if !sn_le(cmd_sn, self.max_cmd_sn) {
            // Beyond MaxCmdSN, also ExpCmdSN itself when the window is closed.
            CmdSnPlace::Outside
        } else if cmd_sn == self.exp_cmd_sn {
            CmdSnPlace::Next
        } else if sn_lt(self.exp_cmd_sn, cmd_sn) && sn_le(cmd_sn, self.max_cmd_sn()) {
            CmdSnPlace::Ahead
        } else {
            CmdSnPlace::Outside
        }
    }

    /// Records that the command with CmdSN == ExpCmdSN was accepted.
    pub fn advance(&mut self) {
        self.exp_cmd_sn = self.exp_cmd_sn.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn wraps_around() {
        assert!(sn_lt(u32::MAX, 0));
        assert!(!sn_lt(0, u32::MAX));
        let w = CmdWindow::new(u32::MAX - 1, 4);
        // MAX-1, MAX, 0, 1: the window wraps through zero.
        assert_eq!(w.max_cmd_sn(), 1);
        assert_eq!(w.place(u32::MAX - 1), CmdSnPlace::Next);
        assert_eq!(w.place(1), CmdSnPlace::Ahead);
        assert_eq!(w.place(2), CmdSnPlace::Outside);
        assert_eq!(w.place(u32::MAX - 2), CmdSnPlace::Outside);
    }

    #[test]
    fn the_window_opens_as_commands_finish_not_as_they_arrive() {
        let mut w = CmdWindow::new(10, 4);
        assert_eq!(w.max_cmd_sn(), 13);
        for _ in 0..4 {
            w.advance(); // four commands arrive, none finished
        }
        w.open_for(4);
        assert_eq!(w.max_cmd_sn(), 13, "closed: ExpCmdSN 14, MaxCmdSN 13");
        assert_eq!(w.place(14), CmdSnPlace::Outside);
        w.open_for(3); // one finished
        assert_eq!(w.max_cmd_sn(), 14);
        assert_eq!(w.place(14), CmdSnPlace::Next);
        w.open_for(4); // an immediate command took the room: the window does not shrink
        assert_eq!(w.max_cmd_sn(), 14);
        w.open_for(0);
        assert_eq!(w.max_cmd_sn(), 17);
    }

    proptest! {
        #[test]
        fn window_classification_is_consistent(start: u32, depth in 1u32..1024, off in 0u32..4096) {
            let w = CmdWindow::new(start, depth);
            let sn = start.wrapping_add(off);
            let expected = if off == 0 { CmdSnPlace::Next } else if off < depth { CmdSnPlace::Ahead } else { CmdSnPlace::Outside };
            prop_assert_eq!(w.place(sn), expected);
            prop_assert_eq!(w.place(start.wrapping_sub(off.max(1))), CmdSnPlace::Outside);
        }
    }
}
