//! The session around the tasks: login to full feature phase, NOP-Out and Text requests,
//! the periodic tick (login timeout, pings, slow waits), and shutdown.

use std::sync::Arc;

use proto::pdu::{self, Digests, RejectReason, TargetPdu, BHS_LEN, RESERVED_TAG};
use proto::seq::CmdWindow;

use super::{nexus_tag, Conn, LunView, Out, Phase, Session, LOGIN_MAX_DATA_BYTES};
use crate::disk::bufpool::BufPool;
use crate::iscsi::login::SessionKind;
use crate::registry::Registry;

impl Conn {
    pub(super) fn enter_full_feature(
        &mut self,
        res: crate::iscsi::login::LoginResult,
        reg: &Registry,
    ) {
        let view_gen = res.view_gen;
        let entry = res
            .entry
            .clone()
            .filter(|_| res.kind == SessionKind::Normal);
        let luns = entry
            .as_ref()
            .map(|t| {
                t.luns
                    .iter()
                    .map(|&(id, index)| lun_view(reg, id, index))
                    .collect()
            })
            .unwrap_or_default();
        self.digests = Digests {
            header: res.params.header_digest,
            data: res.params.data_digest,
        };
        tracing::info!(peer = %self.peer, initiator = %res.initiator_name, target = %res.target_name, kind = ?res.kind, "login complete");
        reg.sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let window = CmdWindow::new(res.exp_cmd_sn, reg.config.queue_depth);
        let nexus = proto::scsi::pr::Nexus::new(
            &res.initiator_name,
            res.isid,
            crate::iscsi::login::PORTAL_GROUP_TAG,
        );
        let nexus_tag = nexus_tag(&nexus);
        if res.kind == SessionKind::Normal {
            let key = (nexus.initiator.clone(), res.isid, res.target);
            if let Some(old) = reg.session_started(
                key,
                self.session_id,
                Arc::clone(&self.reinstated),
                self.peer.ip(),
            ) {
                // RFC 7143 section 6.3.5: the old session is closed and its tasks end; its
                // I_T nexus is lost now, before this one can reserve anything (the old
                // connection, closing on its own core, no longer releases it).
                tracing::warn!(peer = %self.peer, initiator = %res.initiator_name, old_session = old, "session reinstatement: closing the old session");
                for &(_, index) in entry.as_ref().map(|t| &t.luns[..]).unwrap_or(&[]) {
                    let lun = &reg.luns[index];
                    if lun.pr_in_use() {
                        lun.with_pr(|st| proto::scsi::pr::nexus_lost(st, &nexus));
                    }
                }
            }
            // A reload that swapped the view after this login was decided and swept the
            // live sessions before this one was recorded: judge it by the new view here.
            let now = reg.view();
            let now = now.targets.get(res.target).and_then(Option::as_deref);
            let chap = entry.as_ref().and_then(|e| e.cfg.chap.as_ref());
            if !crate::reload::still_admitted(now, chap, &nexus.initiator, self.peer.ip()) {
                tracing::warn!(peer = %self.peer, initiator = %res.initiator_name, "a reload refused this initiator during its login: closing the session");
                self.reinstated
                    .store(true, std::sync::atomic::Ordering::Release);
            }
        }
        self.phase = Phase::Full(Box::new(Session {
            kind: res.kind,
            target: res.target,
            entry,
            view_gen,
            window,
            params: res.params,
            luns,
            nexus,
            nexus_tag,
        }));
    }

    pub(super) fn nop_out(&mut self, n: &pdu::NopOut, data: &[u8], out: &mut Out) {
        if n.ttt != RESERVED_TAG {
            // The answer to our ping.
            if self.ping.is_some_and(|(ttt, _)| ttt == n.ttt) {
                self.ping = None;
            }
        }
        if n.itt != RESERVED_TAG {
            let lun = n.lun;
            let itt = n.itt;
            let max = self.max_send_data_bytes();
            let echo = &data[..data.len().min(max)];
            self.send_status_pdu(
                out,
                |sns| TargetPdu::NopIn {
                    lun,
                    itt,
                    ttt: RESERVED_TAG,
                    sns,
                    data_len: echo.len() as u32,
                },
                echo,
            );
        }
    }

    pub(super) fn max_send_data_bytes(&self) -> usize {
        match &self.phase {
            Phase::Full(s) => s.params.initiator_mrdsl_bytes as usize,
            Phase::Login(_) => LOGIN_MAX_DATA_BYTES,
        }
    }

    pub(super) fn text(
        &mut self,
        t: &pdu::TextRequest,
        data: &[u8],
        reg: &Registry,
        out: &mut Out,
    ) {
        let peer = self.peer;
        let Phase::Full(s) = &mut self.phase else {
            return;
        };
        let target = s.entry.as_ref().map(|t| t.cfg.name.clone());
        let reply = crate::iscsi::login::text_reply(
            reg,
            peer,
            self.local,
            &s.nexus.initiator,
            s.kind,
            &mut s.params,
            target.as_deref(),
            data,
        );
        let (itt, lun) = (t.itt, t.lun);
        match reply {
            Some(mut reply) => {
                // One PDU: cut at a key boundary to what the initiator accepts.
                let max = self.max_send_data_bytes();
                if reply.len() > max {
                    let cut = reply[..max]
                        .iter()
                        .rposition(|&b| b == 0)
                        .map(|p| p + 1)
                        .unwrap_or(0);
                    reply.truncate(cut);
                }
                self.send_status_pdu(
                    out,
                    |sns| TargetPdu::TextResponse {
                        final_: true,
                        cont: false,
                        lun,
                        itt,
                        ttt: RESERVED_TAG,
                        sns,
                        data_len: reply.len() as u32,
                    },
                    &reply,
                );
            }
            None => {
                let mut bhs = [0u8; BHS_LEN];
                bhs[0] = pdu::opcode::TEXT_REQUEST;
                bhs[16..20].copy_from_slice(&itt.to_be_bytes());
                self.reject(out, RejectReason::ProtocolError, &bhs);
            }
        }
    }

    /// Periodic work: slow waits, login timeout, target-initiated NOP-In pings and their timeout.
    pub fn on_tick(&mut self, reg: &Registry, pool: &mut BufPool, now_ms: u64, out: &mut Out) {
        if self.closing {
            return;
        }
        if self.reinstated.load(std::sync::atomic::Ordering::Acquire) {
            tracing::info!(peer = %self.peer, "closing a session its initiator reinstated");
            out.close_now = true;
            self.closing = true;
            return;
        }
        if !self.waiting_slow.is_empty() {
            self.retry_list(true, reg, pool, out);
        }
        let cfg = &reg.config;
        match &self.phase {
            Phase::Login(_) => {
                if now_ms.saturating_sub(self.started_ms) > cfg.login_timeout_ms {
                    tracing::info!(peer = %self.peer, "login timed out");
                    out.close_now = true;
                    self.closing = true;
                }
            }
            Phase::Full(_) => {
                if let Some((_, sent)) = self.ping {
                    if now_ms.saturating_sub(sent) > cfg.nop_timeout_ms {
                        tracing::warn!(peer = %self.peer, "no answer to NOP-In ping; dropping connection");
                        out.close_now = true;
                        self.closing = true;
                    }
                } else if now_ms.saturating_sub(self.last_rx_ms) > cfg.nop_interval_ms {
                    let ttt = self.next_ttt;
                    self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
                    self.ping = Some((ttt, now_ms));
                    self.send_plain_pdu(
                        out,
                        |sns| TargetPdu::NopIn {
                            lun: 0,
                            itt: RESERVED_TAG,
                            ttt,
                            sns,
                            data_len: 0,
                        },
                        &[],
                    );
                }
            }
        }
    }

    /// Marks every task aborted (connection going away) and frees what is idle. The I_T
    /// nexus is lost: its SPC-2 reservations go (persistent ones stay, SPC-4 5.12).
    pub fn shutdown(&mut self, reg: &Registry, pool: &mut BufPool) {
        self.closing = true;
        let reinstated = self.reinstated.load(std::sync::atomic::Ordering::Acquire);
        if let Phase::Full(s) = &self.phase {
            if !self.counted_out {
                reg.sessions
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                self.counted_out = true;
                if s.kind == SessionKind::Normal {
                    reg.session_ended(
                        &(s.nexus.initiator.clone(), s.nexus.isid, s.target),
                        self.session_id,
                    );
                }
            }
            for l in &s.luns {
                let lun = &reg.luns[l.index];
                // A reinstated session's nexus was lost at the new login: releasing again
                // now would take what the new session reserved since.
                if lun.pr_in_use() && !reinstated {
                    tracing::debug!(initiator = %s.nexus.initiator, isid = ?s.nexus.isid, "I_T nexus lost");
                    lun.with_pr(|st| proto::scsi::pr::nexus_lost(st, &s.nexus));
                }
            }
        }
        for idx in 0..self.tasks.len() as u32 {
            self.abort(idx, pool);
        }
    }
}

/// A session's view of LUN `id` (registry slot `index`), seeing its attentions from now on.
fn lun_view(reg: &Registry, id: u64, index: usize) -> LunView {
    LunView {
        id,
        index,
        ua_seen: reg.luns[index].ua.start(reg.luns[index].mode_tag()),
        pending_ua: Vec::new(),
    }
}

impl Session {
    /// Takes the registry's current entry for this session's target after a reload: LUNs
    /// added to it appear, removed ones disappear (commands to them get LOGICAL UNIT NOT
    /// SUPPORTED), and if the inventory changed every LUN that stays reports REPORTED LUNS
    /// DATA HAS CHANGED once (SPC-4 6.33). A removed target keeps the old entry: the
    /// reload ends such sessions through their kill flag.
    pub(super) fn follow_reload(&mut self, reg: &Registry) {
        self.view_gen = reg.view_gen();
        let Some(Some(entry)) = reg.view().targets.get(self.target).cloned() else {
            return;
        };
        let before: Vec<(u64, usize)> = self.luns.iter().map(|l| (l.id, l.index)).collect();
        if before == entry.luns {
            self.entry = Some(entry);
            return;
        }
        let mut old = std::mem::take(&mut self.luns);
        for &(id, index) in &entry.luns {
            match old.iter().position(|l| l.id == id && l.index == index) {
                Some(p) => {
                    let mut v = old.swap_remove(p);
                    v.pending_ua
                        .push(proto::scsi::sense::Asc::REPORTED_LUNS_DATA_CHANGED);
                    self.luns.push(v);
                }
                None => self.luns.push(lun_view(reg, id, index)),
            }
        }
        self.entry = Some(entry);
    }
}
