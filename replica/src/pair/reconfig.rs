//! Online LUN changes on a pair (a reload that adds, grows or removes LUNs): whether this
//! node may make them now, from what the peer's hello says it has.
//!
//! The rule: the two nodes never differ on a LUN the primary serves. So a LUN is added or
//! grown on the secondary first (harmless: the primary does not use it yet) and then on the
//! primary, which refuses until the peer's hello shows the same LUN at the same size; and a
//! LUN is removed on the primary first (it stops serving and mirroring it), and then on the
//! secondary, which refuses while the primary still announces it. Why the primary checks
//! and does not just push the change: the peer's config file is the peer operator's, and a
//! change made behind it would be undone by the peer's next restart.

use super::plan::{plan_resync, PlanRefusal};
use crate::meta::Meta;
use crate::wire::LunHello;

/// One LUN change a reload makes on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LunChange<'a> {
    /// A new LUN, with the metadata it opened with here.
    Add(&'a Meta),
    /// LUN `key` grows to `size_bytes`.
    Grow {
        /// The LUN's stable id.
        key: u64,
        /// Its new size.
        size_bytes: u64,
    },
    /// LUN `key` is removed.
    Remove {
        /// The LUN's stable id.
        key: u64,
    },
}

impl LunChange<'_> {
    /// The LUN's stable id.
    pub fn key(&self) -> u64 {
        match self {
            LunChange::Add(m) => m.lun_key,
            LunChange::Grow { key, .. } | LunChange::Remove { key } => *key,
        }
    }
}

/// Why a change must wait. Each names what the operator does next.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Wait {
    /// The peer could not be asked (a primary cannot know what the peer has).
    #[error("the peer cannot be asked ({0}): add, grow or remove LUNs while both nodes are up")]
    PeerUnreachable(String),
    /// The primary adds a LUN the peer does not have.
    #[error("the peer has no such LUN yet: add it on the secondary first (its config file and `twinsan reload` there), then here")]
    PeerLacks,
    /// The peer's LUN has another size.
    #[error("the peer's LUN is {peer_size_bytes} bytes, this change wants {size_bytes}: make it {size_bytes} bytes on the secondary first, then here")]
    PeerSize {
        /// Wanted here.
        size_bytes: u64,
        /// The peer's.
        peer_size_bytes: u64,
    },
    /// The peer's LUN uses another bitmap region size.
    #[error("the peer's LUN has {peer_region_bytes}-byte regions, this node {region_bytes}: `peer.region_bytes` must be the same on both nodes")]
    PeerRegions {
        /// Ours.
        region_bytes: u64,
        /// The peer's.
        peer_region_bytes: u64,
    },
    /// The peer's copy of the new LUN could not be synced from here (it holds data of
    /// another history: a LUN of the same name and id served before, for instance).
    #[error("the peer's copy of this LUN holds data of another history ({0}): remove its files there (the backing file and its .meta) or run `twinsan resolve --discard-local` there, then retry")]
    PeerUnrelated(String),
    /// The secondary removes a LUN the primary still serves.
    #[error("the primary still serves this LUN: remove it there first, then here")]
    PrimaryServes,
}

/// Whether `change` may be made now on this node (`primary`), given the LUNs the peer
/// announces (`Err`: the peer could not be asked, and why). A secondary's additions and
/// growths never wait; its removals wait for the primary's.
pub fn may_change(
    primary: bool,
    change: &LunChange<'_>,
    peer: Result<&[LunHello], &str>,
) -> Result<(), Wait> {
    let needs_peer = match change {
        LunChange::Remove { .. } => !primary,
        LunChange::Add(_) | LunChange::Grow { .. } => primary,
    };
    if !needs_peer {
        return Ok(());
    }
    let peer = peer.map_err(|why| Wait::PeerUnreachable(why.to_string()))?;
    let theirs = peer.iter().find(|h| h.lun_key == change.key());
    match change {
        LunChange::Remove { .. } => match theirs {
            Some(h) if h.flags.primary => Err(Wait::PrimaryServes),
            _ => Ok(()),
        },
        LunChange::Grow { size_bytes, .. } => {
            let h = theirs.ok_or(Wait::PeerLacks)?;
            same_size(*size_bytes, h)
        }
        LunChange::Add(meta) => {
            let h = theirs.ok_or(Wait::PeerLacks)?;
            same_size(meta.size_bytes, h)?;
            if h.region_bytes != meta.region_bytes {
                return Err(Wait::PeerRegions {
                    region_bytes: meta.region_bytes,
                    peer_region_bytes: h.region_bytes,
                });
            }
            // The resync that follows the addition must be able to make the peer equal.
            match plan_resync(meta, false, h) {
                Ok(_) => Ok(()),
                Err(PlanRefusal::Geometry { .. }) => Err(Wait::PeerSize {
                    size_bytes: meta.size_bytes,
                    peer_size_bytes: h.size_bytes,
                }),
                Err(e) => Err(Wait::PeerUnrelated(format!("{e:?}"))),
            }
        }
    }
}

fn same_size(size_bytes: u64, h: &LunHello) -> Result<(), Wait> {
    if h.size_bytes == size_bytes {
        Ok(())
    } else {
        Err(Wait::PeerSize {
            size_bytes,
            peer_size_bytes: h.size_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::genid::{GenFlags, GenIds};

    const GIB: u64 = 1 << 30;
    const REGION: u64 = 4 << 20;

    fn hello(key: u64, size_bytes: u64, primary: bool) -> LunHello {
        LunHello {
            lun_key: key,
            size_bytes,
            region_bytes: REGION,
            gen: GenIds::BLANK,
            flags: GenFlags {
                primary,
                ..GenFlags::default()
            },
        }
    }

    #[test]
    fn a_primary_adds_a_lun_only_once_the_peer_has_it_at_the_same_size() {
        let meta = Meta::new(7, GIB, REGION).unwrap();
        let add = LunChange::Add(&meta);
        assert_eq!(may_change(true, &add, Ok(&[])), Err(Wait::PeerLacks));
        assert_eq!(
            may_change(true, &add, Ok(&[hello(7, 2 * GIB, false)])),
            Err(Wait::PeerSize {
                size_bytes: GIB,
                peer_size_bytes: 2 * GIB
            })
        );
        let mut other_regions = hello(7, GIB, false);
        other_regions.region_bytes = REGION * 2;
        assert!(matches!(
            may_change(true, &add, Ok(&[other_regions])),
            Err(Wait::PeerRegions { .. })
        ));
        assert_eq!(may_change(true, &add, Ok(&[hello(7, GIB, false)])), Ok(()));
        assert!(matches!(
            may_change(true, &add, Err("connection refused")),
            Err(Wait::PeerUnreachable(_))
        ));
    }

    #[test]
    fn a_primary_refuses_a_peer_copy_of_another_history() {
        let meta = Meta::new(7, GIB, REGION).unwrap();
        let mut theirs = hello(7, GIB, false);
        // The peer served this LUN as primary once (its own generation), and is
        // consistent: nothing says which of the two copies is right.
        theirs.gen.bump([9; 8]);
        assert!(matches!(
            may_change(true, &LunChange::Add(&meta), Ok(&[theirs])),
            Err(Wait::PeerUnrelated(_))
        ));
    }

    #[test]
    fn a_primary_grows_a_lun_only_once_the_peer_grew_it() {
        let grow = LunChange::Grow {
            key: 7,
            size_bytes: 2 * GIB,
        };
        assert!(matches!(
            may_change(true, &grow, Ok(&[hello(7, GIB, false)])),
            Err(Wait::PeerSize { .. })
        ));
        assert_eq!(
            may_change(true, &grow, Ok(&[hello(7, 2 * GIB, false)])),
            Ok(())
        );
        assert_eq!(may_change(true, &grow, Ok(&[])), Err(Wait::PeerLacks));
    }

    #[test]
    fn a_secondary_adds_and_grows_freely_and_removes_after_the_primary() {
        let meta = Meta::new(7, GIB, REGION).unwrap();
        let unreachable = Err("down");
        assert_eq!(
            may_change(false, &LunChange::Add(&meta), unreachable),
            Ok(())
        );
        let grow = LunChange::Grow {
            key: 7,
            size_bytes: 2 * GIB,
        };
        assert_eq!(may_change(false, &grow, unreachable), Ok(()));
        let remove = LunChange::Remove { key: 7 };
        assert_eq!(
            may_change(false, &remove, Ok(&[hello(7, GIB, true)])),
            Err(Wait::PrimaryServes)
        );
        assert_eq!(
            may_change(false, &remove, Ok(&[hello(8, GIB, true)])),
            Ok(())
        );
        assert!(matches!(
            may_change(false, &remove, unreachable),
            Err(Wait::PeerUnreachable(_))
        ));
        // A primary removes first, whatever the peer has.
        assert_eq!(
            may_change(true, &remove, Ok(&[hello(7, GIB, false)])),
            Ok(())
        );
        assert_eq!(may_change(true, &remove, unreachable), Ok(()));
    }
}
