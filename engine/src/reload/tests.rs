use super::*;
use crate::config::Overrides;

const A: &str = "iqn.2026-11.io.t:a";
const B: &str = "iqn.2026-11.io.t:b";

fn cfg(text: &str) -> Config {
    let full = format!("[server]\nlisten = \"127.0.0.1:3260\"\ndata_dir = \"/tmp/x\"\n{text}");
    match Config::parse_str(
        &full,
        "node.toml",
        Some("node.toml".into()),
        &Overrides::default(),
    ) {
        Ok(c) => c,
        Err(e) => panic!("{e}\n{full}"),
    }
}

fn target(name: &str, extra: &str, luns: &[(u64, &str)]) -> String {
    let mut s = format!("[[target]]\nname = \"{name}\"\n{extra}\n");
    for (id, size) in luns {
        s += &format!("[[target.lun]]\nid = {id}\npath = \"{name}-{id}.img\"\nsize = \"{size}\"\n");
    }
    s
}

/// Sizes as configured (what a daemon that created the files serves).
fn sizes(c: &Config) -> impl Fn(&str, u64) -> Option<u64> + '_ {
    move |t, id| {
        c.targets
            .iter()
            .find(|x| x.name == t)?
            .luns
            .iter()
            .find(|l| l.id == id)
            .map(|l| l.size_bytes)
    }
}

#[test]
fn adding_a_target_with_a_lun_and_growing_another_is_planned_as_such() {
    let old = cfg(&target(A, "", &[(0, "1GiB")]));
    let new = cfg(&(target(A, "", &[(0, "2GiB")]) + &target(B, "", &[(0, "1GiB")])));
    let d = diff(&old, &new, &sizes(&old)).expect("allowed");
    assert_eq!(d.targets_added, vec![B.to_string()]);
    assert_eq!(d.luns_added, vec![(B.to_string(), 0)]);
    assert_eq!(d.luns_grown, vec![(A.to_string(), 0, 1 << 30, 2 << 30)]);
    assert!(d.targets_removed.is_empty() && d.luns_removed.is_empty());
    assert!(
        d.summary().contains("grown from 1073741824 to 2147483648"),
        "{}",
        d.summary()
    );
}

#[test]
fn the_same_file_changes_nothing() {
    let old = cfg(&target(A, "", &[(0, "1GiB")]));
    let d = diff(&old, &old.clone(), &sizes(&old)).expect("allowed");
    assert!(d.is_empty());
    assert_eq!(d.summary(), "no change");
}

#[test]
fn removals_and_access_changes_are_listed() {
    let old = cfg(&(target(A, "", &[(0, "1GiB"), (1, "1GiB")]) + &target(B, "", &[(0, "1GiB")])));
    let new = cfg(&target(
        A,
        "allowed_initiators = [\"iqn.2026-11.io.i:one\"]",
        &[(0, "1GiB")],
    ));
    let d = diff(&old, &new, &sizes(&old)).expect("allowed");
    assert_eq!(d.targets_removed, vec![B.to_string()]);
    assert_eq!(d.luns_removed, vec![(B.to_string(), 0), (A.to_string(), 1)]);
    assert_eq!(d.access_changed, vec![A.to_string()]);
}

#[test]
fn shrinking_is_refused_with_file_and_key() {
    let old = cfg(&target(A, "", &[(0, "2GiB")]));
    let new = cfg(&target(A, "", &[(0, "1GiB")]));
    let e = diff(&old, &new, &sizes(&old))
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("node.toml") && e.contains("target[0].lun[0].size"),
        "{e}"
    );
    assert!(e.contains("shrinking"), "{e}");
}

#[test]
fn a_lun_sized_by_its_file_is_not_shrunk_by_an_absent_size() {
    let old = cfg(&target(A, "", &[(0, "2GiB")]));
    let new = cfg("[[target]]\nname = \"iqn.2026-11.io.t:a\"\n[[target.lun]]\nid = 0\npath = \"iqn.2026-11.io.t:a-0.img\"\n");
    let d = diff(&old, &new, &sizes(&old)).expect("allowed");
    assert!(d.luns_grown.is_empty());
}

#[test]
fn what_cannot_change_online_is_refused_naming_its_key() {
    let base = target(A, "", &[(0, "1GiB")]);
    let old = cfg(&base);
    let listen = Config::parse_str(
        &format!("[server]\nlisten = \"127.0.0.1:3261\"\ndata_dir = \"/tmp/x\"\n{base}"),
        "node.toml",
        Some("node.toml".into()),
        &Overrides::default(),
    )
    .expect("valid");
    let e = diff(&old, &listen, &sizes(&old))
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("`server.listen`") && e.contains("restart"),
        "{e}"
    );
    let path = cfg(&base.replace("-0.img", "-other.img"));
    let e = diff(&old, &path, &sizes(&old))
        .expect_err("refused")
        .to_string();
    assert!(e.contains("`target[0].lun[0].path`"), "{e}");
    let bs = cfg(&base.replace("size = ", "block_size = 4096\nsize = "));
    let e = diff(&old, &bs, &sizes(&old))
        .expect_err("refused")
        .to_string();
    assert!(e.contains("target[0].lun[0].block_size"), "{e}");
}

#[test]
fn on_a_pair_lun_changes_are_planned_for_the_pairs_consent_and_the_peer_section_is_fixed() {
    let peer = "[peer]\nname = \"b\"\naddress = \"127.0.0.1:7000\"\nlisten = \"127.0.0.1:7001\"\npsk = \"0123456789abcdef0123456789abcdef\"\n";
    let old = cfg(&format!("{peer}{}", target(A, "", &[(0, "1GiB")])));
    // Planned here, asked of the peer when applied (replica::pair::reconfig).
    let both = cfg(&format!(
        "{peer}{}",
        target(A, "", &[(0, "2GiB"), (1, "1GiB")])
    ));
    let d = diff(&old, &both, &sizes(&old)).expect("planned");
    assert_eq!(d.luns_grown, vec![(A.to_string(), 0, 1 << 30, 2 << 30)]);
    assert_eq!(d.luns_added, vec![(A.to_string(), 1)]);
    let moved = cfg(&format!(
        "{}{}",
        peer.replace("7000", "7002"),
        target(A, "", &[(0, "1GiB")])
    ));
    let e = diff(&old, &moved, &sizes(&old))
        .expect_err("refused")
        .to_string();
    assert!(e.contains("`peer`"), "{e}");
    let acl = cfg(&format!(
        "{peer}{}",
        target(A, "allowed_addresses = [\"10.0.0.0/8\"]", &[(0, "1GiB")])
    ));
    let d = diff(&old, &acl, &sizes(&old)).expect("allowed");
    assert_eq!(d.access_changed, vec![A.to_string()]);
}
