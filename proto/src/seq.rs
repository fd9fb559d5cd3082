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
/// Invariant: `max_cmd_sn` is `exp_cmd_sn + depth - 1` in serial arithmetic, so at most
/// `depth` commands are ever queued by a well-behaved initiator.
#[derive(Debug, Clone)]
pub struct CmdWindow {
    exp_cmd_sn: u32,
    depth: u32,
}

impl CmdWindow {
    /// A window starting at `first_cmd_sn` (the login's CmdSN) of `depth` commands.
    pub fn new(first_cmd_sn: u32, depth: u32) -> Self {
        assert!((1..(1 << 30)).contains(&depth), "window depth out of range");
        Self {
            exp_cmd_sn: first_cmd_sn,
            depth,
        }
    }

    /// The next CmdSN the target expects.
    pub fn exp_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn
    }

    /// The highest CmdSN the initiator may send now.
    pub fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.wrapping_add(self.depth - 1)
    }

    /// Classifies a non-immediate command's CmdSN.
    pub fn place(&self, cmd_sn: u32) -> CmdSnPlace {
        if cmd_sn == self.exp_cmd_sn {
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
